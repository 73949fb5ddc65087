"""The kernel call sites under a mesh, run by tests/test_kernels.py in a fresh process on 8 fake CPU devices:
the tiny model with attention_impl=flash (splash in interpret mode, run per shard by shard_map with heads over
`tensor`) and grouped_gemm=kernel (tokamax's grouped matmul, reference path, inside the expert-parallel
shard_map) against the same model with XLA attention and the `blocks` GEMM, loss and gradients; and the training
objective with loss_impl=chunked (the head's cross-entropy in chunks of positions, vocabulary over `tensor`)
against whole logits. Prints one JSON object on its last line; the test judges it.
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


def objective_and_grads(cfg, plan, window):
    """The training objective (train.step._forward: the backend policy's loss) and its parameter gradients."""
    from dsv3_jax.train.config import TrainConfig
    from dsv3_jax.train.step import _forward

    train_cfg = TrainConfig(seq_len=window.shape[1] - 1 - cfg.mtp_depth, batch_size=window.shape[0])
    model = DeepSeekV3(cfg, nnx.Rngs(params=0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, plan.shardings(params))
    rest = jax.device_put(rest, plan.replicated())
    window = jax.device_put(window, plan.batch_sharding())
    with use_plan(plan):
        loss, grads = jax.jit(jax.value_and_grad(
            lambda p: _forward(graphdef, p, rest, window, cfg, train_cfg)[0]))(params)
    return float(loss), jax.tree.leaves(grads)


def entry(reference, got) -> dict:
    (ref_loss, ref_grads), (got_loss, got_grads) = reference, got
    return {"loss": [ref_loss, got_loss],
            "grad_max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(got_grads, ref_grads)),
            "grad_scale": max(float(np.max(np.abs(g))) for g in ref_grads)}


def main() -> None:
    base = get_preset("tiny").replace(moe_dispatch="ragged")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, base.vocab_size, (8, 24)), jnp.int32)
    report = {}
    for name, mesh in {"data4_tensor2": (4, 1, 2), "expert4_tensor2": (1, 4, 2)}.items():
        plan = sharding.plan_for(*mesh, devices=jax.devices())
        report[name] = entry(loss_and_grads(base.replace(attention_impl="xla", grouped_gemm="blocks"), plan, tokens),
                             loss_and_grads(base.replace(attention_impl="flash", grouped_gemm="kernel"), plan, tokens))
    # the chunked LM-head loss, 8-position chunks (several per head), the vocabulary split over tensor
    from dsv3_jax import backend_policy
    backend_policy.LOSS_CHUNK_POSITIONS = 8
    window = jnp.asarray(np.random.default_rng(1).integers(0, base.vocab_size, (8, 21 + 1 + base.mtp_depth)),
                         jnp.int32)
    plan = sharding.plan_for(4, 1, 2, devices=jax.devices())
    report["chunked_loss_data4_tensor2"] = entry(objective_and_grads(base.replace(loss_impl="xla"), plan, window),
                                                 objective_and_grads(base.replace(loss_impl="chunked"), plan, window))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
