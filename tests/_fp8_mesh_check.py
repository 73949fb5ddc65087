"""Runs on 4 fake CPU devices (started by tests/test_fp8.py in a subprocess): an fp8=deepseek train step on
a (data=2, expert=2) mesh against the same step on one device, and the named error for a tensor split that
would cut FP8 tiles. Writes one JSON report. Usage: python tests/_fp8_mesh_check.py OUT.json
"""

from __future__ import annotations

import os
import sys

# Full backend optimisation (the test suite's level 0 is dropped): at level 0 the one-device and the sharded
# programs round a few float32 intermediates differently, and FP8 quantisation turns such last-bit differences
# into whole E4M3 steps where a value sits on a rounding boundary (measured: 1e-3 relative gradient difference
# in the first layer). With it, both programs agree to float32 reduction order.
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_backend_optimization_level")]
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=4"])

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax import sharding  # noqa: E402
from dsv3_jax.config import ConfigError, get_preset  # noqa: E402
from dsv3_jax.train.config import Config, MeshConfig, TrainConfig  # noqa: E402
from dsv3_jax.train.step import abstract_train_state, init_train_state, jit_train_step  # noqa: E402

# One dense and one MoE layer (the routed experts on the expert axis), no MTP block: less to compile.
MODEL = get_preset("tiny").replace(num_attention_heads=4, num_hidden_layers=2, num_nextn_predict_layers=0,
                                   init_std=0.02, moe_dispatch="capacity", fp8="deepseek")
TRAIN = TrainConfig(steps=4, batch_size=8, seq_len=16, peak_lr=1e-3, warmup_frac=0.0, bias_update_rate=0.01)
KEYS = ("loss", "grad_norm", "balance_loss")


def run(plan, windows):
    shardings = None if plan is None else plan.shardings(abstract_train_state(MODEL, TRAIN)[1])
    graphdef, state = init_train_state(MODEL, TRAIN, plan, shardings)
    step = jit_train_step(graphdef, MODEL, TRAIN, plan, shardings)
    out, first_moments = [], None
    for window in windows:
        state, metrics = step(state, window if plan is None else plan.put_batch(window))
        out.append({k: float(metrics[k]) for k in KEYS})
        if first_moments is None:  # Adam's mu after one step is (1 - beta1) x the (clipped) gradient
            first_moments = np.concatenate([np.asarray(leaf).ravel() for path, leaf in
                                            jax.tree_util.tree_flatten_with_path(jax.device_get(state.opt_state))[0]
                                            if "mu" in jax.tree_util.keystr(path)])
    return out, first_moments


def main(out_path: str) -> None:
    windows = [np.asarray(jax.random.randint(jax.random.key(i), (TRAIN.batch_size, TRAIN.seq_len + 1), 0,
                                             MODEL.vocab_size)) for i in range(2)]
    single, grad_1 = run(None, windows)
    config = Config(model=MODEL, train=TRAIN, mesh=MeshConfig(data=2, expert=2, tensor=1)).validate()
    plan = sharding.plan_from_config(config)
    sharded, grad_4 = run(plan, windows)
    grad_1, grad_4 = grad_1.astype(np.float64), grad_4.astype(np.float64)
    report = {"single": single, "sharded": sharded, "n_grad": int(grad_1.size),
              "grad_rel_l2_diff": float(np.linalg.norm(grad_1 - grad_4) / np.linalg.norm(grad_1)),
              # elements that differ beyond float32 reduction-order noise (after an E4M3 rounding flip, or worse)
              "grad_mismatch_fraction": float(np.mean(np.abs(grad_1 - grad_4)
                                                      > 1e-4 * np.abs(grad_1) + 1e-6 * np.abs(grad_1).max())),
              "tensor_error": None}
    # A tensor split of a dim whose shards are not whole 128-wide tiles fails before compiling.
    wide = MODEL.replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, q_lora_rank=128,
                         kv_lora_rank=128, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32)
    try:
        sharding.plan_from_config(Config(model=wide, train=TRAIN, mesh=MeshConfig(data=2, tensor=2)).validate())
    except ConfigError as err:
        report["tensor_error"] = {"field": err.field, "message": str(err)}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
