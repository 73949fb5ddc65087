"""One of two processes (jax.distributed over localhost, 4 fake CPU devices each) loading an HF checkpoint onto
a data=2 x expert=4 fsdp mesh, run by tests/test_hf_init.py: prints the checkpoint bytes this process read,
the checkpoint's total, and whether every shard it holds equals from_hf's slice of that parameter."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

port, process_id, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", 2, process_id, initialization_timeout=120)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dsv3_jax import hf_init  # noqa: E402
from dsv3_jax.convert import from_hf  # noqa: E402
from dsv3_jax.train.config import Config, MeshConfig, TrainConfig  # noqa: E402
from dsv3_jax.train.setup import build_training  # noqa: E402

_, reference = from_hf(directory, dtype=jnp.float32)
config = Config(model=reference.cfg, train=TrainConfig(batch_size=8, seq_len=16, init_from=directory),
                mesh=MeshConfig(data=2, expert=4, fsdp=True))
setup = build_training(config)
ckpt = hf_init.check_checkpoint(directory, config.model)
params = hf_init.load_sharded(ckpt, config.model, setup.abstract.params)
want = dict(jax.tree_util.tree_flatten_with_path(nnx.state(reference, nnx.Param))[0])
equal = all(np.array_equal(np.asarray(shard.data), np.asarray(want[path])[shard.index])
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] for shard in leaf.addressable_shards)
total = sum(e.stop - e.start for n, e in ckpt.entries.items() if ".mlp.gate.e_score" not in n)
print(json.dumps({"process": process_id, "bytes_read": ckpt.bytes_read, "total": total, "shards_equal": equal}))
