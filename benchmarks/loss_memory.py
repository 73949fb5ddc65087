"""What DeepSeek-V3's LM-head loss costs in memory on an accelerator target, per loss implementation.

Compiles the training objective's head part at the 671B preset's dims (hidden 7,168, vocabulary 129,280; the
main head and the one MTP head, each scoring `--seq` positions), forward + backward in bf16 with fp32 master
weights, for a GPU or TPU target on this host (deviceless, as `compile` does), through the public code
(`train.losses.head_score` + `objective` over a `layers.Linear` head) with each `model.loss_impl`:

* `auto`: what backend_policy.choose picks on the target (`chunked` on GPU/TPU);
* `xla`: whole fp32 logits [B, T, V] per head, kept with their log-softmax for the backward pass;
* `chunked`: head_loss.chunked_cross_entropy, one [B, 512, V] slice at a time, recomputed in the backward.

On TPU it also compiles tokamax's fused `linear_softmax_cross_entropy_loss` (Mosaic TPU) on the same heads,
one device, as the field's alternative. Each row reports the temporaries per device and the matmul FLOPs over
the useful ones (forward + backward of the head GEMM: 6 N D V per head).

    .venv-tpu/bin/python benchmarks/loss_memory.py --target v5p:2x2x1
    .venv-gpu/bin/python benchmarks/loss_memory.py --target h100:1

Prints one JSON object: {"target", "seq", "batch", "vocab", "rows": [{"case", "loss", "temporaries_gib",
"flops_over_useful"} or {"case", "error"}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3_jax.aot import parse_target, target_devices  # noqa: E402


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
    from dsv3_jax.layers import Linear
    from dsv3_jax.model import Aux
    from dsv3_jax.train.config import TrainConfig
    from dsv3_jax.train.losses import head_score, objective

    mesh = jax.sharding.Mesh(devices, ("x",))
    replicated = NamedSharding(mesh, P())
    base = get_preset("deepseek-v3-671b").replace(dtype="bfloat16", param_dtype="float32")
    b, t, d, v = args.batch, args.seq, base.hidden_size, base.vocab_size
    train_cfg = TrainConfig(seq_len=t, batch_size=b)
    depth = base.mtp_depth
    useful = (1 + depth) * 6.0 * b * t * d * v

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    hidden = [spec((b, t + depth, d), jnp.bfloat16)] + [spec((b, t + depth - k, d), jnp.bfloat16)
                                                         for k in range(1, depth + 1)]
    window = spec((b, t + 1 + depth), jnp.int32)

    def compiled_row(case, fn, *operands):
        try:
            with jax.default_device(devices[0]):  # the target's backend decides `auto` and the kernels
                compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*operands).compile()
        except Exception as err:  # noqa: BLE001 - not compiling is the finding
            return {"case": case, "error": str(err).splitlines()[0][:300]}
        return {"case": case,
                "temporaries_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2 ** 30, 3),
                "flops_over_useful": round(analyse(compiled.as_text())["matmul_flops"] / useful, 3)}

    rows = []
    for case in ("auto", "xla", "chunked"):
        cfg = base.replace(loss_impl=case).validate()
        graphdef, state = nnx.split(nnx.eval_shape(
            lambda c=cfg: Linear(c.hidden_size, c.vocab_size, c, nnx.Rngs(params=0), ("embed", "vocab"))))
        state = jax.tree.map(lambda s: spec(s.shape, s.dtype), state)
        impl = choose(cfg, target.platform)

        def loss(state, hidden, window, graphdef=graphdef, impl=impl, cfg=cfg):
            head = nnx.merge(graphdef, state)
            head_inputs, score = head_score(head, impl)
            outs = hidden if head_inputs else [head(h).astype(jnp.float32) for h in hidden]
            aux = Aux(moe=None, mtp_logits=() if head_inputs else tuple(outs[1:]), mtp_moe=(),
                      mtp_head_inputs=tuple(outs[1:]) if head_inputs else ())
            return objective(outs[0], aux, window, train_cfg, cfg.mtp_depth, score, head_inputs)[0]

        rows.append({**compiled_row(case, loss, state, hidden, window), "loss": impl.loss})

    if target.platform == "tpu":
        from dsv3_jax.kernels import tokamax_module

        def fused(kernel, hidden, window):
            total = 0.0
            for k, h in enumerate(hidden):
                x = h[:, :t].reshape(b * t, d)
                labels = window[:, k + 1:t + k + 1].reshape(b * t)
                total = total + tokamax_module().linear_softmax_cross_entropy_loss(
                    x, labels, kernel.astype(jnp.bfloat16), reduction="mean", implementation="mosaic_tpu")
            return total

        rows.append({**compiled_row("tokamax mosaic_tpu", fused, spec((d, v), jnp.float32), hidden, window),
                     "loss": "tokamax"})
    print(json.dumps({"target": args.target, "seq": t, "batch": b, "vocab": v, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
