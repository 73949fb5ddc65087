"""A run's checkpoint as an HF checkpoint directory, streamed tensor by tensor (`python -m dsv3_jax export`).

The newest checkpoint step is read slice by slice straight from orbax's files (`checkpoint.SavedArrays`: one
layer of one stacked variable, one expert at a time), so host memory stays near the largest HF tensor whatever
the model's size; `convert.to_hf` names, transposes, optionally FP8-quantises and writes them. The directory
is assembled under a temporary name and renamed when complete: an interrupted export leaves no half-written
HF directory behind, and an existing one is never touched. In a multi-process job every process writes its
share of the shard files (on storage all hosts share) and process 0 the config, index and tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import jax
from flax import nnx

from dsv3_jax import distributed
from dsv3_jax.checkpoint import RunCheckpointer, SavedArrays
from dsv3_jax.convert import to_hf
from dsv3_jax.layout import leaves
from dsv3_jax.loading import check_run_dir
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.moe import RouterBias
from dsv3_jax.rundir import TOKENIZER_NAME
from dsv3_jax.train.config import Config

DEFAULT_SHARD_BYTES = 5 * 2 ** 30  # the published checkpoints' shard size


class ExportError(ValueError):
    """An export refused before anything was written; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    directory: Path
    step: int
    files: int
    bytes: int
    seconds: float


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16", fp8: bool = False,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportResult:
    """Write the newest checkpoint of `run_dir` to `out_dir` (which must not exist, or be empty) as config.json,
    `model-0000k-of-0000n.safetensors` with their index, and the run's tokenizer."""
    run = check_run_dir(run_dir)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {str(out)!r} exists and is not an empty directory; choose a new one")
    if max_shard_bytes < 1:
        raise ExportError(f"the shard size must be positive, got {max_shard_bytes}")
    reader = RunCheckpointer(run, writable=False)
    try:
        newest = reader.read_config()
    finally:
        reader.close()
    if newest is None:
        raise ExportError(f"no checkpoint in {run / 'checkpoints'} has readable metadata")
    step, saved = newest
    model_cfg = Config.from_dict(saved).model  # the checkpoint's own shapes
    arrays = SavedArrays(run / "checkpoints" / str(step))
    model = nnx.eval_shape(lambda: DeepSeekV3(model_cfg, nnx.Rngs(0)))
    section = {name: "biases" if isinstance(var, RouterBias) else "params" for name, var in leaves(model)}

    def stored(path: str) -> str:
        return f"{section[path]}.{path}.value"

    def read(path: str, index: tuple[int, ...]):
        return arrays.read(stored(path), index)

    def order(path: str, index: tuple[int, ...]):  # each stored chunk is read once
        return arrays.block_order(stored(path), index)

    started = time.perf_counter()
    writer, writers = jax.process_index(), jax.process_count()
    partial = out.with_name(f".{out.name}.partial")  # one name: every process of the job writes into it
    try:
        if writer == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        distributed.barrier("dsv3_jax.export_start")
        # each process writes every writers-th shard file (on storage all hosts share); process 0 the rest
        mine: list[str] = []
        to_hf(model, partial, dtype=dtype, fp8=fp8, max_shard_bytes=max_shard_bytes, read=read, order=order,
              share=(writer, writers), written=mine)
        distributed.barrier("dsv3_jax.export_written")
        if writer == 0:
            tokenizer = run / TOKENIZER_NAME
            if tokenizer.is_file():
                shutil.copyfile(tokenizer, partial / "tokenizer.json")
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(partial, out)
        distributed.barrier("dsv3_jax.export_done")
    except BaseException:
        if writer == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    files = sorted(out.glob("*.safetensors"))
    if writers > 1:
        print(f"process {writer} wrote {len(mine)} of the {len(files)} shard files", file=sys.stderr)
    return ExportResult(directory=out, step=step, files=len(files), bytes=sum(f.stat().st_size for f in files),
                        seconds=time.perf_counter() - started)
