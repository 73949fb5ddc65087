"""hf_init onto 8 fake CPU devices (mesh.fsdp, mesh.expert=4), run by tests/test_hf_init.py in a fresh process:
every parameter and router bias equals from_hf's, the logits of the sharded model equal from_hf's, and the
sharded leaves really are split. Prints one JSON object on its last line."""

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
from dsv3_jax import hf_init  # noqa: E402
from dsv3_jax.convert import from_hf  # noqa: E402
from dsv3_jax.moe import RouterBias  # noqa: E402
from dsv3_jax.partitioning import use_plan  # noqa: E402
from dsv3_jax.train.config import Config, MeshConfig, TrainConfig  # noqa: E402
from dsv3_jax.train.setup import build_training  # noqa: E402


def main(directory: str) -> None:
    _, reference = from_hf(directory, dtype=jnp.float32)
    config = Config(model=reference.cfg, train=TrainConfig(batch_size=8, seq_len=16, init_from=directory),
                    mesh=MeshConfig(data=2, expert=4, fsdp=True))
    setup = build_training(config)
    state = setup.state_from_hf(hf_init.check_checkpoint(directory, config.model))
    _, want_params, want_biases = nnx.split(reference, nnx.Param, RouterBias)
    equal = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                     jax.tree.leaves(jax.device_get(want_params))))
    equal &= all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.biases)),
                                                      jax.tree.leaves(jax.device_get(want_biases))))
    sharded = sum(1 for leaf in jax.tree.leaves(state.params)
                  if leaf.addressable_shards[0].data.shape != leaf.shape)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 12), 0, reference.cfg.vocab_size)
    with use_plan(setup.plan):
        got = jax.jit(lambda p, b, t: nnx.merge(setup.graphdef, p, b)(t)[0])(
            state.params, state.biases, jax.device_put(tokens, setup.plan.batch_sharding()))
    want = reference(tokens)[0]
    # another summation order on the mesh: 64 float32 ulps relative plus 64 of the logits' scale
    eps, scale = float(np.finfo(np.float32).eps), float(np.max(np.abs(want)))
    logits_equal = bool(np.allclose(np.asarray(got), np.asarray(want), rtol=64 * eps, atol=64 * eps * scale))
    print(json.dumps({"params_equal": bool(equal), "logits_equal": logits_equal, "sharded_leaves": sharded}))


if __name__ == "__main__":
    main(sys.argv[1])
