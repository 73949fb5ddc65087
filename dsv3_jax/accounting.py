"""Parameter accounting from abstract shapes (`jax.eval_shape`): nothing is allocated, so the 671B preset
counts in a second on a laptop.

Every dense decoder layer has the same parameters, as has every MoE layer and every MTP module, so only one of
each kind is traced (`layer_templates`) and its counts are multiplied by how many the real model has. The work
does not depend on `num_hidden_layers` or the MTP depth. Tracing the whole model instead costs time quadratic in
depth: every RNG draw of nnx's init updates a counter Variable, whose `set_value` reads `.sharding` off the
traced value, and a tracer answers that with an AttributeError whose message (`_origin_msg`) walks every
equation traced so far (jax `find_progenitors`); ~12 draws per layer x a trace that grows with the layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.partitioning import logical_axes


@dataclasses.dataclass(frozen=True)
class TemplateLeaf:
    """One variable of the reduced model, standing for `len(indices)` identical variables of the real one.

    `path` is the reduced model's flat-state path. For a leaf under `layers` or `mtp`, `indices` are the real
    model's indices of that list the leaf stands for (its dense layers, its MoE layers, or all MTP modules);
    for any other leaf, `indices` is None and the leaf stands for itself.
    """

    path: tuple
    shape: tuple[int, ...]
    dtype: str
    indices: range | None = None
    axes: tuple[str | None, ...] | None = None  # the logical axes the variable was created with
    quantised: bool = False  # its GEMM runs through an FP8 recipe (`layers.quantised_if`)

    @property
    def copies(self) -> int:
        return 1 if self.indices is None else len(self.indices)

    @property
    def size(self) -> int:
        """Elements of one copy."""
        return math.prod(self.shape)

    def paths(self) -> Iterator[tuple]:
        """The real model's paths of every copy (O(copies): only for callers that need each leaf)."""
        if self.indices is None:
            yield self.path
        else:
            for i in self.indices:
                yield (self.path[0], i, *self.path[2:])


def reduced_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with at most one dense layer, one MoE layer and one MTP module: one of every kind it has.

    Always the unrolled layout: a scanned stack holds the same per-layer variables with a leading layer
    axis (never sharded), so templates named `layers/{i}/...` describe either layout."""
    n_layers, n_dense = cfg.num_hidden_layers, cfg.first_k_dense_replace
    kept_dense, kept_moe = min(n_dense, 1), min(n_layers - n_dense, 1)
    return cfg.replace(num_hidden_layers=kept_dense + kept_moe, first_k_dense_replace=kept_dense,
                       num_nextn_predict_layers=min(cfg.mtp_depth, 1), scan_layers=False)


def _template_indices(cfg: ModelConfig, path: tuple) -> range | None:
    if path[0] == "layers":
        kept_dense = min(cfg.first_k_dense_replace, 1)
        if path[1] < kept_dense:
            return range(cfg.first_k_dense_replace)
        return range(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    if path[0] == "mtp":
        return range(cfg.mtp_depth)
    return None


@functools.lru_cache(maxsize=16)
def layer_templates(cfg: ModelConfig) -> tuple[tuple[TemplateLeaf, ...], tuple[TemplateLeaf, ...]]:
    """(trainable params, router biases) of `DeepSeekV3(cfg)` as templates, from one `jax.eval_shape` of
    `reduced_config(cfg)`: a constant amount of work whatever the depth."""
    from dsv3_jax.model import init_model  # local: model imports are heavy and cyclic-prone
    from dsv3_jax.moe import RouterBias

    cfg.validate()
    reduced = reduced_config(cfg)

    def build():
        _, params, biases = nnx.split(init_model(reduced), nnx.Param, RouterBias)
        return params, biases

    def templates(state) -> tuple[TemplateLeaf, ...]:
        return tuple(TemplateLeaf(tuple(path), tuple(leaf.shape), jnp.dtype(leaf.dtype).name,
                                  _template_indices(cfg, path), logical_axes(leaf),
                                  bool(leaf.get_metadata().get("quantised")))
                     for path, leaf in nnx.to_flat_state(state))

    params, biases = jax.eval_shape(build)
    return templates(params), templates(biases)


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Trainable parameter counts; `active` counts only the top-k routed experts a token uses."""

    total: int  # main model + MTP modules
    active: int
    main_total: int  # without the MTP modules
    main_active: int
    embedding: int  # embed_tokens + lm_head (shared by MTP, counted once)
    stored_total: int  # as in an HF checkpoint, whose MTP layers hold their own embedding and head copies

    def summary(self) -> str:
        b = lambda n: f"{n / 1e9:.2f}B"  # noqa: E731
        return (f"main model: {b(self.main_total)} total, {b(self.main_active)} active per token; "
                f"with MTP: {b(self.total)} total, {b(self.active)} active "
                f"({b(self.stored_total)} stored in an HF checkpoint)")


def _is_routed_expert(path: tuple) -> bool:
    return "experts" in path and "shared_experts" not in path


def count_params(cfg: ModelConfig) -> ParamCount:
    """Count parameters of `DeepSeekV3(cfg)` without allocating them (per-kind templates x their copies)."""
    total = routed = mtp_total = mtp_routed = embedding = 0
    for leaf in layer_templates(cfg)[0]:
        path = leaf.path
        size = leaf.size * leaf.copies
        in_mtp = path[0] == "mtp"
        total += size
        mtp_total += size if in_mtp else 0
        if _is_routed_expert(path):
            routed += size
            mtp_routed += size if in_mtp else 0
        if path[0] in ("embed_tokens", "lm_head"):
            embedding += size
    # Exact rational arithmetic: a float fraction loses whole parameters once counts pass 2**53 (deep models).
    inactive_fraction = Fraction(cfg.n_routed_experts - cfg.num_experts_per_tok, cfg.n_routed_experts)
    active = total - round(routed * inactive_fraction)
    main_total = total - mtp_total
    main_active = main_total - round((routed - mtp_routed) * inactive_fraction)
    return ParamCount(total=total, active=active, main_total=main_total, main_active=main_active,
                      embedding=embedding, stored_total=total + cfg.mtp_depth * embedding)
