"""Models for inference: a training run's latest checkpoint (with its corpus tokenizer) or an HF DeepSeek-V3
safetensors directory (with its tokenizer.json when there is one).

Every check that needs no tensors (directory, config, checkpoint presence) runs before anything is read, so a
wrong path fails in milliseconds. Models are built with `generate.inference_config` (dropless MoE).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

from dsv3_jax.generate import GenerationError, inference_config
from dsv3_jax.hf_config import from_hf


class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass
class LoadedModel:
    cfg: Any  # ModelConfig the model was built with
    model: Any  # DeepSeekV3
    tokenizer: TextCodec | None  # None: only token ids in and out
    stop_ids: tuple[int, ...]  # end-of-text ids
    source: str  # what was loaded, for messages


class HFTokenizer:
    """An HF `tokenizer.json` (whatever its special tokens) behind the encode/decode interface."""

    def __init__(self, path: Path):
        import tokenizers

        try:
            self.inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the Rust library raises a bare Exception
            raise GenerationError(f"{path}: not a valid tokenizer.json ({' '.join(str(err).split())[:200]})") from None

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=False)


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """The run directory if it holds a config and at least one checkpoint step, else GenerationError."""
    from dsv3_jax.rundir import RunDirError, has_checkpoints, require_run_dir

    try:
        path = require_run_dir(run_dir)
    except RunDirError as err:
        raise GenerationError(str(err)) from None
    if not has_checkpoints(path):
        raise GenerationError(f"{str(path)!r} has no checkpoint under checkpoints/: train it first")
    return path


def check_hf_dir(hf_dir: str | os.PathLike) -> Path:
    """The HF checkpoint directory if it holds a config.json and safetensors, else GenerationError."""
    path = Path(hf_dir)
    if path.is_file():
        raise GenerationError(f"--hf {str(path)!r} is a file: give the checkpoint directory (the one holding "
                              "config.json and the safetensors)")
    if not path.is_dir():
        raise GenerationError(f"HF checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise GenerationError(f"{str(path)!r} has no config.json: not an HF checkpoint directory")
    if not any(path.glob("*.safetensors")):
        raise GenerationError(f"{str(path)!r} has no .safetensors file")
    return path


def _cache_dir(configured: str) -> Path:
    """A relative data cache is looked up from the working directory, then from the repository root."""
    from dsv3_jax.data.fetch import REPO_ROOT

    path = Path(configured)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def run_tokenizer(run_dir: str | os.PathLike, config: Any, log: Any = None) -> Any:
    """The tokenizer the run trained with: its own RUN/tokenizer.json. Runs made before runs carried their
    tokenizer get the corpus's BPE rebuilt from the corpus (identical only if the corpus has not changed)."""
    from dsv3_jax.data import get_tokenizer, load_tokenizer, prepare_corpus
    from dsv3_jax.rundir import legacy_tokenizer_note, run_tokenizer_path

    own = run_tokenizer_path(run_dir)
    if own is not None:
        return load_tokenizer(own)
    if log is not None:
        log(legacy_tokenizer_note(run_dir, config.data.corpus))
    cache = _cache_dir(config.data.cache_dir)
    corpus = prepare_corpus(config.data.corpus, cache)
    return get_tokenizer(corpus, config.model.vocab_size, cache)


def run_config(run_dir: str | os.PathLike) -> Any:
    """The run's saved `train.config.Config` (after checking the directory holds a run with a checkpoint)."""
    from dsv3_jax.train.config import read_run_config

    return read_run_config(check_run_dir(run_dir))


def load_run(run_dir: str | os.PathLike, with_tokenizer: bool = True) -> LoadedModel:
    """The latest restorable checkpoint of a training run, as a dropless inference model."""
    from flax import nnx

    from dsv3_jax.model import init_model
    from dsv3_jax.moe import RouterBias
    from dsv3_jax.train.setup import build_on_one_device

    config = run_config(run_dir)
    path = Path(run_dir)
    tokenizer = run_tokenizer(path, config) if with_tokenizer else None
    # Restore onto this process's first device whatever mesh the run trained on.
    restored = restore_for_reading(path, config, build_on_one_device(config).abstract)
    if restored is None:
        raise GenerationError(f"no restorable checkpoint in {path / 'checkpoints'}")
    step, state = restored.step, restored.state
    cfg = inference_config(config.model)
    graphdef = nnx.split(nnx.eval_shape(lambda: init_model(cfg)), nnx.Param, RouterBias)[0]
    model = nnx.merge(graphdef, state.params, state.biases)
    stop = (tokenizer.eos_id,) if tokenizer is not None else ()
    return LoadedModel(cfg=cfg, model=model, tokenizer=tokenizer, stop_ids=stop, source=f"{path} step {step}")


def _reading_state(params: Any, biases: Any) -> Any:
    """A weights-only checkpoint (a conversion) as the state readers use: its weights, step 0, no optimizer."""
    import numpy as np

    from dsv3_jax.train.step import TrainState

    zero = np.zeros((), np.int32)
    return TrainState(step=zero, params=params, biases=biases, opt_state=None, nonfinite_streak=zero,
                      skipped_total=zero)


def restore_for_reading(run_dir: str | os.PathLike, config: Any, abstract_state: Any) -> Any:
    """The newest restorable checkpoint of a run, read-only (eval, generate): nothing in the run directory is
    created or changed, and a skipped newer checkpoint is reported in one line on stderr."""
    import sys

    from dsv3_jax.checkpoint import RunCheckpointer

    checkpointer = RunCheckpointer(run_dir, keep=config.train.keep_checkpoints, writable=False)
    try:
        restored = checkpointer.restore_latest(abstract_state, from_weights=_reading_state)
    finally:
        checkpointer.close()
    for step, reason in restored.skipped if restored is not None else ():
        print(f"note: checkpoint {step} does not restore ({reason}); using step {restored.step}", file=sys.stderr)
    return restored


def hf_config(hf_dir: str | os.PathLike, dtype: str = "float32") -> Any:
    """The inference ModelConfig of an HF checkpoint directory, from its config.json alone."""
    path = check_hf_dir(hf_dir)
    return from_hf(path, dtype=dtype, param_dtype=dtype, capacity_factor=None)


def hf_tokenizer(hf_dir: str | os.PathLike) -> HFTokenizer | None:
    """The directory's tokenizer.json, or None when it has none."""
    file = Path(hf_dir) / "tokenizer.json"
    return HFTokenizer(file) if file.is_file() else None


def hf_stop_ids(path: str | os.PathLike) -> tuple[int, ...]:
    """eos_token_id from generation_config.json, else config.json (an int or a list)."""
    from dsv3_jax.config_fields import read_json_object

    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if file.is_file():
            eos = read_json_object(str(file), "an HF model or generation config").get("eos_token_id")
            if eos is None:
                continue
            ids = eos if isinstance(eos, list) else [eos]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise GenerationError(f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}")
            return tuple(ids)
    return ()


def load_hf(hf_dir: str | os.PathLike, dtype: str = "float32", with_tokenizer: bool = True) -> LoadedModel:
    """An HF DeepSeek-V3 safetensors directory (bf16/fp32 or FP8 block-scaled) as a dropless inference model."""
    from dsv3_jax import convert

    path = check_hf_dir(hf_dir)
    tokenizer = hf_tokenizer(path) if with_tokenizer else None
    cfg, model = convert.from_hf(path, dtype=dtype, capacity_factor=None)
    return LoadedModel(cfg=cfg, model=model, tokenizer=tokenizer, stop_ids=hf_stop_ids(path), source=str(path))
