"""Experiment specs: one JSON file per experiment in experiments/configs/, read into small dataclasses.

A spec names its variants as lists of `--set` overrides applied on top of a *scale* (a preset + corpus + base
overrides shared by every experiment, so variants of different experiments with the same overrides are the
same run). A variant may instead say `"same_as": "EXPERIMENT/VARIANT"`: it reuses that run's results
(e.g. the shared-expert experiment's "with shared expert" arm is the baseline run) instead of training twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

EXPERIMENTS_DIR = Path(__file__).resolve().parent
CONFIG_DIR = EXPERIMENTS_DIR / "configs"
RESULTS_DIR = EXPERIMENTS_DIR / "results"
RUNS_DIR = Path("runs") / "experiments"  # relative to the repository root (gitignored)

# Experiments that other people own: their config files may be added later. The runner names them in its
# help and explains what is missing instead of failing with a bare "unknown experiment".
PLANNED = {
    "mla": "MLA vs MHA (KV cache and loss at equal size)",
    "fp8": "FP8 (DeepSeek recipe) vs BF16 training; see experiments/fp8_compare.py",
}

# Why these scales: `cpu` is the `small` preset as `make train` runs it (300 steps of 8 x 256 tokens, about
# 10-20 minutes per variant on 2 CPU cores) on the 15 MB `lit` corpus (3.87M training tokens in 14,988 windows,
# so 300 steps see 16% of it, each window at most once). `long` is the same model ten times longer: 3,000
# steps = 6.1M tokens = 1.6 epochs of lit's training split (every epoch a fresh permutation, so no window is
# seen more than twice), evaluated on the whole validation split (199K tokens) every 300 steps (10 points)
# and checkpointed every 100 steps, so an interrupted run resumes where it stopped (about 75 minutes per
# variant on 2 CPU cores). At the paper's gamma = 0.001 a bias can now move by up to 3.0. `gpu` is for people
# with an accelerator (not run here): about 200M total parameters, 64 routed experts top-6 in 8 groups keeping
# 4 (the LFB 1B model's granularity), bf16 compute, 1000 steps of 32 x 512 tokens. On `lit` that is ~4 passes
# over the training split: give `--corpus files:GLOB` a larger corpus for a paper-like regime.
SCALES: dict[str, dict[str, Any]] = {
    "cpu": {"preset": "small", "corpus": "lit", "set": []},
    "long": {"preset": "small", "corpus": "lit", "set": [
        "train.steps=3000", "train.eval_every=300", "train.eval_batches=0", "train.checkpoint_every=100"]},
    "gpu": {"preset": "small", "corpus": "lit", "set": [
        "model.hidden_size=512", "model.num_hidden_layers=8", "model.first_k_dense_replace=1",
        "model.intermediate_size=1536", "model.num_attention_heads=8", "model.q_lora_rank=192",
        "model.kv_lora_rank=128", "model.qk_nope_head_dim=64", "model.qk_rope_head_dim=32",
        "model.v_head_dim=64", "model.n_routed_experts=64", "model.num_experts_per_tok=6",
        "model.moe_intermediate_size=256", "model.n_group=8", "model.topk_group=4",
        "model.dtype=bfloat16", "model.moe_dispatch=auto",
        "train.steps=1000", "train.batch_size=32", "train.seq_len=512", "train.peak_lr=1e-3",
        "train.eval_every=100", "train.eval_batches=0", "train.checkpoint_every=250"]},
}
DEFAULT_SEEDS = (0,)


class SpecError(ValueError):
    """An experiment config file is malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of an experiment: overrides on top of the scale, or a reference to another experiment's arm."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    same_as: str | None = None  # "EXPERIMENT/VARIANT": reuse that run instead of training this one again
    # Seeds run by default, as (scale, seeds) pairs (a scale not named runs DEFAULT_SEEDS; empty seeds: not run
    # there by default); --seed picks others. Pairs rather than a dict keep the frozen dataclass hashable.
    seeds: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def seeds_for(self, scale: str) -> tuple[int, ...]:
        """The seeds this variant runs at `scale` unless --seed says otherwise."""
        return dict(self.seeds).get(scale, DEFAULT_SEEDS)

    def source(self, experiment: str) -> tuple[str, str]:
        """(experiment, variant) whose run holds this variant's results."""
        if self.same_as is None:
            return experiment, self.name
        exp, var = self.same_as.split("/")
        return exp, var


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A parsed experiments/configs/NAME.json."""

    name: str
    title: str
    description: str
    variants: tuple[Variant, ...]
    plots: tuple[str, ...] = ("loss",)
    paper: tuple[dict[str, Any], ...] = ()  # reference numbers, each {"metric", "variant", "value", "source"}

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise SpecError(f"{self.name}: no variant {name!r}; choose from {[v.name for v in self.variants]}")


PLOT_KINDS = ("loss", "maxvio", "expert_load", "mtp")


def available() -> list[str]:
    """Names of the experiments that have a config file."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load(name: str, config_dir: Path = CONFIG_DIR) -> Experiment:
    """Read and check experiments/configs/NAME.json."""
    path = config_dir / f"{name}.json"
    if not path.is_file():
        if name in PLANNED:
            raise SpecError(f"experiment {name!r} ({PLANNED[name]}) has no config file yet: add {path}")
        raise SpecError(f"unknown experiment {name!r}; available: {available()}, planned: {sorted(PLANNED)}")
    with open(path) as f:
        raw = json.load(f)
    return parse(raw, where=str(path))


def parse(raw: dict[str, Any], where: str = "<spec>") -> Experiment:
    """Build an Experiment from the JSON dict, naming the first malformed field."""
    def need(obj: dict, key: str, kind: type, ctx: str) -> Any:
        if key not in obj or not isinstance(obj[key], kind):
            raise SpecError(f"{where}: {ctx}{key} must be a {kind.__name__}")
        return obj[key]

    name = need(raw, "name", str, "")
    variants = []
    for i, v in enumerate(need(raw, "variants", list, "")):
        ctx = f"variants[{i}]."
        vname = need(v, "name", str, ctx)
        if vname in SCALES or "/" in vname:
            raise SpecError(f"{where}: {ctx}name {vname!r} may not be a scale name or contain '/'")
        same_as = v.get("same_as")
        if same_as is not None and (not isinstance(same_as, str) or same_as.count("/") != 1):
            raise SpecError(f"{where}: {ctx}same_as must look like 'experiment/variant', got {same_as!r}")
        if same_as is not None and v.get("set"):
            raise SpecError(f"{where}: {ctx} has both same_as and set; overrides belong to the source variant")
        overrides = v.get("set", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise SpecError(f"{where}: {ctx}set must be a list of 'section.field=value' strings")
        variants.append(Variant(name=vname, label=v.get("label", vname), overrides=tuple(overrides),
                                same_as=same_as, seeds=_parse_seeds(v.get("seeds"), f"{where}: {ctx}seeds")))
    names = [v.name for v in variants]
    if len(set(names)) != len(names) or not names:
        raise SpecError(f"{where}: variant names must be unique and non-empty, got {names}")
    plots = tuple(raw.get("plots", ["loss"]))
    unknown = [p for p in plots if p not in PLOT_KINDS]
    if unknown:
        raise SpecError(f"{where}: plots {unknown} unknown; known: {PLOT_KINDS}")
    return Experiment(name=name, title=raw.get("title", name), description=raw.get("description", ""),
                      variants=tuple(variants), plots=plots, paper=tuple(raw.get("paper", [])))


def _parse_seeds(raw: Any, where: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A variant's "seeds": absent (DEFAULT_SEEDS everywhere), a list (the same at every scale) or an object
    {scale: list} (other scales run DEFAULT_SEEDS; an empty list means not run at that scale by default)."""
    def seed_list(value: Any, ctx: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                  for x in value):
            raise SpecError(f"{ctx} must be a list of integers >= 0, got {value!r}")
        return tuple(value)

    if raw is None:
        return ()
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - set(SCALES))
        if unknown:
            raise SpecError(f"{where} names unknown scales {unknown}; scales: {sorted(SCALES)}")
        return tuple((scale, seed_list(value, f"{where}.{scale}")) for scale, value in raw.items())
    listed = seed_list(raw, where)
    return tuple((scale, listed) for scale in SCALES)


def overrides_for(experiment: Experiment, variant: Variant, scale: str, seed: int) -> tuple[str, str, list[str]]:
    """(preset, corpus, overrides) of one run: the scale's base overrides, the variant's, then the seed."""
    if scale not in SCALES:
        raise SpecError(f"unknown scale {scale!r}; choose from {sorted(SCALES)}")
    if variant.same_as is not None:
        src_exp, src_var = variant.source(experiment.name)
        source = load(src_exp).variant(src_var)
        if source.same_as is not None:
            raise SpecError(f"{experiment.name}/{variant.name}: same_as chains are not allowed")
        return overrides_for(load(src_exp), source, scale, seed)
    base = SCALES[scale]
    return base["preset"], base["corpus"], [*base["set"], *variant.overrides, f"train.seed={seed}"]


def planned_steps(experiment: Experiment, variant: Variant, scale: str, seed: int) -> int:
    """The number of training steps the spec gives one run (its preset's, after the scale's and the variant's
    overrides): the step a run must reach, with its evaluation, to count as finished."""
    from dsv3_jax.config import get_preset  # the library only where a step count is needed
    from dsv3_jax.train.config import Config, apply_overrides
    from dsv3_jax.train.presets import train_preset

    preset, _, overrides = overrides_for(experiment, variant, scale, seed)
    return apply_overrides(Config(model=get_preset(preset), train=train_preset(preset)), overrides).train.steps


def experiment_dir(experiment: str, scale: str) -> Path:
    """Relative directory of an experiment's runs at one scale, under runs/experiments and experiments/results:
    the cpu scale carries no scale directory (its results predate the others), every other scale does."""
    return Path(experiment) if scale == "cpu" else Path(experiment, scale)


def run_key(experiment: str, variant: str, scale: str, seed: int) -> Path:
    """Relative path of one run under runs/experiments and experiments/results."""
    return experiment_dir(experiment, scale) / variant / f"seed{seed}"
