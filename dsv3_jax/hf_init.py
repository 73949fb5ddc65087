"""Published weights straight into a run's shardings: an HF DeepSeek-V3 checkpoint read slice by slice.

`check_checkpoint` validates a checkpoint directory against a model config from its headers alone (every
tensor present with its shape and dtype, FP8 scales well shaped, nothing left over), before any tensor is read.
`load_sharded` then creates every parameter and router bias in the sharding the run's plan gives it: each
process reads only the slices its own devices hold, and of the HF tensors only the bytes those slices cover
(FP8 128x128 blocks dequantised from the covering blocks), moving each slice to its device before reading the
next, so the host holds one shard at a time. Stacked (scanned) layers, per-expert tensors and MTP modules map
through the same name table as `convert.from_hf`, so the result is the model `from_hf` builds, placed on the
mesh without ever existing whole on one host.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from dsv3_jax import convert
from dsv3_jax.config import ModelConfig
from dsv3_jax.layout import layer_slots
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.partitioning import path_str
from dsv3_jax.safetensors_io import FP8_DTYPES, INDEX_FILE, CheckpointError, SafetensorsDir, transpose_into


def source_record(directory: str | os.PathLike) -> dict[str, str]:
    """Where a run's weights came from: the directory and a content hash of its index (or of the shards'
    headers when there is no index), so a run records exactly which checkpoint it started from."""
    directory = Path(directory).resolve()
    digest = hashlib.sha256()
    index = directory / INDEX_FILE
    if index.is_file():
        digest.update(index.read_bytes())
    else:
        for file in sorted(directory.glob("*.safetensors")):
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                digest.update(file.name.encode() + f.read(min(size, 1 << 26)))
    return {"path": str(directory), "index_sha256": digest.hexdigest()}


def check_checkpoint(directory: str | os.PathLike, cfg: ModelConfig) -> SafetensorsDir:
    """The checkpoint opened and checked against `cfg` from its headers: CheckpointError naming the first
    missing, extra or misshapen tensor (or bad dtype, scale or truncated file) before anything is read."""
    directory = Path(directory)
    hf = convert.load_hf_config(directory)
    block = convert.block_size(hf)
    ckpt = SafetensorsDir(directory, block)
    model = nnx.eval_shape(lambda: DeepSeekV3(cfg, nnx.Rngs(0)))
    plan = convert.plan_import(layer_slots(model), cfg, ckpt, block)
    for _, name, kind in plan:  # what a full read would consume
        for tensor in convert.expanded(name, kind, cfg):
            ckpt.consumed.add(tensor)
            if ckpt.entries[tensor].dtype in FP8_DTYPES:
                ckpt.consumed.add(tensor + "_scale_inv")
    for k in range(cfg.mtp_depth):
        for copy in convert.MTP_SHARED_COPIES:
            ckpt.consumed.add(f"model.layers.{cfg.num_hidden_layers + k}.{copy}")
    convert.reject_unconsumed(ckpt, cfg, convert.file_mtp_depth(hf))
    ckpt.consumed.clear()
    return ckpt


def load_sharded(ckpt: SafetensorsDir, cfg: ModelConfig, abstract: Any) -> Any:
    """`abstract` (a pytree of ShapeDtypeStructs carrying shardings, e.g. a TrainState's params or biases,
    named as the model's variables) filled from `ckpt` (from `check_checkpoint`): the same tree of jax.Arrays,
    each built from the slices this process's devices hold."""
    stacks = {name: list(indices) for name, indices, _ in cfg.layer_stacks()} if cfg.scan_layers else {}

    def build(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path_str(path, ".")
        stack, _, rest = name.partition(".")
        if stack in stacks:  # [L, ...]: main layers stacks[stack][n] on the leading axis
            per_layer = [_reader(ckpt, cfg, f"layers.{i}.{rest}") for i in stacks[stack]]

            def read(index: tuple[slice, ...], out: np.ndarray) -> None:
                start, stop = index[0].indices(len(per_layer))[:2]
                for n in range(start, stop):
                    per_layer[n](index[1:], out[n - start])
        else:
            read = _reader(ckpt, cfg, name)
        return _make_array(leaf, read)

    return jax.tree_util.tree_map_with_path(build, abstract)


def _make_array(leaf: jax.ShapeDtypeStruct, read: Callable[[tuple[slice, ...], np.ndarray], None]) -> jax.Array:
    """One global array from per-shard reads (each filling a host buffer of the shard's shape and dtype: cast and
    transpose included), moved to each device as soon as it is read, so the host holds one shard at a time
    (replicas of a shard are read once: devices are visited grouped by the slice they hold)."""
    dtype = np.dtype(leaf.dtype)
    indices = leaf.sharding.addressable_devices_indices_map(leaf.shape)
    keyed = [(tuple(s.indices(n)[:2] for s, n in zip(tuple(index) + (slice(None),) * len(leaf.shape), leaf.shape)),
              device) for device, index in indices.items()]
    keyed.sort(key=lambda item: (item[0], item[1].id))
    shards, last_key, host = [], None, None
    for key, device in keyed:
        if key != last_key:
            host = np.empty(tuple(b - a for a, b in key), dtype)
            read(tuple(slice(a, b) for a, b in key), host)
            last_key = key
        shards.append(jax.device_put(host, device))
    del host
    return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, shards)


def _reader(ckpt: SafetensorsDir, cfg: ModelConfig, leaf: str) -> Callable[[tuple[slice, ...], np.ndarray], None]:
    """`fill(index, out)`: `out` filled with the slice `index` of our per-layer leaf, read from its HF tensor(s).
    Our 2-D kernels are [in, out], HF's [out, in]: a slice of ours reads the HF rows of its `out` range and the
    columns of its `in` range. Experts are [E, in, out] here, one [out, in] HF tensor each."""
    name, kind = convert.hf_name(leaf, cfg)
    if kind in (convert.DENSE, convert.FP8):
        def dense(index: tuple[slice, ...], out: np.ndarray) -> None:
            transpose_into(out, ckpt.read_slice(name, (index[1], index[0])))
        return dense
    if kind == convert.EXPERTS:
        tensors = convert.expanded(name, kind, cfg)

        def experts(index: tuple[slice, ...], out: np.ndarray) -> None:
            start, stop = index[0].indices(len(tensors))[:2]
            for j in range(start, stop):
                transpose_into(out[j - start], ckpt.read_slice(tensors[j], (index[2], index[1])))
        return experts

    def copy(index: tuple[slice, ...], out: np.ndarray) -> None:
        out[...] = ckpt.read_slice(name, tuple(index))
    return copy


__all__ = ["CheckpointError", "check_checkpoint", "load_sharded", "source_record"]
