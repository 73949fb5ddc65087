"""AdamW with global-norm clipping and DeepSeek-V3's learning-rate shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.train.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> peak, constant, cosine decay to peak * final_lr_ratio, then a constant tail."""
    warmup = max(1, round(cfg.warmup_frac * cfg.steps))
    decay_start = max(warmup, round(cfg.decay_start_frac * cfg.steps))
    decay_end = max(decay_start + 1, round(cfg.decay_end_frac * cfg.steps))
    final = cfg.peak_lr * cfg.final_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.peak_lr * jnp.minimum(step + 1, warmup) / warmup  # step 0 already trains a little
        progress = jnp.clip((step - decay_start) / (decay_end - decay_start), 0.0, 1.0)
        cosine = final + (cfg.peak_lr - final) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def _decay_mask(params):
    """Decay matrices only: norms (1-D weights) are left alone, as is common practice."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=_decay_mask),
    )
