"""What one MLA layer of DeepSeek-V3 costs in memory on an accelerator target, per attention implementation.

Compiles one `dsv3_jax.mla.MLA` layer at the 671B preset's dims (128 heads, q/k 192, v 128, projections
included), forward + backward in bf16, for a GPU or TPU target on this host (deviceless, as `compile` does),
through the public module with each `model.attention_impl`:

* `auto`: what backend_policy.choose picks on the target (the fused kernel: splash on TPU, tokamax on GPU);
* `xla`: `mla.attend_causal` unchunked: fp32 [B, H, T, S] scores and probabilities exist whole;
* `chunked 512`: `model.attention_chunk=512`, one checkpointed [B, H, 512, S] slice at a time.

For each it reports the temporaries per device, whether the program holds a kernel custom call, and the
matmul FLOPs `hlo_cost` counts (kernels counted from their recorded geometry) over the layer's useful ones.

    .venv-tpu/bin/python benchmarks/attention_memory.py --target v5p:2x2x1
    .venv-gpu/bin/python benchmarks/attention_memory.py --target h100:1

Prints one JSON object: {"target", "seq", "heads", "batch", "rows": [{"case", "attention", "temporaries_gib",
"kernel_calls", "flops_over_useful"} or {"case", "error"}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3_jax.aot import parse_target, target_devices  # noqa: E402



def useful_flops(cfg, batch: int, seq: int) -> float:
    """The layer's forward + backward matmul FLOPs: 3 x (projections + causal attention's two products)."""
    h = cfg.num_attention_heads
    d, ql, kl = cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank
    proj = d * ql + ql * h * cfg.qk_head_dim + d * cfg.kv_cache_dim + kl * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    proj += h * cfg.v_head_dim * d
    attention = h * (seq + 1) / 2 * (cfg.qk_head_dim + cfg.v_head_dim)  # per token, causal
    return 3 * 2.0 * batch * seq * (proj + attention)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    target = parse_target(args.target)
    devices = target_devices(target)[:1]

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dsv3_jax.backend_policy import choose
    from dsv3_jax.config import get_preset
    from dsv3_jax.hlo_cost import analyse
    from dsv3_jax.mla import MLA

    mesh = jax.sharding.Mesh(devices, ("x",))
    replicated = NamedSharding(mesh, P())
    base = get_preset("deepseek-v3-671b").replace(dtype="bfloat16", param_dtype="bfloat16")
    b, t = args.batch, args.seq
    rows = []
    for case, overrides in (("auto", {}), ("xla", dict(attention_impl="xla")),
                            ("chunked 512", dict(attention_impl="chunked", attention_chunk=512))):
        cfg = base.replace(**overrides).validate()
        graphdef, state = nnx.split(nnx.eval_shape(lambda c=cfg: MLA(c, nnx.Rngs(params=0))))
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state)
        x = jax.ShapeDtypeStruct((b, t, cfg.hidden_size), jnp.bfloat16, sharding=replicated)

        def loss(state, x, graphdef=graphdef):
            positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            return jnp.sum(nnx.merge(graphdef, state)(x, positions).astype(jnp.float32))

        try:
            with jax.default_device(devices[0]):  # the target's backend decides `auto` and the kernels
                compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
        except Exception as err:  # noqa: BLE001 - not compiling is the finding
            rows.append({"case": case, "error": str(err).splitlines()[0][:300]})
            continue
        hlo = compiled.as_text()
        cost = analyse(hlo)
        flops = cost["matmul_flops"]
        rows.append({"case": case, "attention": choose(cfg, target.platform).attention,
                     "temporaries_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2 ** 30, 3),
                     "kernel_calls": cost["kernel_calls"].get("attention", 0),
                     "flops_over_useful": round(flops / useful_flops(cfg, b, t), 3)})
    print(json.dumps({"target": args.target, "seq": t, "heads": base.num_attention_heads, "batch": b,
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
