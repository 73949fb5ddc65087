"""The kernel call sites under a mesh, run by tests/test_kernels.py in a fresh process on 8 fake CPU devices:
the tiny model with attention_impl=flash (splash in interpret mode, run per shard by shard_map with heads over
`tensor`) and grouped_gemm=kernel (tokamax's grouped matmul, reference path, inside the expert-parallel
shard_map) against the same model with XLA attention and the `blocks` GEMM, loss and gradients. Prints one JSON
object on its last line; the test judges it.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dsv3_jax import sharding  # noqa: E402
from dsv3_jax.config import get_preset  # noqa: E402
from dsv3_jax.model import DeepSeekV3  # noqa: E402
from dsv3_jax.partitioning import use_plan  # noqa: E402


def loss_and_grads(cfg, plan, tokens):
    model = DeepSeekV3(cfg, nnx.Rngs(params=0))
    tokens = jax.device_put(tokens, plan.batch_sharding())
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(tokens)[0]
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

    params = jax.device_put(params, plan.shardings(params))
    rest = jax.device_put(rest, plan.replicated())
    with use_plan(plan):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return float(loss), jax.tree.leaves(grads)


def main() -> None:
    base = get_preset("tiny").replace(moe_dispatch="ragged")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, base.vocab_size, (8, 24)), jnp.int32)
    report = {}
    for name, mesh in {"data4_tensor2": (4, 1, 2), "expert4_tensor2": (1, 4, 2)}.items():
        plan = sharding.plan_for(*mesh, devices=jax.devices())
        ref_loss, ref_grads = loss_and_grads(base.replace(attention_impl="xla", grouped_gemm="blocks"), plan, tokens)
        got_loss, got_grads = loss_and_grads(base.replace(attention_impl="flash", grouped_gemm="kernel"), plan,
                                             tokens)
        scale = max(float(np.max(np.abs(g))) for g in ref_grads)
        report[name] = {"loss": [ref_loss, got_loss],
                        "grad_max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(got_grads, ref_grads)),
                        "grad_scale": scale}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
