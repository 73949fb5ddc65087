"""HF / official DeepSeek-V3 safetensors checkpoints <-> our parameter tree (docs/semantics.md §6-§8).

Import (`from_hf`) builds the model abstractly and fills it one tensor at a time, so host memory stays near the
size of the result; FP8 block-scaled weights (`<name>_scale_inv`) are dequantised on the way in. Export
(`to_hf`) streams tensors into safetensors files one at a time, optionally FP8-quantised like the official
checkpoint and optionally sharded with an index. Both directions use the same name table (`BLOCK`, ...), so
they cannot drift apart. The file format itself (reading headers and tensors, FP8 block scaling, streaming
files out) is `dsv3_jax.safetensors_io`.

Kinds of tensor (how a leaf maps to HF tensors):
  copy     stored as-is (norm weights, the embedding table)
  bias     stored as-is, always float32 in files (the router's e_score_correction_bias)
  dense    a 2-D kernel, transposed ([in, out] here, [out, in] in HF), never quantised (router, eh_proj, head)
  fp8      like dense, but block-quantised in FP8 checkpoints (every projection in self_attn and mlp)
  experts  our stacked [E, in, out] leaf <- per-expert HF [out, in] tensors `...experts.{j}...`, FP8-able
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.layout import LayerSlot, by_variable, layer_slots, leaves
from dsv3_jax.safetensors_io import (DEFAULT_BLOCK, FP8_DTYPES, FP8_MAX, INDEX_FILE, ST_DTYPES, ST_NAMES,
                                     CheckpointError, SafetensorsDir, dequantize_blockwise, quantize_blockwise,
                                     scale_shape, transpose_into, write_safetensors)
from dsv3_jax import hf_config

__all__ = ["CheckpointError", "from_hf", "to_hf", "dequantize_blockwise", "quantize_blockwise", "hf_name",
           "FP8_MAX", "DEFAULT_BLOCK"]


COPY, BIAS, DENSE, FP8, EXPERTS = "copy", "bias", "dense", "fp8", "experts"

# ---- the name table: our dotted leaf path -> (HF name, kind) ------------------------------------------------
TOP_LEVEL: dict[str, tuple[str, str]] = {
    "embed_tokens.embedding": ("model.embed_tokens.weight", COPY),
    "norm.weight": ("model.norm.weight", COPY),
    "lm_head.kernel": ("lm_head.weight", DENSE),
}
# One decoder block, relative to `layers.{i}.` (ours) and `model.layers.{i}.` (HF). MTP blocks use it too.
BLOCK: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": ("input_layernorm.weight", COPY),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", COPY),
    "self_attn.q_a_proj.kernel": ("self_attn.q_a_proj.weight", FP8),
    "self_attn.q_a_layernorm.weight": ("self_attn.q_a_layernorm.weight", COPY),
    "self_attn.q_b_proj.kernel": ("self_attn.q_b_proj.weight", FP8),
    "self_attn.q_proj.kernel": ("self_attn.q_proj.weight", FP8),
    "self_attn.kv_a_proj_with_mqa.kernel": ("self_attn.kv_a_proj_with_mqa.weight", FP8),
    "self_attn.kv_a_layernorm.weight": ("self_attn.kv_a_layernorm.weight", COPY),
    "self_attn.kv_b_proj.kernel": ("self_attn.kv_b_proj.weight", FP8),
    "self_attn.o_proj.kernel": ("self_attn.o_proj.weight", FP8),
    "mlp.gate_proj.kernel": ("mlp.gate_proj.weight", FP8),
    "mlp.up_proj.kernel": ("mlp.up_proj.weight", FP8),
    "mlp.down_proj.kernel": ("mlp.down_proj.weight", FP8),
    "mlp.gate.kernel": ("mlp.gate.weight", DENSE),
    "mlp.gate.bias": ("mlp.gate.e_score_correction_bias", BIAS),
    "mlp.experts.gate_proj": ("mlp.experts.{j}.gate_proj.weight", EXPERTS),
    "mlp.experts.up_proj": ("mlp.experts.{j}.up_proj.weight", EXPERTS),
    "mlp.experts.down_proj": ("mlp.experts.{j}.down_proj.weight", EXPERTS),
    "mlp.shared_experts.gate_proj.kernel": ("mlp.shared_experts.gate_proj.weight", FP8),
    "mlp.shared_experts.up_proj.kernel": ("mlp.shared_experts.up_proj.weight", FP8),
    "mlp.shared_experts.down_proj.kernel": ("mlp.shared_experts.down_proj.weight", FP8),
}
# MTP module k's own tensors, relative to `mtp.{k}.` (ours) and `model.layers.{L+k}.` (HF).
MTP_EXTRAS: dict[str, tuple[str, str]] = {
    "enorm.weight": ("enorm.weight", COPY),
    "hnorm.weight": ("hnorm.weight", COPY),
    "eh_proj.kernel": ("eh_proj.weight", DENSE),
    "shared_head.norm.weight": ("shared_head.norm.weight", COPY),
}
# HF copies inside `model.layers.{L+k}.` of tensors we share with the main model: HF name -> our top-level leaf.
MTP_SHARED_COPIES: dict[str, str] = {
    "embed_tokens.weight": "embed_tokens.embedding",
    "shared_head.head.weight": "lm_head.kernel",
}
# Tensors found in some checkpoints that carry no parameters (recomputed buffers).
IGNORED = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)

def hf_name(leaf: str, cfg: ModelConfig) -> tuple[str, str]:
    """(HF tensor name, kind) of one of our dotted leaf paths; expert names keep a `{j}` placeholder."""
    if leaf in TOP_LEVEL:
        return TOP_LEVEL[leaf]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", leaf)
    if m and m.group(2) in BLOCK:
        name, kind = BLOCK[m.group(2)]
        return f"model.layers.{m.group(1)}.{name}", kind
    m = re.fullmatch(r"mtp\.(\d+)\.(block\.)?(.+)", leaf)
    table = BLOCK if m and m.group(2) else MTP_EXTRAS
    if m and m.group(3) in table:
        name, kind = table[m.group(3)]
        return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{name}", kind
    raise KeyError(f"no HF name for parameter {leaf!r}; extend the table in dsv3_jax/convert.py")


def _hf_shapes(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of one tensor of a leaf of this kind and shape (per expert for `experts`)."""
    if kind in (DENSE, FP8):
        return shape[::-1]
    if kind == EXPERTS:
        return shape[1:][::-1]
    return shape


def expanded(name: str, kind: str, cfg: ModelConfig) -> list[str]:
    return [name.replace("{j}", str(j)) for j in range(cfg.n_routed_experts)] if kind == EXPERTS else [name]


def load_hf_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"missing config.json in {directory}")
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def block_size(hf: Mapping[str, Any]) -> tuple[int, int]:
    quant = hf.get("quantization_config") or {}
    block = quant.get("weight_block_size") or DEFAULT_BLOCK
    if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
        raise CheckpointError(f"config.json: quantization_config.weight_block_size must be two positive integers, "
                              f"got {block!r}")
    return int(block[0]), int(block[1])


def file_mtp_depth(hf: Mapping[str, Any]) -> int:
    return int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)


def from_hf(path: str | os.PathLike, dtype: Any = jnp.float32, *, compute_dtype: Any = None,
            **config_overrides: Any) -> tuple[ModelConfig, DeepSeekV3]:
    """Load an HF-layout DeepSeek-V3 checkpoint (fp32/bf16/fp16, or FP8 block-scaled) as (config, model).

    Parameters are stored in `dtype` (router biases stay float32); the compute dtype is `compute_dtype`
    (default: `dtype`). Other config fields may be overridden, e.g. `num_nextn_predict_layers=0` to load a
    checkpoint without its MTP layers (or one that, like transformers' `save_pretrained`, dropped them).
    """
    directory = Path(path)
    hf = load_hf_config(directory)
    dtypes = {"param_dtype": jnp.dtype(dtype).name, "dtype": jnp.dtype(compute_dtype or dtype).name}
    cfg = hf_config.from_hf(hf, **{**dtypes, **config_overrides})
    block = block_size(hf)
    ckpt = SafetensorsDir(directory)
    try:
        model = nnx.eval_shape(lambda: DeepSeekV3(cfg, nnx.Rngs(0)))
        slots = layer_slots(model)
        plan = plan_import(slots, cfg, ckpt, block)
        _fill(plan, ckpt, cfg, block)
        _check_mtp_copies(ckpt, cfg)
        reject_unconsumed(ckpt, cfg, file_mtp_depth(hf))
    finally:
        ckpt.close()
    return cfg, model


def plan_import(slots: list[LayerSlot], cfg: ModelConfig, ckpt: SafetensorsDir,
                 block) -> list[tuple[LayerSlot, str, str]]:
    """Check every tensor's presence, shape and scale from the headers before any data is read."""
    plan, missing = [], []
    for slot in slots:
        name, kind = hf_name(slot.leaf, cfg)
        shape = _hf_shapes(kind, slot.shape)
        for tensor in expanded(name, kind, cfg):
            if tensor not in ckpt:
                missing.append(tensor)
                continue
            ckpt.check(tensor, shape, block if kind in (FP8, EXPERTS) else None)
        plan.append((slot, name, kind))
    shapes = {slot.leaf: slot.shape for slot in slots}
    for k in range(cfg.mtp_depth):
        for copy, main in MTP_SHARED_COPIES.items():
            tensor = f"model.layers.{cfg.num_hidden_layers + k}.{copy}"
            if tensor in ckpt:  # optional: we share these, so a checkpoint may leave the copies out
                ckpt.check(tensor, _hf_shapes(TOP_LEVEL[main][1], shapes[main]))
    if missing:
        hint = ""
        if all(_layer_index(t) >= cfg.num_hidden_layers for t in missing) and not any(
                _layer_index(t) >= cfg.num_hidden_layers for t in ckpt.entries):
            hint = (f" (the checkpoint has no MTP layers; pass num_nextn_predict_layers=0 to load it without MTP, "
                    f"config.json says {cfg.mtp_depth})")
        raise CheckpointError(f"missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                  else "") + hint)
    return plan


def _layer_index(tensor: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", tensor)
    return int(m.group(1)) if m else -1


def _fill(plan: list[tuple[LayerSlot, str, str]], ckpt: SafetensorsDir, cfg: ModelConfig, block) -> None:
    """Set every variable from its HF tensors, one tensor at a time. A stacked variable is assembled in one
    preallocated host buffer, layer by layer, so at most one variable is ever held twice (host and device)."""
    for entries in by_variable(plan, lambda entry: entry[0]):
        var = entries[0][0].var
        target = var.get_value()
        out_dtype = np.dtype(target.dtype)
        if entries[0][0].index is None:
            slot, name, kind = entries[0]
            var.set_value(jnp.asarray(_load_leaf(ckpt, slot.shape, out_dtype, name, kind, cfg, block)))
            continue
        buffer = np.empty(target.shape, out_dtype)
        for slot, name, kind in entries:
            _load_leaf(ckpt, slot.shape, out_dtype, name, kind, cfg, block, out=buffer[slot.index])
        var.set_value(jnp.asarray(buffer))
        del buffer


def _load_leaf(ckpt: SafetensorsDir, shape: tuple[int, ...], out_dtype: np.dtype, name: str, kind: str,
               cfg: ModelConfig, block, out: np.ndarray | None = None) -> np.ndarray:
    """One layer's share of one of our leaves, assembled from its HF tensor(s) in `out_dtype` (into `out`)."""
    if out is None:
        out = np.empty(shape, out_dtype)
    if kind == EXPERTS:
        for j, tensor in enumerate(expanded(name, kind, cfg)):
            out[j] = ckpt.read(tensor, block).T  # cast on assignment
        return out
    array = ckpt.read(name, block)
    out[...] = array.T if kind in (DENSE, FP8) else array  # transpose and cast in one copy
    return out


def _check_mtp_copies(ckpt: SafetensorsDir, cfg: ModelConfig, chunk_bytes: int = 1 << 26) -> None:
    """Warn when an MTP module's embed/head copy differs from the main tensor (we keep the main one)."""
    for k in range(cfg.mtp_depth):
        for copy, main_leaf in MTP_SHARED_COPIES.items():
            tensor = f"model.layers.{cfg.num_hidden_layers + k}.{copy}"
            if tensor not in ckpt:
                continue  # our model shares them anyway, so a checkpoint may omit the copies
            main = TOP_LEVEL[main_leaf][0]
            ckpt.consumed.add(tensor)
            if not _equal_tensors(ckpt, tensor, main, chunk_bytes):
                warnings.warn(f"{tensor} differs from {main}; the model shares one tensor and uses {main}",
                              stacklevel=3)


def _equal_tensors(ckpt: SafetensorsDir, a: str, b: str, chunk_bytes: int) -> bool:
    ea, eb = ckpt.entries[a], ckpt.entries[b]
    if ea.shape != eb.shape:
        return False
    if ea.dtype in FP8_DTYPES or eb.dtype in FP8_DTYPES or len(ea.shape) != 2:
        return bool(np.array_equal(ckpt.read(a).astype(np.float32), ckpt.read(b).astype(np.float32)))
    rows = max(1, chunk_bytes // (4 * max(1, ea.shape[1])))
    for start in range(0, ea.shape[0], rows):
        stop = min(ea.shape[0], start + rows)
        if not np.array_equal(ckpt.read_rows(a, start, stop).astype(np.float32),
                              ckpt.read_rows(b, start, stop).astype(np.float32)):
            return False
    return True


def reject_unconsumed(ckpt: SafetensorsDir, cfg: ModelConfig, file_mtp_depth: int) -> None:
    """Every tensor in the files must have been used, except ignorable buffers and deliberately dropped MTP layers."""
    first_dropped = cfg.num_hidden_layers + cfg.mtp_depth
    last_dropped = cfg.num_hidden_layers + file_mtp_depth
    extra = sorted(name for name in set(ckpt.entries) - ckpt.consumed
                   if not any(p.search(name) for p in IGNORED)
                   and not first_dropped <= _layer_index(name) < last_dropped)
    if extra:
        shown = ", ".join(repr(n) for n in extra[:10])
        raise CheckpointError(f"unexpected tensors in checkpoint ({len(extra)}): {shown}"
                              + (", ..." if len(extra) > 10 else ""))


# ---- writing ------------------------------------------------------------------------------------------------
@dataclass
class _Group:
    """Tensors produced together (a weight and its scale_inv): header specs plus a producer of the arrays."""

    specs: list[tuple[str, str, tuple[int, ...]]]  # (name, safetensors dtype, shape)
    produce: Callable[[], list[np.ndarray]]
    source: tuple[str, tuple[int, ...]] = ("", ())  # the variable's dotted path and the index read from it

    @property
    def nbytes(self) -> int:
        return sum(ST_DTYPES[d].itemsize * math.prod(s) for _, d, s in self.specs)


# (a variable's dotted path, an index into it: a layer of a stack, an expert) -> that slice as a host array
VariableReader = Callable[[str, tuple[int, ...]], np.ndarray]


def _export_groups(model: DeepSeekV3, dtype: np.dtype, fp8: bool | Callable[[str], bool], block: tuple[int, int],
                   read: VariableReader | None = None) -> list[_Group]:
    cfg = model.cfg
    by_name = dict(leaves(model))
    path_of = {id(var): name for name, var in by_name.items()}

    def group(name: str, kind: str, fetch: Callable[[], np.ndarray], shape: tuple[int, ...]) -> _Group:
        if kind in (FP8, EXPERTS) and (fp8(name) if callable(fp8) else fp8):
            def produce() -> list[np.ndarray]:
                return list(quantize_blockwise(fetch(np.dtype(np.float32)), block))
            return _Group([(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", scale_shape(shape, block))],
                          produce)
        out = np.dtype(np.float32) if kind == BIAS else dtype
        return _Group([(name, ST_NAMES[out], shape)], lambda: [fetch(out)])

    def fetch(var: nnx.Variable, kind: str, *index: int) -> Callable[[np.dtype], np.ndarray]:
        """Reads only the slice asked for (a layer of a stack, an expert), never a whole stacked variable, and
        returns it in HF's orientation, contiguous, in the dtype asked for (one copy)."""
        def get(out_dtype: np.dtype) -> np.ndarray:
            if read is not None:
                array = read(path_of[id(var)], index)
            else:
                value = var.get_value()[index] if index else var.get_value()
                array = np.asarray(jax.device_get(value))
            if kind in (DENSE, FP8, EXPERTS):
                return transpose_into(np.empty(array.shape[::-1], out_dtype), array)
            return np.ascontiguousarray(array, dtype=out_dtype)
        return get

    groups: list[_Group] = []
    for slot in layer_slots(model):
        name, kind = hf_name(slot.leaf, cfg)
        shape = _hf_shapes(kind, slot.shape)
        layer = () if slot.index is None else (slot.index,)
        for j, tensor in enumerate(expanded(name, kind, cfg)):
            index = (*layer, *((j,) if kind == EXPERTS else ()))
            g = group(tensor, kind, fetch(slot.var, kind, *index), shape)
            g.source = (path_of[id(slot.var)], index)
            groups.append(g)
    for k in range(cfg.mtp_depth):
        for copy, main_leaf in MTP_SHARED_COPIES.items():
            var = by_name[main_leaf]
            kind = TOP_LEVEL[main_leaf][1]
            g = group(f"model.layers.{cfg.num_hidden_layers + k}.{copy}", kind, fetch(var, kind),
                      _hf_shapes(kind, tuple(var.get_value().shape)))
            g.source = (main_leaf, ())
            groups.append(g)
    groups.sort(key=lambda g: _sort_key(g.specs[0][0]))
    return groups


def _sort_key(name: str) -> tuple:
    """Embedding first, then layers in numeric order, then norm and head (the order of the HF shards)."""
    layer = _layer_index(name)
    if name == "model.embed_tokens.weight":
        return (0, 0, name)
    return (1, layer, name) if layer >= 0 else (2, 0, name)


def to_hf(model: DeepSeekV3, path: str | os.PathLike, dtype: str = "bfloat16",
          fp8: bool | Callable[[str], bool] = False, max_shard_bytes: int | None = None,
          block: tuple[int, int] = DEFAULT_BLOCK, overwrite: bool = False, read: VariableReader | None = None,
          order: Callable[[str, tuple[int, ...]], Any] | None = None, share: tuple[int, int] = (0, 1),
          written: list[str] | None = None) -> Path:
    """Write `config.json` and HF-named safetensors (optionally FP8 block-quantised and sharded with an index).

    Every tensor is produced and written one at a time. MTP module k goes to `model.layers.{L+k}` with copies of
    the embedding and head. FP8 quantises exactly the tensors the official checkpoint quantises
    (docs/semantics.md §7).
    `overwrite` first deletes existing `*.safetensors` and the index in `path`. With `read`, the values come
    from it, slice by slice (a run's checkpoint: `export.export_run`), and `model` may be abstract. `fp8` may
    be a predicate on HF tensor names (quantise only those of the FP8-able ones it accepts). `order(variable
    path, index)` is a sort key for the order tensors are read and written in (default: HF's layer order; a
    chunked source reads fastest in its own chunk order, which the index file makes invisible to loaders).
    `share=(i, n)`: this is writer i of n (processes of one job writing one directory): it writes shard files
    i, i + n, ...; writer 0 also writes config.json and the index (and removes stale files first). The names
    of the safetensors files this call wrote are appended to `written`.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors export needs a little-endian host")
    cfg = model.cfg
    out_dtype = np.dtype(jnp.dtype(dtype))
    if out_dtype not in ST_NAMES or out_dtype in (ST_DTYPES["F8_E4M3"], ST_DTYPES["F8_E5M2"]):
        raise ValueError(f"export dtype must be a float16/bfloat16/float32/float64 type, got {dtype!r}; use fp8=True")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    writer, writers = share
    stale = sorted(directory.glob("*.safetensors")) + ([directory / INDEX_FILE] if (directory / INDEX_FILE).exists()
                                                       else [])
    if stale and writer == 0:
        if not overwrite:
            raise FileExistsError(f"{directory} already holds {stale[0].name}; pass overwrite=True to replace")
        for file in stale:
            file.unlink()

    hf = hf_config.to_hf(cfg)
    hf["torch_dtype"] = out_dtype.name
    if fp8:
        hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    if writer == 0:
        (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")

    groups = _export_groups(model, out_dtype, fp8, tuple(block), read)
    if order is not None:
        groups.sort(key=lambda g: order(*g.source))
    shards: list[list[_Group]] = [[]]
    size = 0
    for g in groups:
        if max_shard_bytes is not None and shards[-1] and size + g.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += g.nbytes
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        if writer == 0:
            write_safetensors(directory / "model.safetensors", shards[0], metadata)
            if written is not None:
                written.append("model.safetensors")
        return directory
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        if (i - 1) % writers == writer:
            write_safetensors(directory / file, shard, metadata)
            if written is not None:
                written.append(file)
        weight_map.update({name: file for g in shard for name, _, _ in g.specs})
    if writer == 0:
        index = {"metadata": {"total_size": sum(g.nbytes for g in groups)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return directory
