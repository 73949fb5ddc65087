"""Run metrics: `metrics.jsonl` (one JSON object per line), TensorBoard event files and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from dsv3_jax.rundir import RunDirError, atomic_write


def to_python(value: Any) -> Any:
    """JSON-friendly scalars and lists from numpy / jax values."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        item = arr.item()
        return item if not isinstance(item, float) or math.isfinite(item) else str(item)
    return [to_python(v) for v in arr]


class MetricsWriter:
    """Appends records to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard (process 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_step: int = 0):
        """`resume_step`: the step the run continues from (0 for a fresh start); records logged after it
        belong to steps about to be redone, so they move to metrics.discarded.jsonl (nothing is deleted)."""
        self.path = os.path.join(os.fspath(run_dir), "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        truncate_after(self.path, resume_step)
        from tensorboardX import SummaryWriter  # local: heavy import, only where we write

        self._tb = SummaryWriter(os.path.join(os.fspath(run_dir), "tensorboard"))
        self._file = open(self.path, "a")
        stat = os.fstat(self._file.fileno())
        self._identity = (stat.st_dev, stat.st_ino)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._check_still_there()
        record = {k: to_python(v) for k, v in record.items()}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, record["step"])

    def _check_still_there(self) -> None:
        """The run's history must not be written into a file that was deleted or replaced under it (the records
        would be unreachable): stop with one line instead, at the first write after it happened."""
        try:
            stat = os.stat(self.path)
            same = (stat.st_dev, stat.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            raise RunDirError(f"{self.path} was deleted or replaced while the run was writing it; stopping (the "
                              "checkpoints written so far are intact: restore the file and resume, or start a "
                              "new --run-dir)")

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def discarded_path(path: str) -> str:
    """Where `truncate_after` keeps the records it removes from `path`."""
    root, ext = os.path.splitext(path)
    return f"{root}.discarded{ext}"


def truncate_after(path: str, step: int) -> int:
    """Move records logged after `step` (they belong to the part of an interrupted run being redone) from
    `path` to its `.discarded` sibling, keeping their order; returns how many moved. Lines cut by a crash move
    too. The rewrite is atomic: a crash during it leaves the old file."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], []
    with open(path) as f:
        for line in f:
            line = line if line.endswith("\n") else line + "\n"
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and record.get("step", 0) <= step
            except json.JSONDecodeError:
                keep = False
            (kept if keep else dropped).append(line)
    if not dropped:
        return 0
    with open(discarded_path(path), "a") as f:
        f.writelines(dropped)
    atomic_write(path, "".join(kept))
    return len(dropped)


def ema(values: list[float], decay: float) -> np.ndarray:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else decay * acc + (1 - decay) * v
        out.append(acc)
    return np.asarray(out)


def plot_run(run_dir: str | os.PathLike, smoothing: float = 0.9) -> str:
    """Write RUN_DIR/loss.png (train loss raw + EMA, val loss; MaxVio) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(os.path.join(os.fspath(run_dir), "metrics.jsonl"))
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_vio) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        steps = [r["step"] for r in train]
        loss = [float(r["loss"]) for r in train]
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (raw)")
        ax_loss.plot(steps, ema(loss, smoothing), color="tab:blue", label=f"train loss (EMA {smoothing})")
        if any("mtp_loss" in r for r in train) and any(float(r.get("mtp_loss", 0)) > 0 for r in train):
            ax_loss.plot(steps, ema([float(r["mtp_loss"]) for r in train], smoothing), color="tab:green",
                         label=f"MTP depth-1 loss (EMA {smoothing})")
        ax_vio.plot(steps, ema([float(r["maxvio_batch"]) for r in train], smoothing), color="tab:purple",
                    label=f"MaxVio_batch (EMA {smoothing})")
    if val:
        ax_loss.plot([r["step"] for r in val], [float(r["val_loss"]) for r in val], "o-", color="tab:red",
                     label="validation loss")
        ax_vio.plot([r["step"] for r in val], [float(r["maxvio_global"]) for r in val], "o-", color="tab:orange",
                    label="MaxVio_global (validation)")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax_vio.set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", title="Load balance")
    for ax in (ax_loss, ax_vio):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = os.path.join(os.fspath(run_dir), "loss.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
