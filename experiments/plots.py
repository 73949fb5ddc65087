"""Comparison plots of an experiment's variants, drawn from collected results (metrics.jsonl per run).

Every curve says its smoothing in the legend or axis title; each variant keeps one colour, seed 0 is solid and
further seeds are thinner dashed lines of the same colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments.collect import eval_records, read_json, read_jsonl, train_records

SMOOTHING = 0.9  # EMA decay of per-step curves (the paper's FP8 curves use the same)
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def ema(values: list[float], decay: float = SMOOTHING) -> np.ndarray:
    """Exponential moving average, started at the first value (no zero-bias)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else decay * acc + (1 - decay) * v
        out.append(acc)
    return np.asarray(out)


# label -> {"colour", "reference": bool, "runs": [(seed, records, final_eval | None, config)]}; the reference is
# the experiment's first variant, the one summaries pair every other variant with.
Series = dict[str, dict[str, Any]]


def load_series(runs: dict[str, list[tuple[int, Path]]], labels: dict[str, str]) -> Series:
    """Read every run's metrics (and final eval / config) once; keys are the variants' labels, in the order of
    `runs`, whose first variant is the reference."""
    series = {}
    for i, (name, seed_dirs) in enumerate(runs.items()):
        loaded = []
        for seed, path in seed_dirs:
            final = read_json(path / "final_eval.json") if (path / "final_eval.json").is_file() else None
            config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
            loaded.append((seed, read_jsonl(path / "metrics.jsonl"), final, config))
        if loaded:
            series[labels.get(name, name)] = {"colour": COLOURS[i % len(COLOURS)], "reference": i == 0,
                                              "runs": loaded}
    return series


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(seed_index: int) -> dict[str, Any]:
    return {"linewidth": 1.6, "alpha": 1.0} if seed_index == 0 else {"linewidth": 0.9, "alpha": 0.6, "linestyle": "--"}


def _label(label: str, seed: int) -> str:
    return f"{label} (seed {seed})"


def _eval_batch_counts(configs: list[dict[str, Any]]) -> set[int | None]:
    """The runs' `train.eval_batches` (0 = the whole validation split; None = a config not collected)."""
    return {c.get("train", {}).get("eval_batches") for c in configs}


def eval_batches_text(configs: list[dict[str, Any]]) -> str:
    """What the in-training evaluations of these runs covered, from their configs' `train.eval_batches`
    (0 = the whole validation split; the cpu scale evaluates the first 16 batches, the long scale all of them)."""
    counts = _eval_batch_counts(configs)
    if counts == {0}:
        return "whole validation split"
    if len(counts) == 1 and None not in counts:
        return f"first {counts.pop()} validation batches"
    return "in-training evaluations"  # runs that differ, or configs not collected


def eval_marks_text(configs: list[dict[str, Any]]) -> str:
    """What the dots and the star of an evaluation panel are: in-training evaluations and the final whole-split
    evaluation, which are the same kind of number when the runs evaluated the whole split every time."""
    if _eval_batch_counts(configs) == {0}:
        return "whole split at every evaluation; star: final"
    return f"dots: {eval_batches_text(configs)}; star: whole split"


def _configs(series: Series) -> list[dict[str, Any]]:
    return [config for s in series.values() for *_, config in s["runs"]]


def _train_and_eval_panels(series: Series, ax_train: Any, ax_eval: Any, train_field: str, eval_field: str) -> None:
    """Per variant and seed: `train_field` per step (EMA) on the left, `eval_field` at each evaluation on the
    right, plus a star at the final whole-split value."""
    for label, s in series.items():
        for i, (seed, records, final, _) in enumerate(s["runs"]):
            train, evals = train_records(records), eval_records(records)
            ax_train.plot([r["step"] for r in train], ema([r[train_field] for r in train]), color=s["colour"],
                          label=_label(label, seed), **_style(i))
            ax_eval.plot([r["step"] for r in evals], [r[eval_field] for r in evals], marker="o", markersize=3,
                         color=s["colour"], label=_label(label, seed), **_style(i))
            if final is not None:
                ax_eval.plot([final["step"]], [final[eval_field]], marker="*", markersize=11, color=s["colour"],
                             linestyle="none")


# steps, the differences there, and (step, difference) of the final whole-split evaluations if both runs have one
PairedCurve = tuple[list[int], list[float], tuple[int, float] | None]


def paired_eval_differences(series: Series, field: str = "val_loss") -> dict[str, dict[int, PairedCurve]]:
    """label -> seed -> `field` of the variant minus the reference's at the same seed, at every step both runs
    evaluated, plus the difference of their final whole-split evaluations (None unless both have one).
    Pairing by seed removes the part of the difference that the seed (initialisation and data order) explains."""
    reference = next((s for s in series.values() if s["reference"]), None)
    if reference is None:
        return {}
    ref_runs = {seed: (eval_records(records), final) for seed, records, final, _ in reference["runs"]}
    out: dict[str, dict[int, PairedCurve]] = {}
    for label, s in series.items():
        if s["reference"]:
            continue
        for seed, records, final, _ in s["runs"]:
            if seed not in ref_runs:
                continue
            ref_evals, ref_final = ref_runs[seed]
            ref_at = {r["step"]: r[field] for r in ref_evals}
            evals = [r for r in eval_records(records) if r["step"] in ref_at]
            final_diff = ((final["step"], final[field] - ref_final[field])
                          if final is not None and ref_final is not None else None)
            out.setdefault(label, {})[seed] = ([r["step"] for r in evals],
                                               [r[field] - ref_at[r["step"]] for r in evals], final_diff)
    return out


def plot_loss(series: Series, out: str | Path, title: str) -> Path:
    """Train loss (EMA) and validation loss per variant, a star marking the final full-split validation loss,
    and a third panel with each variant's validation loss minus the reference's at the same seed."""
    plt = _pyplot()
    diffs = paired_eval_differences(series)
    fig, axes = plt.subplots(1, 3 if diffs else 2, figsize=(19.5 if diffs else 13, 4.8))
    ax_tr, ax_val = axes[:2]
    _train_and_eval_panels(series, ax_tr, ax_val, "loss", "val_loss")
    _zoom(ax_tr, series, "loss")
    ax_tr.set(xlabel="step", ylabel="train cross-entropy (nats/token)",
              title=f"Train loss, EMA {SMOOTHING} (main token; y zoomed on the last 2/3)")
    marks = eval_marks_text(_configs(series))
    ax_val.set(xlabel="step", ylabel="validation cross-entropy (nats/token)", title=f"Validation loss ({marks})")
    if diffs:
        _paired_panel(axes[2], series, diffs)
    return _finish(fig, tuple(axes), out, title)


def _paired_panel(ax: Any, series: Series, diffs: dict[str, dict[int, PairedCurve]]) -> None:
    reference = next(label for label, s in series.items() if s["reference"])
    for label, by_seed in diffs.items():
        for i, (seed, (steps, values, final_diff)) in enumerate(sorted(by_seed.items())):
            ax.plot(steps, values, marker="o", markersize=3, color=series[label]["colour"],
                    label=_label(label, seed), **_style(i))
            if final_diff is not None:
                ax.plot([final_diff[0]], [final_diff[1]], marker="*", markersize=11, color=series[label]["colour"],
                        linestyle="none")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="step", ylabel="Δ validation cross-entropy (nats/token)",
           title=f"Val loss minus {reference}, same seed")


def _zoom(ax: Any, series: Series, field: str) -> None:
    """Limit y to the second half of training: the first steps (loss ~9) would flatten the differences."""
    tails = []
    for s in series.values():
        for _, records, _, _ in s["runs"]:
            values = ema([r[field] for r in train_records(records)])
            tails.extend(values[len(values) // 3:])
    if tails:
        lo, hi = float(np.min(tails)), float(np.max(tails))
        pad = 0.05 * (hi - lo + 1e-6)
        ax.set_ylim(lo - pad, hi + pad)


def plot_maxvio(series: Series, out: str | Path, title: str) -> Path:
    """MaxVio_batch per step (EMA) and MaxVio_global at each evaluation, log scale (balance spans 100x)."""
    plt = _pyplot()
    fig, (ax_b, ax_g) = plt.subplots(1, 2, figsize=(13, 4.8))
    _train_and_eval_panels(series, ax_b, ax_g, "maxvio_batch", "maxvio_global")
    for ax in (ax_b, ax_g):
        _log_y(ax)
    ax_b.set(xlabel="step", ylabel="MaxVio_batch (mean over MoE layers)",
             title=f"MaxVio_batch per training batch, EMA {SMOOTHING}")
    ax_g.set(xlabel="step", ylabel="MaxVio_global (mean over MoE layers)",
             title=f"MaxVio_global, validation ({eval_marks_text(_configs(series))})")
    return _finish(fig, (ax_b, ax_g), out, title)


def _log_y(ax: Any) -> None:
    """Log y axis labelled with plain numbers (0.5, 1, 2) instead of 5x10^-1."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def final_loads(run: tuple) -> tuple[np.ndarray, int, float, str] | None:
    """(loads [layers, E], step, MaxVio_global, where) of a run: the whole-split final evaluation when it kept
    the loads, else the last in-training evaluation."""
    _, records, final, config = run
    if final is not None and "expert_load" in final:
        return np.asarray(final["expert_load"], float), final["step"], final["maxvio_global"], "whole validation split"
    evals = eval_records(records)
    if not evals:
        return None
    last = evals[-1]
    return (np.asarray(last["expert_load"], float), last["step"], last["maxvio_global"],
            eval_batches_text([config]))


def plot_expert_load(series: Series, out: str | Path, title: str) -> Path:
    """Per-expert load / mean load of every MoE layer at the end of training, one heatmap per variant (seed 0)."""
    plt = _pyplot()
    items = [(label, s["runs"][0][0], final_loads(s["runs"][0])) for label, s in series.items()]
    items = [(label, seed, loads) for label, seed, loads in items if loads is not None]
    fig, axes = plt.subplots(len(items), 1, figsize=(9, 1.6 + 1.4 * max(1, len(items))), squeeze=False,
                             layout="constrained")  # constrained: room for the two-line suptitle
    rel = [load / load.mean(axis=1, keepdims=True) for _, _, (load, _, _, _) in items]
    vmax = max(float(r.max()) for r in rel) if rel else 2.0
    image = None
    for ax, (label, seed, (_, step, vio, where)), r in zip(axes[:, 0], items, rel):
        image = ax.imshow(r, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"{label} (seed {seed}), step {step}, {where}: MaxVio_global {vio:.3f}", fontsize=9)
        ax.set_yticks(range(r.shape[0]), [f"MoE layer {j + 1}" for j in range(r.shape[0])], fontsize=8)
        ax.set_xticks(range(r.shape[1]))
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("routed expert")
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="tokens routed / mean over experts")
    fig.suptitle(f"{title}\nexpert loads of the final checkpoint; 1.0 = perfectly balanced", fontsize=10)
    out = Path(out)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_mtp(series: Series, out: str | Path, title: str) -> Path:
    """Main-token and depth-1 MTP validation loss per evaluation; MTP curves only for arms that train MTP."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, s in series.items():
        for i, (seed, records, _, config) in enumerate(s["runs"]):
            evals = eval_records(records)
            steps = [r["step"] for r in evals]
            ax.plot(steps, [r["val_loss"] for r in evals], color=s["colour"], marker="o", markersize=3,
                    label=f"{label} (seed {seed}): main token", **_style(i))
            if config.get("train", {}).get("mtp_lambda", 0) > 0 and config.get("model", {}).get(
                    "num_nextn_predict_layers", 0) > 0:
                ax.plot(steps, [r["val_mtp_loss"] for r in evals], color=s["colour"], marker="s", markersize=3,
                        linestyle=":", label=f"{label} (seed {seed}): MTP depth 1 (token t+2)")
    ax.set(xlabel="step", ylabel="validation cross-entropy (nats/token)",
           title=f"Validation loss, {eval_batches_text(_configs(series))} (unsmoothed)")
    return _finish(fig, (ax,), out, title)


def _finish(fig: Any, axes: tuple, out: str | Path, title: str) -> Path:
    plt = _pyplot()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


PLOTTERS = {"loss": plot_loss, "maxvio": plot_maxvio, "expert_load": plot_expert_load, "mtp": plot_mtp}
