"""Training throughput: the bare jitted train step, and the real trainer loop around it.

`bare`: the train step exactly as the trainer jits it (mesh plan from the config, shardings, donation) on random
device-resident tokens, timed over --steps steps after --warmup steps (each step blocks before the next is
timed, so this is device time per step plus dispatch).
`trainer`: `dsv3_jax.train.trainer.train` on the prepared default corpus (data loading, the asynchronous loop,
metrics, the progress bar), tokens/s read back from its metrics.jsonl over steps --trainer-from..--trainer-to;
evaluation and checkpoints are pushed past the end so they do not count. The same script runs on CPU, GPU and
TPU (whatever `jax.devices()` offers; one device).

    python benchmarks/train_throughput.py                       # small preset, batch 8 x 256, both
    python benchmarks/train_throughput.py --preset tiny --set train.grad_accum=2 --modes bare
    # against HF transformers on this CPU (hf_train_throughput.py, in its own venv), MTP off on both sides
    python benchmarks/train_throughput.py --mtp 0 --write-hf-config /tmp/small_hf.json
    .venv-hf/bin/python benchmarks/hf_train_throughput.py --config /tmp/small_hf.json > /tmp/hf.json
    python benchmarks/train_throughput.py --mtp 0 --modes bare --vs-hf /tmp/hf.json

Prints one JSON object: config, device, "bare": {tokens_per_s, step_ms (median), step_flops (XLA cost
analysis of the step, unrolled and in one piece because XLA counts a loop body once; null where the backend
gives none, e.g. GPU), compile_s}, "trainer": {tokens_per_s over the window, steps},
and "trainer_vs_bare" (the ratio of the two tokens/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._step import compile_step, step_flops, trainer_step  # noqa: E402
from dsv3_jax.config import get_preset  # noqa: E402
from dsv3_jax.train.config import Config, DataConfig, apply_overrides  # noqa: E402
from dsv3_jax.train.presets import train_preset  # noqa: E402
from dsv3_jax.hf_config import to_hf  # noqa: E402


def build_config(args) -> Config:
    config = Config(model=get_preset(args.preset), train=train_preset(args.preset), data=DataConfig(corpus=args.corpus))
    sets = [f"train.batch_size={args.batch}", f"train.seq_len={args.seq}", f"model.num_nextn_predict_layers={args.mtp}"]
    return apply_overrides(config, sets + (args.set or []))


def bare(config: Config, steps: int, warmup: int) -> dict:
    """The step the trainer runs (same mesh plan, shardings and donation), timed alone on device-resident
    batches: what the loop around it is compared with."""
    mc, tc = config.model, config.train
    compiled_step = trainer_step(config)
    step_s, durations = compiled_step.median_s(steps, warmup)
    compiled, compile_s = compiled_step.compiled, compiled_step.compile_s
    flops = step_flops(compiled)
    if mc.scan_layers or tc.grad_accum > 1:
        # XLA's cost analysis counts a while loop's body once, not once per iteration: take the FLOPs of the
        # same step unrolled and in one piece (the same math) instead.
        flops = step_flops(compile_step(mc.replace(scan_layers=False),
                                        dataclasses.replace(tc, grad_accum=1))[0])
    return {"tokens_per_s": round(tc.batch_size * tc.seq_len / step_s, 1), "step_ms": round(1e3 * step_s, 2),
            "step_ms_mean": round(1e3 * statistics.mean(durations), 2), "step_flops": flops,
            "compile_s": round(compile_s, 2), "steps": steps}


def trainer(config: Config, first: int, last: int) -> dict:
    from dsv3_jax.data import prepare_data
    from dsv3_jax.train.metrics import read_metrics
    from dsv3_jax.train.trainer import train

    tc = config.train
    config = apply_overrides(config, [f"train.steps={last + 1}", f"train.eval_every={10 * last}",
                                      f"train.checkpoint_every={10 * last}", "train.log_every=1"])
    data = prepare_data(config.data.corpus, config.model.vocab_size, tc.seq_len, config.model.mtp_depth,
                        cache_dir=config.data.cache_dir, batch_size=tc.batch_size, verbose=False)
    with tempfile.TemporaryDirectory() as run_dir:
        # stop_after one step short of train.steps: the final evaluation and checkpoint never run
        train(config, run_dir, data, show_progress=False, stop_after=last)
        records = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r.get("kind") == "train"]
    window = [r["tokens_per_s"] for r in records if first < r["step"] <= last]
    # every record's rate covers one step; the mean of per-step times is the loop's throughput
    per_step_s = statistics.mean(tc.batch_size * tc.seq_len / rate for rate in window)
    return {"tokens_per_s": round(tc.batch_size * tc.seq_len / per_step_s, 1), "steps": f"{first + 1}..{last}",
            "median_tokens_per_s": round(statistics.median(window), 1)}


def matmul_peak_gflops() -> float:
    """This backend's fp32 GEMM rate: the best of a few jitted square matmuls (the MFU denominator)."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
        mm = jax.jit(lambda x, y: x @ y)
        mm(a, b).block_until_ready()
        reps = max(3, int(2e10 / (2 * n ** 3)))
        t0 = time.perf_counter()
        for _ in range(reps):
            out = mm(a, b)
        out.block_until_ready()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best / 1e9


def compare_with_hf(config: Config, ours: dict, hf_json: str) -> dict:
    """Our bare step against `hf_train_throughput.py`'s JSON: tokens/s ratio and MFU of each side (model FLOPs
    per token x tokens/s over that framework's own measured fp32 matmul peak)."""
    from dsv3_jax.aot import model_flops_per_token

    with open(hf_json) as f:
        hf = json.load(f)
    flops_per_token = model_flops_per_token(config)
    ours_peak = matmul_peak_gflops()
    return {"hf": hf, "speedup_vs_hf": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
            "model_gflops_per_token": round(flops_per_token / 1e9, 4),
            "ours_matmul_peak_gflops": round(ours_peak, 1),
            "ours_mfu": round(flops_per_token * ours["tokens_per_s"] / (ours_peak * 1e9), 4),
            "hf_mfu": round(flops_per_token * hf["tokens_per_s"] / (hf["matmul_peak_gflops"] * 1e9), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--modes", nargs="+", default=["bare", "trainer"], choices=["bare", "trainer"])
    parser.add_argument("--steps", type=int, default=30, help="timed bare steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--trainer-from", type=int, default=5)
    parser.add_argument("--trainer-to", type=int, default=50)
    parser.add_argument("--mtp", type=int, default=1, help="MTP depth (0 for the comparison with HF)")
    parser.add_argument("--write-hf-config", metavar="PATH", default=None,
                        help="write the model's HF config.json (for hf_train_throughput.py) and exit")
    parser.add_argument("--vs-hf", metavar="JSON", default=None,
                        help="hf_train_throughput.py's output: add tokens/s ratio and MFU of both sides")
    args = parser.parse_args()
    config = build_config(args)
    if args.write_hf_config:
        with open(args.write_hf_config, "w") as f:
            json.dump(to_hf(config.model), f, indent=2)
        return
    out = {"config": {"preset": args.preset, "batch": config.train.batch_size, "seq": config.train.seq_len,
                      "grad_accum": config.train.grad_accum, "moe_dispatch": config.model.moe_dispatch,
                      "scan_layers": config.model.scan_layers, "remat": config.model.remat, "set": args.set or []},
           "device": str(jax.devices()[0]), "backend": jax.default_backend()}
    if "bare" in args.modes:
        out["bare"] = bare(config, args.steps, args.warmup)
    if "trainer" in args.modes:
        out["trainer"] = trainer(config, args.trainer_from, args.trainer_to)
    if args.vs_hf and "bare" in out:
        out["vs_hf"] = compare_with_hf(config, out["bare"], args.vs_hf)
    if "bare" in out and "trainer" in out:
        out["trainer_vs_bare"] = round(out["trainer"]["tokens_per_s"] / out["bare"]["tokens_per_s"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
