"""Parameter accounting from abstract shapes (`jax.eval_shape`): nothing is allocated, so the 671B preset
counts in a second on a laptop."""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from dsv3_jax.config import ModelConfig


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
    """Count parameters of `DeepSeekV3(cfg)` without allocating them."""
    from dsv3_jax.model import init_model  # local: model imports are heavy and cyclic-prone

    abstract = jax.eval_shape(lambda: nnx.state(init_model(cfg), nnx.Param))
    total = routed = mtp_total = mtp_routed = embedding = 0
    for path, leaf in nnx.to_flat_state(abstract):
        size = math.prod(leaf.shape)
        in_mtp = path[0] == "mtp"
        total += size
        mtp_total += size if in_mtp else 0
        if _is_routed_expert(path):
            routed += size
            mtp_routed += size if in_mtp else 0
        if path[0] in ("embed_tokens", "lm_head"):
            embedding += size
    inactive_fraction = 1 - cfg.num_experts_per_tok / cfg.n_routed_experts
    active = total - round(routed * inactive_fraction)
    main_total = total - mtp_total
    main_active = main_total - round((routed - mtp_routed) * inactive_fraction)
    return ParamCount(total=total, active=active, main_total=main_total, main_active=main_active,
                      embedding=embedding, stored_total=total + cfg.mtp_depth * embedding)
