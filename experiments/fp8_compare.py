"""FP8 training emulation against the high-precision baseline: relative loss error curves.

Trains the `fp8` experiment's variants (experiments/configs/fp8.json: fp32 baseline, deepseek, per_tensor,
bf16; same seed, initialisation and data windows) through the experiments runner, then compares every
variant's training loss with the baseline's step by step and writes, under experiments/results/fp8/:

* relative_error_vs_BASELINE.jsonl: one line per (variant, step): raw and EMA(0.9)-smoothed losses of the
  variant and the baseline, |EMA_v - EMA_ref| / EMA_ref (the paper's curves are EMA-smoothed with 0.9; it
  does not say how it computes the relative error, this is the plain reading) and the signed raw difference;
* relative_error_vs_BASELINE.png: the smoothed loss curves and the relative error against the 0.25% line;
* relative_error_vs_BASELINE.json: per variant, max / mean relative error after warm-up and over the last
  100 steps, and the relative difference of the final full-split validation loss;
* same_params.json (--same-params): the baseline's final checkpoint evaluated with every recipe, i.e. the
  loss error FP8 GEMMs cause on identical weights, without the divergence of two training trajectories.

    python experiments/fp8_compare.py                              # train what is missing, then compare
    python experiments/fp8_compare.py --variant deepseek --code HEAD
    python experiments/fp8_compare.py --compare-only --baseline bf16 [--seed 1] [--same-params]

Run from the repository root. Training goes through `python -m experiments.run fp8 --variant V`, so the
runs land in experiments/results/fp8/V/seedS (the fp32 baseline is the `baseline/default` run); the comparison
files of seed S > 0 carry a `_seedS` suffix.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from experiments import collect, spec  # noqa: E402
from experiments.plots import SMOOTHING, ema  # noqa: E402

EXPERIMENT = "fp8"
PAPER_BOUND = 0.0025  # V3 §3.3: FP8 vs BF16 relative loss error stays below 0.25%
TAIL_STEPS = 100


def train_losses(result_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, loss) of a collected run's training records."""
    records = collect.train_records(collect.read_jsonl(result_dir / "metrics.jsonl"))
    return np.array([r["step"] for r in records]), np.array([r["loss"] for r in records], np.float64)


def relative_error_curve(loss_v: np.ndarray, loss_ref: np.ndarray) -> dict[str, np.ndarray]:
    """EMA-smoothed losses and |EMA_v - EMA_ref| / EMA_ref, plus the raw per-step relative difference."""
    ema_v, ema_ref = ema(list(loss_v), SMOOTHING), ema(list(loss_ref), SMOOTHING)
    return {"ema": ema_v, "ema_ref": ema_ref, "rel_error_ema": np.abs(ema_v - ema_ref) / ema_ref,
            "rel_diff_raw": (loss_v - loss_ref) / loss_ref}


def warmup_steps(result_dir: Path) -> int:
    train_cfg = collect.read_json(result_dir / "config.json")["train"]
    return int(round(train_cfg["warmup_frac"] * train_cfg["steps"]))


def output_stem(baseline: str, seed: int) -> str:
    """File name stem of one comparison (seed 0 keeps the historical names without a seed suffix)."""
    return f"relative_error_vs_{baseline}" + (f"_seed{seed}" if seed else "")


def compare(exp: spec.Experiment, baseline: str, out_dir: Path, seed: int = 0,
            results_dir: Path | None = None) -> dict[str, Any]:
    """Write relative_error.jsonl / .png / .json for every variant collected at `seed` against `baseline`."""
    runs = {name: dict(pairs) for name, pairs in collect.variant_runs(exp, "cpu", results_dir).items()}
    if seed not in runs.get(baseline, {}):
        raise SystemExit(f"error: baseline variant {baseline!r} has no collected run for seed {seed}; train it first")
    ref_dir = runs[baseline][seed]
    ref_steps, ref_loss = train_losses(ref_dir)
    warmup = warmup_steps(ref_dir)
    ref_final = collect.read_json(ref_dir / "final_eval.json")["val_loss"]
    lines, summary, curves = [], {}, {}
    for variant in exp.variants:
        if variant.name == baseline or seed not in runs.get(variant.name, {}):
            continue
        run_dir = runs[variant.name][seed]
        steps, loss = train_losses(run_dir)
        n = min(len(steps), len(ref_steps))
        if not np.array_equal(steps[:n], ref_steps[:n]):
            raise SystemExit(f"error: {variant.name} and {baseline} logged different steps")
        curve = relative_error_curve(loss[:n], ref_loss[:n])
        curves[variant.name] = (steps[:n], curve)
        for i in range(n):
            lines.append({"variant": variant.name, "baseline": baseline, "step": int(steps[i]),
                          "loss": float(loss[i]), "loss_ref": float(ref_loss[i]), "ema": float(curve["ema"][i]),
                          "ema_ref": float(curve["ema_ref"][i]), "rel_error_ema": float(curve["rel_error_ema"][i]),
                          "rel_diff_raw": float(curve["rel_diff_raw"][i])})
        after = steps[:n] > warmup
        tail = steps[:n] > steps[n - 1] - TAIL_STEPS
        final = collect.read_json(run_dir / "final_eval.json")["val_loss"]
        summary[variant.name] = {
            "label": variant.label, "steps": int(steps[n - 1]), "warmup_steps": warmup,
            "rel_error_ema_max_after_warmup": float(curve["rel_error_ema"][after].max()),
            "rel_error_ema_mean_after_warmup": float(curve["rel_error_ema"][after].mean()),
            "rel_error_ema_max_last100": float(curve["rel_error_ema"][tail].max()),
            "rel_error_ema_mean_last100": float(curve["rel_error_ema"][tail].mean()),
            "signed_rel_diff_mean_last100": float(curve["rel_diff_raw"][tail].mean()),
            "final_val_loss": final, "final_val_loss_ref": ref_final,
            "final_val_loss_rel_diff": (final - ref_final) / ref_final,
            "below_paper_bound_after_warmup": bool(curve["rel_error_ema"][after].max() < PAPER_BOUND),
            "command": collect.read_json(run_dir / "run.json").get("command")
            if (run_dir / "run.json").is_file() else None}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(baseline, seed)
    with open(out_dir / f"{stem}.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    result = {"baseline": baseline, "baseline_label": exp.variant(baseline).label, "seed": seed,
              "smoothing": SMOOTHING, "paper_bound": PAPER_BOUND, "variants": summary}
    collect.write_json(out_dir / f"{stem}.json", result)
    plot(curves, ref_steps, ref_loss, exp, baseline, warmup, out_dir / f"{stem}.png", seed)
    return result


# Same-weights evaluation: model config changes per arm ("bf16" for scale: what bf16 compute alone moves).
SAME_PARAMS_ARMS = {"none": {}, "deepseek": {"fp8": "deepseek"}, "per_tensor": {"fp8": "per_tensor"},
                    "bf16": {"dtype": "bfloat16"}}


def same_params_losses(run_dir: Path, arms: dict[str, dict[str, Any]], max_batches: int) -> dict[str, Any]:
    """Validation loss of one run's latest checkpoint under each arm's model config (same weights, batches)."""
    import jax

    from dsv3_jax.checkpoint import RunCheckpointer
    from dsv3_jax.data import prepare_data
    from dsv3_jax.train.config import Config
    from dsv3_jax.train.step import abstract_train_state, jit_eval_step
    from dsv3_jax.train.trainer import evaluate

    config = Config.from_dict(collect.read_json(run_dir / "config.json"))
    graphdef, abstract = abstract_train_state(config.model, config.train)
    checkpointer = RunCheckpointer(str(run_dir), keep=config.train.keep_checkpoints, writable=False)
    restored = checkpointer.restore_latest(abstract)
    checkpointer.close()
    if restored is None:
        raise SystemExit(f"error: no restorable checkpoint in {run_dir}/checkpoints")
    step, state = restored.step, restored.state
    data = prepare_data(config.data.corpus, config.model.vocab_size, config.train.seq_len, config.model.mtp_depth,
                        cache_dir=config.data.cache_dir, verbose=False)
    out: dict[str, Any] = {"run_dir": str(run_dir), "step": step, "val_batches": max_batches, "val_loss": {}}
    for arm, changes in arms.items():
        model_cfg = config.model.replace(**changes)
        graphdef = abstract_train_state(model_cfg, config.train)[0]  # the recipe lives in the graph definition
        eval_fn = jit_eval_step(graphdef, model_cfg, config.train)
        result = evaluate(eval_fn, state.params, state.biases, data.val_batches(config.train.batch_size),
                          max_batches, jax.numpy.asarray)
        out["val_loss"][arm] = result["val_loss"]
    ref = out["val_loss"]["none"]
    out["rel_diff_vs_none"] = {r: (v - ref) / ref for r, v in out["val_loss"].items() if r != "none"}
    return out


def plot(curves: dict, ref_steps: np.ndarray, ref_loss: np.ndarray, exp: spec.Experiment, baseline: str,
         warmup: int, out: Path, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax_loss.plot(ref_steps, ema(list(ref_loss), SMOOTHING), color="black", label=exp.variant(baseline).label)
    for (name, (steps, curve)), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        label = exp.variant(name).label
        ax_loss.plot(steps, curve["ema"], color=colour, label=label)
        ax_err.plot(steps, 100 * curve["rel_error_ema"], color=colour, label=label)
    ax_loss.set(xlabel="step", ylabel=f"train loss (EMA {SMOOTHING})", title="training loss")
    ax_loss.set_ylim(top=float(np.percentile(ref_loss, 95)))
    ax_err.axhline(100 * PAPER_BOUND, color="gray", linestyle="--", label="0.25% (V3, FP8 vs BF16)")
    ax_err.axvline(warmup, color="gray", linestyle=":", label="end of LR warm-up")
    ax_err.set(xlabel="step", ylabel="|EMA loss - EMA baseline| / EMA baseline (%)", yscale="log",
               title=f"relative loss error vs {exp.variant(baseline).label}")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{exp.title} (seed {seed})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", help="train only these variants (default: all)")
    parser.add_argument("--code", metavar="REF", help="passed to the runner: train with the library at this commit")
    parser.add_argument("--compare-only", action="store_true", help="do not train; compare collected runs")
    parser.add_argument("--baseline", default="fp32", help="variant the others are compared with")
    parser.add_argument("--seed", type=int, default=0, help="compare the runs of this seed (trains it if missing)")
    parser.add_argument("--same-params", action="store_true",
                        help="also evaluate the baseline's final checkpoint with every recipe (same_params.json)")
    parser.add_argument("--val-batches", type=int, default=32, help="validation batches for --same-params")
    args = parser.parse_args(argv)
    exp = spec.load(EXPERIMENT)
    if not args.compare_only:
        for name in args.variant or [v.name for v in exp.variants]:
            cmd = [sys.executable, "-m", "experiments.run", EXPERIMENT, "--variant", name, "--seed", str(args.seed)]
            if args.code:
                cmd += ["--code", args.code]
            subprocess.run(cmd, check=True)
    result = compare(exp, args.baseline, spec.RESULTS_DIR / EXPERIMENT, args.seed)
    print(json.dumps(result, indent=2))
    if args.same_params:
        src_exp, src_var = exp.variant(args.baseline).source(EXPERIMENT)
        run_dir = spec.RUNS_DIR / spec.run_key(src_exp, src_var, "cpu", 0)
        same = same_params_losses(run_dir, SAME_PARAMS_ARMS, args.val_batches)
        collect.write_json(spec.RESULTS_DIR / EXPERIMENT / "same_params.json", same)
        print(json.dumps(same, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
