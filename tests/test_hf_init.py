"""Published weights onto a run's shardings (dsv3_jax/hf_init.py, `TrainingSetup.state_from_hf`): the loaded
parameters are `convert.from_hf`'s, bitwise, for bf16, fp32 and FP8 checkpoints, in both layer layouts; the
checks name the first bad tensor before any tensor is read. The 8-device mesh runs in a subprocess
(tests/_hf_init_mesh_check.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import hf_init
from dsv3_jax.config import get_preset
from dsv3_jax.convert import from_hf, to_hf
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.moe import RouterBias
from dsv3_jax.safetensors_io import CheckpointError
from dsv3_jax.train.config import Config, TrainConfig
from dsv3_jax.train.setup import build_training

ROOT = Path(__file__).resolve().parents[1]


def _hf_checkpoint(directory: Path, fp8: bool = False, dtype: str = "bfloat16", shard_bytes: int | None = None):
    cfg = get_preset("tiny").replace(scan_layers=False)
    model = DeepSeekV3(cfg, nnx.Rngs(params=3))
    for router in model.routers():  # a non-zero correction bias, so keeping it is checked
        router.bias[...] = jax.random.normal(jax.random.PRNGKey(7), router.bias[...].shape)
    to_hf(model, directory, dtype=dtype, fp8=fp8, max_shard_bytes=shard_bytes)
    return directory


def _loaded(directory: Path, scan_layers: bool, param_dtype: str = "float32"):
    """(state from hf_init on one device, the model from_hf builds) for the same checkpoint and layout."""
    _, reference = from_hf(directory, dtype=jnp.dtype(param_dtype), scan_layers=scan_layers)
    config = Config(model=reference.cfg, train=TrainConfig(batch_size=2, seq_len=16, init_from=str(directory)))
    setup = build_training(config, jax.devices()[:1])
    ckpt = hf_init.check_checkpoint(directory, config.model)
    return setup, setup.state_from_hf(ckpt), reference, ckpt


@pytest.mark.parametrize("fp8, dtype, scan_layers", [(False, "bfloat16", True), (False, "float32", False),
                                                     (True, "bfloat16", True)])
def test_parameters_are_from_hfs_bitwise(tmp_path, fp8, dtype, scan_layers):
    directory = _hf_checkpoint(tmp_path / "hf", fp8=fp8, dtype=dtype, shard_bytes=200_000)
    setup, state, reference, ckpt = _loaded(directory, scan_layers)
    _, want_params, want_biases = nnx.split(reference, nnx.Param, RouterBias)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(want_params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.biases), jax.device_get(want_biases))
    assert int(state.step) == 0
    # every byte of the checkpoint's tensors was read once on one device (replicas of a shard are read once)
    total = sum(e.stop - e.start for e in ckpt.entries.values())
    mtp_copies = sum(e.stop - e.start for n, e in ckpt.entries.items()
                     if n.endswith(("shared_head.head.weight", ".embed_tokens.weight")) and "layers" in n)
    assert ckpt.bytes_read == total - mtp_copies


def test_logits_equal_from_hf(tmp_path):
    directory = _hf_checkpoint(tmp_path / "hf")
    setup, state, reference, _ = _loaded(directory, scan_layers=True)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, reference.cfg.vocab_size)
    got, _ = nnx.merge(setup.graphdef, state.params, state.biases)(tokens)
    want, _ = reference(tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _break(directory: Path, how: str) -> None:
    from dsv3_jax.safetensors_io import SafetensorsDir, write_safetensors
    ckpt = SafetensorsDir(directory)
    names = sorted(ckpt.entries)
    victim = next(n for n in names if n.endswith("q_a_proj.weight"))
    arrays = {n: ckpt.read(n) for n in names}
    ckpt.close()
    for file in directory.glob("*.safetensors"):
        file.unlink()
    if how == "missing":
        del arrays[victim]
    elif how == "extra":
        arrays["model.layers.0.self_attn.surprise.weight"] = np.zeros((2, 2), np.float32)
    elif how == "shape":
        arrays[victim] = arrays[victim][:-1]

    class Group:
        def __init__(self, name, array):
            self.specs = [(name, "F32", array.shape)]
            self.produce = lambda: [np.asarray(array, np.float32)]
    write_safetensors(directory / "model.safetensors", [Group(n, a) for n, a in arrays.items()], {})


@pytest.mark.parametrize("how, message", [("missing", "missing tensor 'model.layers.0.self_attn.q_a_proj.weight'"),
                                          ("extra", "unexpected tensors in checkpoint"),
                                          ("shape", "q_a_proj.weight' has shape")])
def test_bad_checkpoints_are_named_before_any_read(tmp_path, how, message):
    directory = _hf_checkpoint(tmp_path / "hf", dtype="float32")
    _break(directory, how)
    cfg = get_preset("tiny")
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        hf_init.check_checkpoint(directory, cfg)


def test_source_record_hashes_the_index(tmp_path):
    directory = _hf_checkpoint(tmp_path / "hf", shard_bytes=200_000)
    record = hf_init.source_record(directory)
    assert record["path"] == str(directory.resolve()) and len(record["index_sha256"]) == 64
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["metadata"] = {"note": "edited"}
    index.write_text(json.dumps(data))
    assert hf_init.source_record(directory)["index_sha256"] != record["index_sha256"]


def test_mesh_loads_each_shard(tmp_path):
    """8 fake devices, fsdp + expert 4: parameters equal from_hf's, each device holding only its shard."""
    directory = _hf_checkpoint(tmp_path / "hf", fp8=True, shard_bytes=200_000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_hf_init_mesh_check.py"), str(directory)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["params_equal"] and report["logits_equal"], report
    assert report["sharded_leaves"] > 0


def test_two_processes_each_read_their_own_slices(tmp_path):
    """2 processes x 4 devices, data=2 x expert=4 with fsdp: each process's shards equal from_hf's slices and
    each reads well under the whole checkpoint (the data-split half of every fsdp-split tensor)."""
    import socket

    directory = _hf_checkpoint(tmp_path / "hf", dtype="float32")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    from cli_support import run_together
    results = run_together([[sys.executable, str(ROOT / "tests" / "_hf_init_two_process.py"), str(port), str(i),
                             str(directory)] for i in range(2)], env)
    reports = []
    for code, out, err in results:
        assert code == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for report in reports:
        assert report["shards_equal"], report
        assert 0 < report["bytes_read"] < 0.75 * report["total"], report
