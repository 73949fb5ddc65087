"""What rematerialisation buys: XLA's compiled temp memory and the step time of each `model.remat` policy.

The small preset's widths at --layers layers (default 16) and batch --batch x --seq (default 8 x 1024), scanned,
compiled on this machine's backend. Memory comes from `compiled.memory_analysis()` (temp bytes: activations
and gradients; arguments: the donated state and batch); `plan` gives its own estimate beside it. Step time is
the median of --steps timed steps (after one warm-up); --no-time skips running (compile-only, e.g. for
configurations that do not fit this machine).

    python benchmarks/remat_memory.py
    python benchmarks/remat_memory.py --layers 8 --seq 256 --steps 3

Prints one JSON object: config and one row per policy with temp_gib, argument_gib, plan_activations_gib
(+ gradients), plan_vs_xla, step_s, and temp_vs_none / step_vs_none ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._step import compile_step  # noqa: E402
from dsv3_jax.config import get_preset  # noqa: E402
from dsv3_jax.plan import estimate_memory  # noqa: E402
from dsv3_jax.train.config import TrainConfig  # noqa: E402

GIB = 2 ** 30


def one(policy: str, args) -> dict:
    model_cfg = get_preset("small").replace(num_hidden_layers=args.layers, remat=policy,
                                            moe_dispatch=args.dispatch)
    train_cfg = TrainConfig(batch_size=args.batch, seq_len=args.seq)
    compiled, times, setup = compile_step(model_cfg, train_cfg)
    mem = compiled.memory_analysis()
    plan = estimate_memory(model_cfg, train_cfg, {})
    row = {"remat": policy, "temp_gib": round(mem.temp_size_in_bytes / GIB, 3),
           "argument_gib": round(mem.argument_size_in_bytes / GIB, 3),
           "plan_activations_gib": round((plan.activations + plan.gradients) / GIB, 3),
           "plan_vs_xla": round((plan.activations + plan.gradients) / mem.temp_size_in_bytes, 3),
           "compile_s": round(times["compile_s"], 1)}
    if not args.no_time:
        state = setup.init_state()
        window = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1 + model_cfg.mtp_depth), 0,
                                    model_cfg.vocab_size, dtype=jnp.int32)
        state, metrics = compiled(state, window)
        jax.block_until_ready(metrics)
        durations = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, window)
            jax.block_until_ready(metrics)
            durations.append(time.perf_counter() - t0)
        row["step_s"] = round(statistics.median(durations), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dispatch", default="blocked")
    parser.add_argument("--policies", nargs="+", default=["none", "minimal", "full"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-time", action="store_true")
    args = parser.parse_args()
    rows = []
    for policy in args.policies:
        rows.append(one(policy, args))
        print(json.dumps(rows[-1]), file=sys.stderr)
    base = next((r for r in rows if r["remat"] == "none"), None)
    for row in rows:
        if base is not None:
            row["temp_vs_none"] = round(row["temp_gib"] / base["temp_gib"], 3)
            if "step_s" in row:
                row["step_vs_none"] = round(row["step_s"] / base["step_s"], 3)
    print(json.dumps({"config": {"preset": "small", "layers": args.layers, "batch": args.batch, "seq": args.seq,
                                 "dispatch": args.dispatch, "scan_layers": True,
                                 "device": str(jax.devices()[0])}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
