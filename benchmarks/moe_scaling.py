"""MoE layer forward+backward wall time against the number of routed experts, per dispatch strategy.

Top-k and expert width stay fixed while the expert count grows, so the useful (active) FLOPs per token stay
constant; an ideal dispatch keeps the time flat. The reference is a dense SwiGLU MLP with the same active
FLOPs (width K x F, plus the shared experts' width). Each case builds `dsv3_jax.moe.MoE` with config
replacements (n_group = topk_group = 1), compiles `jax.jit(jax.grad(loss))` w.r.t. the parameters and the
input, and reports the median of several timed runs after compilation. All cases are compiled first and
then timed round-robin, so that load from other processes drifts over every case alike; besides the wall
time each row has the process CPU time (all threads), the steadier figure on a shared machine.

    python benchmarks/moe_scaling.py                      # N=4096, D=256, F=128, K=4, 8/32/128/256 experts
    python benchmarks/moe_scaling.py --experts 8 64 --repeats 3 --dispatch capacity blocked

Prints one JSON object: {"config": ..., "rows": [...], "target": ...}; each row has experts, dispatch,
capacity_factor, ms, ratio_vs_8_experts, ratio_vs_dense_mlp, dropped_fraction. A case whose per-layer
dispatch buffers would exceed --max-buffer-gib is reported with ms null and a `skipped` reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax.config import get_preset  # noqa: E402
from dsv3_jax.layers import MLP  # noqa: E402
from dsv3_jax.moe import SPILL_CAPACITY_FACTOR, MoE, expert_capacity  # noqa: E402

TARGET = {"dispatch": "capacity", "capacity_factor": 1.25, "max_ratio_vs_8_experts_at_256": 1.3,
          "max_ratio_vs_dense_mlp": 2.0}


def model_config(args, experts: int, dispatch: str, capacity_factor: float | None):
    return get_preset("small").replace(
        hidden_size=args.dim, moe_intermediate_size=args.width, n_routed_experts=experts,
        num_experts_per_tok=args.top_k, n_group=1, topk_group=1, n_shared_experts=args.shared,
        moe_dispatch=dispatch, capacity_factor=capacity_factor, dtype=args.dtype, param_dtype="float32",
        init_std=args.init_std).validate()


def buffer_bytes(args, experts: int, dispatch: str, capacity_factor: float | None) -> int:
    """Largest single routed-expert activation of one layer (what decides whether a case fits)."""
    itemsize = jnp.dtype(args.dtype).itemsize
    n, k, d, f = args.tokens, args.top_k, args.dim, args.width
    if dispatch == "dense":
        return n * experts * max(d, f) * itemsize
    if dispatch == "capacity":
        # dropless on one device: SPILL_CAPACITY_FACTOR x the fair share of slots plus the spill rows (N*K)
        factor = SPILL_CAPACITY_FACTOR if capacity_factor is None else capacity_factor
        return max(experts * expert_capacity(n, k, experts, factor), n * k) * max(d, f) * itemsize
    blocks = -(-(n * k + experts * 127) // 128)
    return max(blocks * 128 * d, blocks * d * f) * itemsize


def make_input(args) -> jax.Array:
    seq = args.seq if args.tokens % args.seq == 0 else args.tokens
    x = jax.random.normal(jax.random.key(1), (args.tokens // seq, seq, args.dim), jnp.float32)
    return x.astype(args.dtype)


def prepare_moe(args, experts: int, dispatch: str, capacity_factor: float | None):
    """(row, compiled grad fn, its inputs), or (row with a `skipped` reason, None, None)."""
    row = {"experts": experts, "dispatch": dispatch, "capacity_factor": capacity_factor}
    need = buffer_bytes(args, experts, dispatch, capacity_factor)
    if need > args.max_buffer_gib * 2 ** 30:
        return {**row, "ms": None, "skipped": f"one dispatch buffer would take {need / 2 ** 30:.2f} GiB "
                f"(> --max-buffer-gib {args.max_buffer_gib})"}, None, None
    cfg = model_config(args, experts, dispatch, capacity_factor)
    graphdef, params, rest = nnx.split(MoE(cfg, nnx.Rngs(params=0)), nnx.Param, ...)

    def loss(params, x):
        out, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.mean(jnp.square(out.astype(jnp.float32))), aux.dropped_fraction

    return row, jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)), (params, make_input(args))


def prepare_dense_mlp(args):
    width = (args.top_k + args.shared) * args.width
    cfg = model_config(args, 8, "capacity", None)
    graphdef, params = nnx.split(MLP(args.dim, width, cfg, nnx.Rngs(params=0)), nnx.Param)

    def loss(params, x):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params)(x).astype(jnp.float32)))

    row = {"experts": None, "dispatch": "dense_mlp", "capacity_factor": None, "width": width}
    return row, jax.jit(jax.grad(loss, argnums=(0, 1))), (params, make_input(args))


def run_all(cases, repeats: int) -> None:
    """Compile every case, then time them round-robin (`repeats` rounds) so that load from other processes
    drifts over all cases alike. Fills ms / min_ms (wall) and cpu_ms (process CPU time, all threads)."""
    live = [(row, fn, inputs) for row, fn, inputs in cases if fn is not None]
    for row, fn, inputs in live:
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*inputs))
        row["compile_s"] = round(time.perf_counter() - start, 1)
        row["dropped_fraction"] = round(float(out[1]), 4) if row["dispatch"] != "dense_mlp" else 0.0
        row["_wall"], row["_cpu"] = [], []
        print(f"compiled {row['dispatch']} cf={row['capacity_factor']} E={row['experts']}", file=sys.stderr,
              flush=True)
    for _ in range(repeats):
        for row, fn, inputs in live:
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*inputs))
            row["_wall"].append((time.perf_counter() - start) * 1e3)
            row["_cpu"].append((time.process_time() - start_cpu) * 1e3)
    for row, _, _ in live:
        wall, cpu = row.pop("_wall"), row.pop("_cpu")
        row.update(ms=round(statistics.median(wall), 2), min_ms=round(min(wall), 2),
                   cpu_ms=round(statistics.median(cpu), 2))


def target_check(rows: list[dict], base_e: int) -> dict | None:
    """The issue's target on the measured rows: capacity at the target factor, largest expert count."""
    cap = [r for r in rows if r["dispatch"] == TARGET["dispatch"] and r["capacity_factor"] ==
           TARGET["capacity_factor"] and r.get("ms") is not None]
    if not cap:
        return None
    last = max(cap, key=lambda r: r["experts"])
    vs_base, vs_dense = last[f"ratio_vs_{base_e}_experts"], max(r["ratio_vs_dense_mlp"] for r in cap)
    return {"experts": last["experts"], f"ratio_vs_{base_e}_experts": vs_base, "max_ratio_vs_dense_mlp": vs_dense,
            "meets_scaling_target": vs_base is not None and vs_base <= TARGET["max_ratio_vs_8_experts_at_256"],
            "meets_dense_target": vs_dense <= TARGET["max_ratio_vs_dense_mlp"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128, 256])
    p.add_argument("--dispatch", nargs="+", default=["dense", "capacity:1.25", "capacity:none", "blocked"],
                   help="strategies; capacity takes :FACTOR or :none (dropless)")
    p.add_argument("--tokens", type=int, default=4096, help="N tokens per step")
    p.add_argument("--seq", type=int, default=512, help="sequence length the N tokens are cut into")
    p.add_argument("--dim", type=int, default=256, help="D hidden size")
    p.add_argument("--width", type=int, default=128, help="F expert width")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--shared", type=int, default=1, help="shared experts (0 for none)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-buffer-gib", type=float, default=0.25,
                   help="skip cases whose largest routed-expert buffer exceeds this")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cases = []
    for spec in args.dispatch:
        name, _, factor = spec.partition(":")
        cf = None if factor in ("", "none", "None") or name != "capacity" else float(factor)
        cases.append((name, cf))
    cases = [prepare_dense_mlp(args)] + [prepare_moe(args, e, name, cf) for name, cf in cases for e in args.experts]
    run_all(cases, args.repeats)
    rows = [row for row, _, _ in cases]
    dense_ms = rows[0]["ms"]
    base_e = min(args.experts)
    for row in rows:
        base = next((r for r in rows if r["dispatch"] == row["dispatch"] and r["capacity_factor"] ==
                     row["capacity_factor"] and r["experts"] == base_e), None)
        ok = row["ms"] is not None
        row[f"ratio_vs_{base_e}_experts"] = (round(row["ms"] / base["ms"], 3)
                                            if ok and base and base.get("ms") and row["experts"] else None)
        row["ratio_vs_dense_mlp"] = round(row["ms"] / dense_ms, 3) if ok else None
        if ok:  # the same two ratios from CPU time, which other processes on the machine disturb less
            row[f"cpu_ratio_vs_{base_e}_experts"] = (round(row["cpu_ms"] / base["cpu_ms"], 3)
                                                    if base and base.get("ms") and row["experts"] else None)
            row["cpu_ratio_vs_dense_mlp"] = round(row["cpu_ms"] / rows[0]["cpu_ms"], 3)
    result = {"config": {k: v for k, v in vars(args).items()}, "jax": jax.__version__,
              "backend": jax.default_backend(), "devices": len(jax.devices()), "rows": rows, "target": TARGET,
              "target_check": target_check(rows, base_e)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
