"""The safetensors side of checkpoint conversion: reading a directory of (optionally sharded, optionally FP8
block-scaled) safetensors files one tensor at a time, FP8 block (de)quantisation, and streaming files out.

Nothing here knows the model: `dsv3_jax.convert` maps our parameters to HF tensor names and uses this module for
the bytes. bfloat16 and float8 are not numpy dtypes, so they are read and written as raw little-endian bytes
reinterpreted with ml_dtypes; the numpy-native dtypes go through `safetensors.safe_open`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import ml_dtypes
import numpy as np
from safetensors import safe_open

FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)
INDEX_FILE = "model.safetensors.index.json"

ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_NUMPY_NATIVE = {"F64", "F32", "F16"}  # read with safe_open(framework="numpy"); the others as raw bytes
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded (as this model); the message names the tensor or file at fault."""


# ---- FP8 block quantisation --------------------------------------------------------------------------------
def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize_blockwise(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK) -> np.ndarray:
    """W[r, c] = float(q[r, c]) * scale_inv[r // b0, c // b1] in float32; partial edge blocks use their own scale."""
    q = np.asarray(q)
    scale_inv = np.asarray(scale_inv, np.float32)
    if q.ndim != 2 or scale_inv.shape != scale_shape(q.shape, block):
        raise ValueError(f"scale_inv shape {scale_inv.shape} does not match weight {q.shape} with blocks {block} "
                         f"(expected {scale_shape(q.shape, block)})")
    out = _as_float32(q)
    for i in range(scale_inv.shape[0]):  # one band of block rows at a time: no full-size scale temporary
        out[i * block[0]:(i + 1) * block[0]] *= np.repeat(scale_inv[i], block[1])[: q.shape[1]]
    return out


TRANSPOSE_TILE = 128  # rows and columns per tile of a host transpose


def transpose_into(out: np.ndarray, array: np.ndarray) -> np.ndarray:
    """out[...] = array.T (cast included) for 2-D arrays, tile by tile: a whole-matrix strided copy runs at
    ~0.3 GB/s on a 2-core VM, 128x128 tiles that stay in cache at ~2 GB/s. Returns `out`."""
    rows, cols = array.shape
    for i in range(0, rows, TRANSPOSE_TILE):
        for j in range(0, cols, TRANSPOSE_TILE):
            out[j:j + TRANSPOSE_TILE, i:i + TRANSPOSE_TILE] = array[i:i + TRANSPOSE_TILE, j:j + TRANSPOSE_TILE].T
    return out


def _as_float32(q: np.ndarray) -> np.ndarray:
    """An FP8 array as float32 through a 256-entry table (twice as fast as ml_dtypes' cast, same values)."""
    if q.dtype in _FP8_TABLES:
        return _FP8_TABLES[q.dtype][q.view(np.uint8)]
    return q.astype(np.float32)


_FP8_TABLES = {np.dtype(t): np.arange(256, dtype=np.uint8).view(t).astype(np.float32)
               for t in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}


def quantize_blockwise(w: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(q float8_e4m3fn [M, N], scale_inv float32 [ceil(M/b0), ceil(N/b1)]) with scale_inv = block amax / 448.

    The inverse of `dequantize_blockwise` up to e4m3 rounding; all-zero blocks get scale 1 (their q is 0).
    """
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_blockwise needs a 2-D weight, got shape {w.shape}")
    rows, cols = w.shape
    grid = scale_shape(w.shape, block)
    padded = np.zeros((grid[0] * block[0], grid[1] * block[1]), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(grid[0], block[0], grid[1], block[1])
    amax = np.abs(blocks).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    scaled = np.clip(blocks / scale_inv[:, None, :, None], -FP8_MAX, FP8_MAX)  # guard rounding past 448 (-> NaN)
    q = scaled.reshape(padded.shape)[:rows, :cols].astype(ml_dtypes.float8_e4m3fn)
    return q, scale_inv


# ---- reading ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    stop: int


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """(header JSON, absolute offset of the data section) of one safetensors file."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= os.path.getsize(file) - 8:
                raise ValueError(f"header size {size}")
            return json.loads(f.read(size)), 8 + size
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


class SafetensorsDir:
    """Header-level view of a directory of safetensors files; reads one tensor at a time."""

    def __init__(self, directory: Path, block: tuple[int, int] = DEFAULT_BLOCK):
        """`block`: the FP8 block size of the checkpoint (config.json's quantization_config), what `read_slice`
        dequantises with."""
        self.directory = directory
        self.block = tuple(block)
        index_path = directory / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: invalid index ({e!r})") from e
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (directory / name).is_file():
                    tensors = sorted(k for k, v in weight_map.items() if v == name)
                    raise CheckpointError(f"{index_path} names shard {name!r}, which does not exist in {directory} "
                                          f"(it should hold {len(tensors)} tensors, e.g. {tensors[0]!r})")
        else:
            weight_map = None
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {directory}")
        self.entries: dict[str, _Entry] = {}
        for name in files:
            file = directory / name
            header, data_start = _read_header(file)
            file_size = file.stat().st_size
            for tensor, info in header.items():
                if tensor == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(tensor, name) != name:
                    continue  # the index maps this name to another shard, which is the one we read
                if tensor in self.entries:
                    raise CheckpointError(f"tensor {tensor!r} appears in both {self.entries[tensor].file.name} "
                                          f"and {name}")
                try:
                    begin, end = (int(x) for x in info["data_offsets"])
                    entry = _Entry(file, str(info["dtype"]), tuple(int(d) for d in info["shape"]),
                                   data_start + begin, data_start + end)
                except (KeyError, TypeError, ValueError) as e:
                    raise CheckpointError(f"{file}: malformed header entry for tensor {tensor!r} ({e!r})") from e
                if not data_start <= entry.start <= entry.stop <= file_size:
                    raise CheckpointError(f"{file}: data of tensor {tensor!r} lies outside the file (truncated?)")
                self.entries[tensor] = entry
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.entries))
            if absent:
                raise CheckpointError(f"tensor {absent[0]!r} is listed in {INDEX_FILE} under "
                                      f"{weight_map[absent[0]]!r} but that file does not contain it")
        self.consumed: set[str] = set()
        self.bytes_read = 0  # tensor bytes read by read_slice (what a process reads of its own shards)
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def check(self, name: str, shape: tuple[int, ...], block: tuple[int, int] | None = None) -> None:
        """Raise unless `name` exists with `shape` and a float dtype (FP8 needs a well-shaped scale_inv)."""
        if name not in self.entries:
            raise CheckpointError(f"missing tensor {name!r}")
        entry = self.entries[name]
        if entry.shape != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(entry.shape)}, expected {list(shape)}")
        if entry.dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {entry.dtype}")
        if entry.dtype in FP8_DTYPES:
            scale = name + "_scale_inv"
            if block is None or len(shape) != 2:
                raise CheckpointError(f"tensor {name!r} is stored as {entry.dtype}, but this tensor is never "
                                      "block-quantised")
            if scale not in self.entries:
                raise CheckpointError(f"FP8 tensor {name!r} has no {scale!r}")
            expected = scale_shape(tuple(shape), block)
            if self.entries[scale].shape != expected:
                raise CheckpointError(f"tensor {scale!r} has shape {list(self.entries[scale].shape)}, expected "
                                      f"{list(expected)} for weight {list(shape)} with blocks {list(block)}")

    def read(self, name: str, block: tuple[int, int] = DEFAULT_BLOCK) -> np.ndarray:
        """The tensor as stored (FP8 is dequantised to float32 with its scale_inv); marks it consumed."""
        entry = self.entries[name]
        self.consumed.add(name)
        array = self._raw(name, entry)
        if entry.dtype in FP8_DTYPES:
            scale_name = name + "_scale_inv"
            self.consumed.add(scale_name)
            array = dequantize_blockwise(array, self._raw(scale_name, self.entries[scale_name]), block)
        return array

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of an unquantised tensor, without reading the rest."""
        entry = self.entries[name]
        if entry.dtype in _NUMPY_NATIVE:
            return self._handle(entry.file).get_slice(name)[start:stop]
        row_bytes = ST_DTYPES[entry.dtype].itemsize * math.prod(entry.shape[1:])
        return self._bytes(entry.file, entry.start + start * row_bytes, (stop - start) * row_bytes, entry.dtype,
                           (stop - start, *entry.shape[1:]))

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` (one slice per leading dimension, steps of 1), reading only the bytes the slice covers
        (each row's column range, through a memory map dropped right after), FP8 dequantised from the covering
        128x128 blocks and their scales; counts the bytes read in `bytes_read`. Marks the tensor (and its
        scale) consumed."""
        entry = self.entries[name]
        self.consumed.add(name)
        bounds = [s.indices(n)[:2] for s, n in zip(tuple(index) + (slice(None),) * len(entry.shape), entry.shape)]
        if entry.dtype not in FP8_DTYPES:
            return self._mapped(entry, bounds)
        scale_name = name + "_scale_inv"
        self.consumed.add(scale_name)
        (r0, r1), (c0, c1) = bounds
        block = self.block
        rows = (r0 // block[0] * block[0], min(entry.shape[0], -(-r1 // block[0]) * block[0]))
        cols = (c0 // block[1] * block[1], min(entry.shape[1], -(-c1 // block[1]) * block[1]))
        q = self._mapped(entry, [rows, cols])
        scale = self._mapped(self.entries[scale_name], [(rows[0] // block[0], -(-rows[1] // block[0])),
                                                        (cols[0] // block[1], -(-cols[1] // block[1]))])
        w = dequantize_blockwise(q, scale, block)
        return w[r0 - rows[0]:r1 - rows[0], c0 - cols[0]:c1 - cols[0]]

    def _mapped(self, entry: _Entry, bounds: list[tuple[int, int]]) -> np.ndarray:
        """A copy of entry[bounds] read through a memory map of the file (unmapped again on return)."""
        view = np.memmap(entry.file, dtype=ST_DTYPES[entry.dtype], mode="r", offset=entry.start,
                         shape=entry.shape)
        try:
            out = np.array(view[tuple(slice(a, b) for a, b in bounds)])
        finally:
            del view
        self.bytes_read += out.nbytes
        return out

    def _raw(self, name: str, entry: _Entry) -> np.ndarray:
        if entry.dtype in _NUMPY_NATIVE:
            return self._handle(entry.file).get_tensor(name)
        # bfloat16 / float8 are not numpy dtypes: reinterpret the raw little-endian bytes with ml_dtypes.
        return self._bytes(entry.file, entry.start, entry.stop - entry.start, entry.dtype, entry.shape)

    @staticmethod
    def _bytes(file: Path, offset: int, count: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        data = np.fromfile(file, dtype=np.uint8, count=count, offset=offset)
        if data.size != count:
            raise CheckpointError(f"{file}: truncated data for a tensor at byte {offset}")
        return data.view(ST_DTYPES[dtype]).reshape(shape)

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="numpy")
        return self._handles[file]

    def close(self) -> None:
        self._handles.clear()


# ---- writing ------------------------------------------------------------------------------------------------
class TensorGroup(Protocol):
    """Tensors written together: their (name, safetensors dtype, shape) specs, and a function producing the
    arrays in that order (called only when the file reaches them, so one group is in memory at a time)."""

    specs: list[tuple[str, str, tuple[int, ...]]]
    produce: Callable[[], list[np.ndarray]]


def write_safetensors(file: Path, groups: Iterable[TensorGroup], metadata: Mapping[str, str]) -> None:
    """Stream one safetensors file: header from the specs, then each group's arrays as they are produced."""
    groups = list(groups)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for g in groups:
        for name, dtype, shape in g.specs:
            size = ST_DTYPES[dtype].itemsize * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for g in groups:
            arrays = g.produce()
            for (name, dtype, shape), array in zip(g.specs, arrays, strict=True):
                array = np.ascontiguousarray(array)
                if array.shape != tuple(shape) or array.dtype != ST_DTYPES[dtype]:
                    raise AssertionError(f"{name}: produced {array.dtype}{array.shape}, header says {dtype}{shape}")
                f.write(array.reshape(-1).view(np.uint8).data)
    os.replace(tmp, file)
