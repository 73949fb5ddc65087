"""Result collection: copy a finished run's files into experiments/results and summarise runs and experiments.

Everything here reads plain files (metrics.jsonl, config.json, final_eval.json, run.json), so the notebooks and
tests use it on committed results without JAX or a run directory.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from experiments import spec
from experiments.spec import Experiment, Variant, run_key

RUN_FILES = ("metrics.jsonl", "config.json", "loss.png")
LAST_STEPS = 50  # MaxVio_batch is averaged over the last 50 steps: per-batch values are noisy
STARVED_SHARE = 0.25  # an expert is starved when it receives less than this fraction of its fair load


def starved_experts(expert_load_LE: list[list[float]], share: float = STARVED_SHARE) -> list[int]:
    """Per MoE layer, how many experts receive less than `share` of the fair load (the layer's mean load): the
    dead or starving experts that MaxVio, a statistic of the most loaded expert, does not show."""
    counts = []
    for layer in expert_load_LE:
        fair = sum(layer) / len(layer)
        counts.append(sum(1 for load in layer if load < share * fair))
    return counts


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "train"]


def eval_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "eval"]


def finished(metrics_path: str | Path, steps: int) -> bool:
    """Whether a run's log reaches `steps` and has its final evaluation."""
    path = Path(metrics_path)
    if not path.is_file():
        return False
    records = read_jsonl(path)
    return (any(r["step"] == steps for r in train_records(records))
            and any(r["step"] == steps for r in eval_records(records)))


def train_seconds(records: list[dict[str, Any]], tokens_per_step: int) -> float:
    """Seconds spent in training steps (first-step compile included; evaluation and checkpoints excluded)."""
    return float(sum(tokens_per_step / r["tokens_per_s"] for r in train_records(records) if r["tokens_per_s"] > 0))


def summarize_run(result_dir: str | Path) -> dict[str, Any]:
    """The numbers a table needs from one collected run directory."""
    result_dir = Path(result_dir)
    records = read_jsonl(result_dir / "metrics.jsonl")
    config = read_json(result_dir / "config.json")
    train, evals = train_records(records), eval_records(records)
    last = train[-LAST_STEPS:]
    out: dict[str, Any] = {
        "steps": train[-1]["step"] if train else 0,
        "train_loss_last10": _mean([r["loss"] for r in train[-10:]]),
        "maxvio_batch_last50": _mean([r["maxvio_batch"] for r in last]),
        "skipped_total": train[-1].get("skipped_total", 0) if train else 0,
        "dropped_fraction_max": max((float(r.get("dropped_fraction", 0.0)) for r in train), default=0.0),
        "tokens_per_s_median": statistics.median([r["tokens_per_s"] for r in train[1:]]) if len(train) > 1 else 0.0,
        "train_seconds": train_seconds(records, config["train"]["batch_size"] * config["train"]["seq_len"]),
    }
    if evals:
        out.update(val_loss_last_eval=evals[-1]["val_loss"], maxvio_global_last_eval=evals[-1]["maxvio_global"],
                   val_batches_last_eval=evals[-1].get("val_batches"))
    final_path = result_dir / "final_eval.json"
    if final_path.is_file():  # the whole validation split, evaluated once after training
        final = read_json(final_path)
        out.update(val_loss=final["val_loss"], val_mtp_loss=final["val_mtp_loss"],
                   maxvio_global=final["maxvio_global"], val_batches=final["val_batches"])
        if final.get("expert_load"):
            per_layer = starved_experts(final["expert_load"])
            out.update(starved_experts_per_layer=per_layer, starved_experts=_mean([float(c) for c in per_layer]))
    run_path = result_dir / "run.json"
    if run_path.is_file():
        run = read_json(run_path)
        out.update(wall_s=run.get("wall_s"), command=run.get("command"), commit=run.get("commit"))
    return out


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def collect_run(run_dir: str | Path, dest: str | Path, info: dict[str, Any],
                final_eval: dict[str, Any] | None) -> Path:
    """Copy a run's metrics, config and plot into `dest`, with run.json (`info`) and final_eval.json."""
    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    write_json(dest / "run.json", info)
    if final_eval is not None:
        write_json(dest / "final_eval.json", final_eval)
    return dest


def seeds_present(experiment: str, variant: str, scale: str, results_dir: Path | None = None) -> list[int]:
    """Seeds of a variant that have collected results."""
    results_dir = spec.RESULTS_DIR if results_dir is None else results_dir
    folder = results_dir / run_key(experiment, variant, scale, 0).parent
    if not folder.is_dir():
        return []
    seeds = [int(p.name[4:]) for p in folder.glob("seed*") if p.name[4:].isdigit() and (p / "metrics.jsonl").is_file()]
    return sorted(seeds)


def variant_runs(exp: Experiment, scale: str, results_dir: Path | None = None) -> dict[str, list[tuple[int, Path]]]:
    """variant name -> [(seed, result dir)] of the collected runs (following same_as to the source run)."""
    results_dir = spec.RESULTS_DIR if results_dir is None else results_dir
    out = {}
    for v in exp.variants:
        src_exp, src_var = v.source(exp.name)
        out[v.name] = [(s, results_dir / run_key(src_exp, src_var, scale, s))
                       for s in seeds_present(src_exp, src_var, scale, results_dir)]
    return out


SUMMARY_FIELDS = ("val_loss", "maxvio_global", "maxvio_batch_last50", "train_loss_last10", "val_mtp_loss",
                  "starved_experts")


def _stat(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (None for one value) and count."""
    return {"mean": _mean(values), "n": len(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def summarize_experiment(exp: Experiment, scale: str = "cpu", results_dir: Path | None = None) -> dict[str, Any]:
    """Per variant: every seed's summary, mean and sample std over seeds of the table's fields, and the val-loss
    difference to the first (reference) variant paired by seed.

    Arms of one seed share initialisation and data order, so the paired difference removes most of the
    seed-to-seed spread that the unpaired means carry."""
    results_dir = spec.RESULTS_DIR if results_dir is None else results_dir
    variants: dict[str, Any] = {}
    reference = exp.variants[0].name
    runs_by_variant = variant_runs(exp, scale, results_dir)  # one directory scan for all variants
    for v in exp.variants:
        per_seed = {str(seed): summarize_run(path) for seed, path in runs_by_variant[v.name]}
        agg = {}
        for field in SUMMARY_FIELDS:
            values = [s[field] for s in per_seed.values() if field in s]
            if values:
                agg[field] = _stat(values)
        ref_seeds = variants[reference]["seeds"] if v.name != reference else {}
        diffs = [run["val_loss"] - ref_seeds[seed]["val_loss"] for seed, run in per_seed.items()
                 if seed in ref_seeds and "val_loss" in run and "val_loss" in ref_seeds[seed]]
        if diffs:
            agg["val_loss_diff_vs_reference"] = _stat(diffs)
        variants[v.name] = {"label": v.label, "same_as": v.same_as, "overrides": list(v.overrides),
                            "seeds": per_seed, "aggregate": agg,
                            "regenerate": regenerate_command(exp, v, scale, per_seed)}
    return {"experiment": exp.name, "title": exp.title, "scale": scale, "reference": reference,
            "variants": variants, "paper": list(exp.paper)}


def regenerate_command(exp: Experiment, variant: Variant, scale: str, per_seed: dict[str, dict[str, Any]]) -> str:
    """The runner call(s) that train this row again: its source run and seeds, one call per commit they ran at
    ("" for an arm that has no results and does not run at this scale by default)."""
    src_exp, src_var = variant.source(exp.name)
    by_commit: dict[str, list[int]] = {}
    for seed, run in sorted(per_seed.items(), key=lambda kv: int(kv[0])):
        by_commit.setdefault((run.get("commit") or "")[:7], []).append(int(seed))
    if not by_commit and variant.seeds_for(scale):  # nothing collected yet: the seeds the spec runs by default
        by_commit = {"": list(variant.seeds_for(scale))}
    calls = []  # none for an arm the spec does not run at this scale
    for commit, seeds in by_commit.items():
        cmd = f"python -m experiments.run {src_exp} --variant {src_var} " + " ".join(f"--seed {s}" for s in seeds)
        cmd += f" --scale {scale}" if scale != "cpu" else ""
        calls.append(cmd + (f" --code {commit}" if commit else ""))
    return "; ".join(calls)


def markdown_table(summary: dict[str, Any]) -> str:
    """A Markdown table of the experiment summary: mean (+- std, n seeds) per field."""
    header = ["variant", "seeds", "val loss (full split)", f"Δ val loss vs `{summary.get('reference')}` (same seeds)",
              "MaxVio_global (full split)", "MaxVio_batch (last 50 steps)",
              f"starved experts per layer (< {STARVED_SHARE:g} of fair load)", "train loss (last 10 steps)", "command"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, v in summary["variants"].items():
        agg = v["aggregate"]
        cells = [f"`{name}`", ",".join(v["seeds"]) or "not run"]
        for field, digits in (("val_loss", 4), ("val_loss_diff_vs_reference", 4), ("maxvio_global", 3),
                              ("maxvio_batch_last50", 3), ("starved_experts", 2), ("train_loss_last10", 4)):
            cells.append(_fmt(agg.get(field), digits, signed=field.endswith("_vs_reference")))
        cells.append(f"`{v['regenerate']}`" if v.get("regenerate") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("paper"):
        lines += ["", "Paper's numbers for the same comparison (their models and metrics, not ours):", "",
                  "| variant | metric | paper value | source |", "|---|---|---|---|"]
        lines += [f"| `{p['variant']}` | {p['metric']} | {p['value']} | {p['source']} |" for p in summary["paper"]]
    return "\n".join(lines) + "\n"


def _fmt(stat: dict[str, Any] | None, digits: int, signed: bool = False) -> str:
    if not stat:
        return "-"
    text = f"{stat['mean']:{'+' if signed else ''}.{digits}f}"
    if stat["std"] is not None:
        text += f" ± {stat['std']:.{digits}f} (n={stat['n']})"
    return text


def replace_marked_block(text: str, marker: str, body: str) -> str:
    """`text` with whatever sits between `<!-- MARKER -->` and `<!-- /MARKER -->` replaced by `body`
    (unchanged when the markers are absent)."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        return text
    return text[:i + len(start)] + "\n" + body.rstrip("\n") + "\n" + text[j:]
