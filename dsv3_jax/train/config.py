"""TrainConfig and the run-level Config (model + train + data) with dotted `--set` overrides."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from dsv3_jax.config import ModelConfig, get_preset
from dsv3_jax.config_fields import (ConfigError, apply_overrides, build_dataclass, check_field_types,
                                    read_json_object)

__all__ = ["BALANCE_MODES", "BALANCE_SCOPES", "Config", "DataConfig", "MeshConfig", "TrainConfig", "apply_overrides",
           "layout_name", "read_run_config", "saved_scan_layers"]

BALANCE_MODES = ("aux_free", "aux_loss", "none")
BALANCE_SCOPES = ("sequence", "batch")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, balancing, evaluation and checkpointing; V3's recipe where the paper gives one."""

    steps: int = 1000
    batch_size: int = 16  # global sequences per step
    grad_accum: int = 1  # microbatches per step: batch_size / grad_accum sequences per forward/backward pass
    seq_len: int = 256
    seed: int = 0
    # AdamW (V3 §4.2) and the V3-shaped schedule: linear warmup, constant, cosine decay, constant tail.
    peak_lr: float = 1e-3
    final_lr_ratio: float = 0.1  # 2.2e-4 -> 2.2e-5 in the paper
    warmup_frac: float = 0.05
    decay_start_frac: float = 0.4
    decay_end_frac: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Losses and balancing.
    mtp_lambda: float = 0.3
    balance: str = "aux_free"  # aux_free | aux_loss | none
    bias_update_rate: float = 0.001  # gamma of the aux-loss-free bias update
    balance_alpha: float | None = None  # None: 1e-4 (aux_free's sequence-wise loss) or 1e-3 (aux_loss)
    balance_scope: str = "sequence"  # sequence-wise (V3) or batch-wise statistics for the balance loss
    # Bookkeeping.
    eval_every: int = 100
    eval_batches: int = 0  # 0 = the whole validation split
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    max_consecutive_nonfinite: int = 5
    # Where the weights came from (`train --init-from HF_DIR` sets both): the checkpoint directory and the
    # sha256 of its index (hf_init.source_record). None: initialised from `seed`.
    init_from: str | None = None
    init_from_sha256: str | None = None

    @property
    def microbatch_size(self) -> int:
        """Sequences per forward/backward pass (the global batch over `grad_accum`)."""
        return self.batch_size // self.grad_accum

    @property
    def alpha(self) -> float:
        if self.balance_alpha is not None:
            return self.balance_alpha
        return {"aux_free": 1e-4, "aux_loss": 1e-3, "none": 0.0}[self.balance]

    def validate(self) -> "TrainConfig":
        check_field_types(self, "train.")  # types first: the rules below compare these values
        for name in ("batch_size", "grad_accum", "seq_len", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "log_every", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be an integer >= 1, got {getattr(self, name)!r}")
        if self.steps < (0 if self.init_from else 1):  # 0 from published weights: a conversion, nothing trains
            raise ConfigError("train.steps", f"must be an integer >= {0 if self.init_from else 1} "
                              f"(0 only with --init-from), got {self.steps!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError("train.grad_accum", f"{self.grad_accum} microbatches do not split "
                              f"train.batch_size={self.batch_size} evenly")
        if self.eval_batches < 0:
            raise ConfigError("train.eval_batches", f"must be an integer >= 0, got {self.eval_batches!r}")
        for name in ("peak_lr", "eps", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name}", f"must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "mtp_lambda", "bias_update_rate"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "final_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.{name}", f"must be in [0, 1], got {getattr(self, name)!r}")
        if not 0 <= self.warmup_frac <= self.decay_start_frac <= self.decay_end_frac <= 1:
            raise ConfigError("train.warmup_frac", "need 0 <= warmup_frac <= decay_start_frac <= decay_end_frac <= 1, "
                              f"got {self.warmup_frac}, {self.decay_start_frac}, {self.decay_end_frac}")
        if self.balance not in BALANCE_MODES:
            raise ConfigError("train.balance", f"must be one of {BALANCE_MODES}, got {self.balance!r}")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ConfigError("train.balance_scope", f"must be one of {BALANCE_SCOPES}, got {self.balance_scope!r}")
        if self.balance_alpha is not None and not self.balance_alpha >= 0:
            raise ConfigError("train.balance_alpha", f"must be >= 0, got {self.balance_alpha!r}")
        return self


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which corpus and tokenizer the run trains on."""

    corpus: str = "shakespeare"
    vocab_size: int | None = None  # None: the model's vocab_size
    cache_dir: str = "data_cache"
    # An HF tokenizer.json (or a directory holding one, as a hub checkpoint does) instead of the BPE trained on
    # the corpus; its vocabulary and end-of-text token are read from it.
    tokenizer: str | None = None
    text_field: str = "text"  # the field holding the text in .jsonl(.gz/.zst), Parquet and Arrow files
    workers: int = 0  # processes encoding the corpus on its first use; 0: one per core (the result is the same)
    token_dtype: str = "uint16"  # tokens:DIR shards in .bin / .array_record files (.npy files carry their own)

    def validate(self) -> "DataConfig":
        if not self.text_field:
            raise ConfigError("data.text_field", "must name a field, got an empty string")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError("data.workers", f"must be an integer >= 0 (0: one per core), got {self.workers!r}")
        if self.token_dtype not in ("uint16", "uint32", "int32"):
            raise ConfigError("data.token_dtype", f"must be uint16, uint32 or int32, got {self.token_dtype!r}")
        if self.corpus.startswith("tokens:"):
            if not os.path.isdir(os.path.expanduser(self.corpus[len("tokens:"):])):
                raise ConfigError("data.corpus", f"{self.corpus}: no such directory of token shards")
            if self.tokenizer is None:
                raise ConfigError("data.tokenizer", f"{self.corpus} holds token ids: name the tokenizer that "
                                  "produced them (generate decodes with it)")
        if self.tokenizer is not None:
            given = os.path.expanduser(self.tokenizer)
            path = os.path.join(given, "tokenizer.json") if os.path.isdir(given) else given
            if not os.path.isfile(path):
                raise ConfigError("data.tokenizer", f"no tokenizer.json at {self.tokenizer}")
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, expert, tensor); sizes multiply to the device count, one may be -1 (the rest).

    Not part of a run's identity: a checkpoint resumes on any mesh, so resume ignores this section.
    """

    data: int = -1  # batch (data parallel); the default puts every device here
    expert: int = 1  # routed experts (expert parallel); the batch is split over data*expert
    tensor: int = 1  # attention heads, MLP / expert hidden dims and vocab (tensor parallel)
    fsdp: bool = False  # also split weights' hidden dim over data (ZeRO-3 style)

    def validate(self) -> "MeshConfig":
        """Sizes only; against devices and model dims: `sharding.plan_from_config`."""
        from dsv3_jax.partitioning import resolve_mesh_shape  # the one check of mesh sizes

        check_field_types(self, "mesh.")
        resolve_mesh_shape(self.data, self.expert, self.tensor, None)
        return self

    def shape(self, n_devices: int | None) -> dict[str, int]:
        """{data, expert, tensor} over `n_devices` (the -1 axis takes the rest; 1 when unknown)."""
        from dsv3_jax.partitioning import MESH_AXES, resolve_mesh_shape

        return dict(zip(MESH_AXES, resolve_mesh_shape(self.data, self.expert, self.tensor, n_devices)))


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs; saved next to its checkpoints so `eval`/`resume` rebuild the same run."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: get_preset("small"))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def validate(self) -> "Config":
        """ConfigError naming the first bad field from the root (`train.peak_lr`, `model.rope_scaling.factor`)."""
        check_field_types(self)  # every section's types, named from the root, before any rule reads them
        try:
            self.model.validate()
        except ConfigError as err:  # ModelConfig names its fields bare; here they live under `model.`
            raise err.within("model") from None
        self.train.validate()
        self.mesh.validate()
        self.data.validate()
        if self.data.vocab_size is not None and self.data.vocab_size != self.model.vocab_size:
            raise ConfigError("data.vocab_size", f"{self.data.vocab_size} differs from model.vocab_size="
                              f"{self.model.vocab_size}; set model.vocab_size instead")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """The validated Config of `to_dict` output (e.g. a run's config.json, perhaps edited by hand).

        A missing section or field takes its default; an unknown key, a wrong type or an impossible value is a
        ConfigError naming the field. A saved config without `model.scan_layers` predates that field and
        describes a run whose layers were unrolled (`saved_scan_layers`).
        """
        if isinstance(d, Mapping) and isinstance(d.get("model"), Mapping):
            d = {**d, "model": {**d["model"], "scan_layers": saved_scan_layers(d)}}
        return build_dataclass(cls, d, "").validate()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        """`from_dict` of a JSON file; bad JSON is a ConfigError naming the file and where it breaks."""
        path = os.fspath(path)
        sections = read_json_object(path, "a run's config sections")
        try:
            return cls.from_dict(sections)
        except ConfigError as err:
            raise ConfigError(err.field, f"{err.message} (in {path})") from None


def saved_scan_layers(saved: Mapping[str, Any]) -> Any:
    """`model.scan_layers` of a saved config dict: configs written before the field existed were unrolled."""
    model = saved.get("model")
    return model.get("scan_layers", False) if isinstance(model, Mapping) else False


def layout_name(scan_layers: bool) -> str:
    """How a layout is named in messages."""
    return ("scanned layers (model.scan_layers=true: dense_layers/ and moe_layers/ stacks)" if scan_layers
            else "unrolled layers (model.scan_layers=false: layers/0/, layers/1/, ...)")


def read_run_config(run_dir: str | os.PathLike) -> Config:
    """RUN/config.json as a validated `Config`; a RunDirError naming the file and field if the file is not
    valid JSON or not a valid configuration (e.g. edited by hand)."""
    from dsv3_jax.rundir import RunDirError

    path = os.path.join(run_dir, "config.json")
    try:
        return Config.load(path)
    except ConfigError as err:  # bad JSON names the file already; a bad field gets it here
        raise RunDirError(str(err) if str(path) in str(err) else f"{path}: {err}") from None
