"""What MLA's attention core costs in memory on an accelerator target, with and without a fused kernel.

MLA's heads attend with 192-wide queries/keys (128 nope + 64 rope) and 128-wide values. This compiles the
training attention core (scores, softmax, weighted values; forward and backward w.r.t. q, k, v) of one
DeepSeek-V3 layer (128 heads) for a GPU or TPU target on this host and reports the temporaries per device:

* `xla`: our `mla.attend_causal` unchunked: fp32 [B, H, T, S] scores and probabilities exist whole;
* `xla chunk C`: `model.attention_chunk=C`: one checkpointed [B, H, C, S] slice at a time;
* `jax.nn.dot_product_attention` with `implementation="cudnn"` (GPU) / default, at the real 192/128 head
  dims and with V zero-padded to 192 (the portable route to a fused kernel): whether it compiles at all.

    .venv-gpu/bin/python benchmarks/attention_memory.py --target h100:1
    .venv-tpu/bin/python benchmarks/attention_memory.py --target v5p:1x1x1 --seq 4096

Prints one JSON object: {"target", "seq", "heads", "batch", "rows": [{"case", "temporaries_gib"} or
{"case", "error"}]}.
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
    p.add_argument("--heads", type=int, default=128)
    args = p.parse_args(argv)
    target = parse_target(args.target)
    devices = target_devices(target)[:1]

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dsv3_jax.mla import attend_causal

    mesh = jax.sharding.Mesh(devices, ("x",))
    b, t, h, n, r, v = args.batch, args.seq, args.heads, 128, 64, 128

    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def temporaries(fn, *shapes) -> float:
        compiled = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(len(shapes)))
                                    )).lower(*shapes).compile()
        return round(compiled.memory_analysis().temp_size_in_bytes / 2 ** 30, 3)

    mla_args = (spec(b, t, h, n), spec(b, t, h, r), spec(b, t, h, n), spec(b, t, r), spec(b, t, h, v))
    rows = []
    for chunk in (None, 1024, 512, 256):
        name = "xla" if chunk is None else f"xla chunk {chunk}"
        try:
            rows.append({"case": name, "temporaries_gib": temporaries(
                lambda *a, c=chunk: attend_causal(*a, scale=0.07, chunk=c), *mla_args)})
        except Exception as err:  # noqa: BLE001 - not compiling is the finding
            rows.append({"case": name, "error": str(err).splitlines()[0][:300]})
    implementation = "cudnn" if target.platform == "gpu" else None
    for name, v_dim in (("dot_product_attention, V 128", v), ("dot_product_attention, V padded to 192", n + r)):
        try:
            rows.append({"case": f"{name} ({implementation or 'default'})", "temporaries_gib": temporaries(
                lambda q, k, val: jax.nn.dot_product_attention(q, k, val, is_causal=True,
                                                               implementation=implementation),
                spec(b, t, h, n + r), spec(b, t, h, n + r), spec(b, t, h, v_dim))})
        except Exception as err:  # noqa: BLE001
            rows.append({"case": f"{name} ({implementation or 'default'})", "error": str(err).splitlines()[0][:300]})
    print(json.dumps({"target": args.target, "seq": t, "heads": h, "batch": b, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
