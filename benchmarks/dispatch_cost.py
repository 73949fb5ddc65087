"""Compiled cost of each MoE dispatch on an accelerator target, from XLA's own optimised program.

For one MoE layer (router + routed experts, forward and backward w.r.t. parameters and input) this compiles
every dispatch path for a TPU or GPU target on this host (as `python -m dsv3_jax compile` does) and reports,
per path, the matmul FLOPs of the optimised HLO (dsv3_jax/hlo_cost.py, loops expanded) over the useful ones,
and the temporaries per device (`memory_analysis`). Useful FLOPs: 3 x (2 N K 3 D F for the K chosen experts
+ 2 N D E for the router), forward plus a backward of twice the forward. No kernel runs, so nothing here
is a time: it shows which paths XLA turns into wasted work on which backend, which is what `auto` decides on.

    .venv-gpu/bin/python benchmarks/dispatch_cost.py --target h100:1
    .venv-gpu/bin/python benchmarks/dispatch_cost.py --target h100:8 --expert 8
    .venv-tpu/bin/python benchmarks/dispatch_cost.py --target v5p:1x1x1
    .venv-tpu/bin/python benchmarks/dispatch_cost.py --target v5p:2x2x1 --expert 4

Default shape: 4,096 tokens, hidden 1024, expert width 256, 64 experts top-8, no shared experts, bf16
(`--v3` for DeepSeek-V3's hidden 7168, width 2048, 256 experts top-8 at 4,096 tokens per device). Prints one
JSON object: {"target", "shape", "rows": [{"case", "moe_dispatch", "grouped_gemm", "capacity_factor",
"flops_over_useful", "temporaries_gib", "compile_s", "collectives"}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3_jax.aot import parse_target, target_devices  # noqa: E402

# (case, moe_dispatch, grouped_gemm, capacity_factor); "auto" rows are decided for the target (backend_policy).
CASES = (
    ("auto", "auto", "auto", None),
    ("ragged + kernel", "ragged", "kernel", None),
    ("ragged + kernel, exchange 1.25", "ragged", "kernel", 1.25),
    ("capacity (dropless)", "capacity", "auto", None),
    ("capacity 1.25", "capacity", "auto", 1.25),
    ("blocked", "blocked", "auto", None),
    ("ragged + ragged_dot", "ragged", "ragged_dot", None),
    ("ragged + blocks", "ragged", "blocks", None),
    ("ragged + ragged_dot, exchange 1.25", "ragged", "ragged_dot", 1.25),
    ("ragged + blocks, exchange 1.25", "ragged", "blocks", 1.25),
    ("dense (oracle)", "dense", "auto", None),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="e.g. h100:1, h100:8, v5p:1x1x1, v5p:2x2x1")
    p.add_argument("--expert", type=int, default=1, help="expert-parallel mesh size (the rest is data)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per expert-parallel group")
    p.add_argument("--v3", action="store_true", help="DeepSeek-V3's MoE shape instead of the default")
    p.add_argument("--cases", nargs="*", default=None, help="subset of case names (default: all)")
    return p.parse_args(argv)


def run_case(args, devices, platform: str, case: tuple) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv3_jax import sharding
    from dsv3_jax.backend_policy import choose
    from dsv3_jax.config import get_preset
    from dsv3_jax.hlo_cost import analyse
    from dsv3_jax.moe import MoE
    from dsv3_jax.partitioning import use_plan

    name, dispatch, grouped_gemm, factor = case
    dim, width, experts, top_k = (7168, 2048, 256, 8) if args.v3 else (1024, 256, 64, 8)
    cfg = (get_preset("small").replace(
        hidden_size=dim, moe_intermediate_size=width, n_routed_experts=experts, num_experts_per_tok=top_k,
        n_group=8, topk_group=4 if args.v3 else 8, n_shared_experts=0, moe_dispatch=dispatch,
        grouped_gemm=grouped_gemm, capacity_factor=factor, dtype="bfloat16", param_dtype="float32").validate())
    n_dev = len(devices)
    plan = sharding.plan_for(n_dev // args.expert, args.expert, 1, devices=devices)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: MoE(cfg, nnx.Rngs(params=0))), nnx.Param, ...)
    n_tokens = args.tokens * (n_dev // args.expert)

    def loss(params, x, rest):  # traced under the `use_plan` below
        out, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    p_shard = plan.shardings(params)
    abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, p_shard)
    abstract_rest = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=plan.replicated()), rest)
    x = jax.ShapeDtypeStruct((n_tokens // 256, 256, dim), jnp.bfloat16, sharding=plan.named(plan.spec(("batch",))))
    t0 = time.perf_counter()
    impl = choose(cfg, platform, plan.facts(), n_tokens)
    with use_plan(plan), jax.default_device(devices[0]):  # the target decides `auto` and the kernels
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(abstract_params, x, abstract_rest).compile()
    compile_s = time.perf_counter() - t0
    hlo = analyse(compiled.as_text())
    flops, source = hlo["matmul_flops"], "hlo matmuls, loops expanded"
    if not flops:  # a program whose matmuls the HLO counter does not know: XLA's own analysis instead
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops, source = float(cost["flops"]), "xla cost analysis (loop bodies once)"
    useful = 3 * (2 * n_tokens * top_k * 3 * dim * width + 2 * n_tokens * dim * experts)
    kernel_calls = hlo["kernel_calls"].get("gmm", 0)
    return {"case": name, "moe_dispatch": impl.moe_dispatch, "grouped_gemm": impl.grouped_gemm,
            "exchange": impl.exchange, "kernel_calls": kernel_calls,
            "capacity_factor": factor, "flops_source": source,
            "flops_over_useful": round(flops * n_dev / useful, 3),
            "temporaries_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2 ** 30, 3),
            "compile_s": round(compile_s, 1), "collectives": {k: v["count"] for k, v in hlo["collectives"].items()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    target = parse_target(args.target)
    devices = target_devices(target)
    rows = []
    for case in CASES:
        if args.cases and case[0] not in args.cases:
            continue
        try:
            rows.append(run_case(args, devices, target.platform, case))
        except Exception as err:  # noqa: BLE001 - a path that does not compile is a result too
            rows.append({"case": case[0], "error": str(err).splitlines()[0][:300]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    shape = "v3" if args.v3 else "4096 tokens/group, D 1024, F 256, 64 experts top-8, bf16"
    print(json.dumps({"target": args.target, "expert": args.expert, "shape": shape, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
