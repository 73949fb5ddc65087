"""Train-step time of each FP8 emulation recipe against plain high-precision GEMMs (model.fp8=none).

Builds the real jitted train step (`dsv3_jax.train.setup.build_training`: forward, backward, AdamW, bias
update) for the `small` preset once per recipe, compiles every case first and then times them round-robin, so
load from other processes drifts over every case alike. The FP8 recipes are emulations (quantise to a real
FP8 payload, dequantise, multiply in float32), so on a CPU they can only cost time: this measures what the
emulation adds, not what FP8 tensor cores would save.

    python benchmarks/fp8_overhead.py                                   # none, deepseek, per_tensor; 8 x 256
    python benchmarks/fp8_overhead.py --recipes none deepseek deepseek:pow2 --repeats 7 --dtype bfloat16

Prints one JSON object: {"config": ..., "rows": [...]}; each row has the recipe, ms (median wall time of a
step), min_ms, cpu_ms (process CPU time, all threads), ratio_vs_none (wall and CPU), compile_s and XLA's
temp_bytes (activation + workspace memory of the compiled step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from dsv3_jax.config import get_preset  # noqa: E402
from dsv3_jax.train.presets import train_preset  # noqa: E402
from benchmarks._step import one_device_setup  # noqa: E402


def model_config(preset: str, recipe: str, dtype: str):
    """`recipe` is a model.fp8 value, optionally with ':pow2' (power-of-2 scales) or ':accN' (accumulation model)."""
    name, *knobs = recipe.split(":")
    changes = {"fp8": name, "dtype": dtype}
    for knob in knobs:
        if knob == "pow2":
            changes["fp8_power_of_2_scales"] = True
        elif knob.startswith("acc"):
            changes["fp8_accumulation_interval"] = int(knob[3:])
        else:
            raise SystemExit(f"error: unknown recipe knob {knob!r} in {recipe!r} (use :pow2 or :accN)")
    return get_preset(preset).replace(**changes).validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--recipes", nargs="+", default=["none", "deepseek", "per_tensor"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32", help="model.dtype (compute dtype outside the FP8 GEMMs)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if "none" not in args.recipes:
        args.recipes.insert(0, "none")

    train_cfg = dataclasses.replace(train_preset(args.preset), batch_size=args.batch_size, seq_len=args.seq_len)
    cases = {}
    for recipe in args.recipes:
        model_cfg = model_config(args.preset, recipe, args.dtype)
        setup = one_device_setup(model_cfg, train_cfg)
        state = setup.init_state()
        window = setup.put_batch(jax.random.randint(jax.random.key(0), setup.window.shape, 0, model_cfg.vocab_size))
        t0 = time.perf_counter()
        compiled = setup.train_step.lower(setup.abstract, setup.window).compile()
        compile_s = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        state, metrics = compiled(state, window)  # warm-up run
        jax.block_until_ready(metrics)
        cases[recipe] = {"step": compiled, "state": state, "window": window, "compile_s": compile_s,
                         "temp_bytes": getattr(memory, "temp_size_in_bytes", None), "wall": [], "cpu": [],
                         "loss": float(metrics["loss"])}
        print(f"compiled {recipe} in {compile_s:.1f} s", file=sys.stderr)

    for round_index in range(args.repeats):
        for recipe, case in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            case["state"], metrics = case["step"](case["state"], case["window"])
            jax.block_until_ready(metrics)
            case["wall"].append(time.perf_counter() - t0)
            case["cpu"].append(time.process_time() - c0)
        print(f"round {round_index + 1}/{args.repeats} done", file=sys.stderr)

    base_wall = statistics.median(cases["none"]["wall"])
    base_cpu = statistics.median(cases["none"]["cpu"])
    rows = []
    for recipe, case in cases.items():
        wall, cpu = statistics.median(case["wall"]), statistics.median(case["cpu"])
        rows.append({"recipe": recipe, "ms": round(1e3 * wall, 1), "min_ms": round(1e3 * min(case["wall"]), 1),
                     "cpu_ms": round(1e3 * cpu, 1), "ratio_vs_none": round(wall / base_wall, 3),
                     "cpu_ratio_vs_none": round(cpu / base_cpu, 3), "compile_s": round(case["compile_s"], 1),
                     "temp_bytes": case["temp_bytes"], "first_step_loss": round(case["loss"], 5)})
    config = {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
              "repeats": args.repeats, "backend": jax.default_backend(), "devices": jax.device_count(),
              "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "jax": jax.__version__}
    print(json.dumps({"config": config, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
