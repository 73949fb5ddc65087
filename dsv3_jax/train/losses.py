"""Training objective: next-token CE + lambda * mean MTP CE + alpha * balance loss (V3 §2.2, §2.1.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.model import Aux
from dsv3_jax.train.config import TrainConfig


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean token cross-entropy in fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT).mean()


def split_window(window_BS: jax.Array, seq_len: int, mtp_depth: int) -> tuple[jax.Array, jax.Array]:
    """A window of seq_len + 1 + D tokens -> (model input [B, seq_len + D], main targets [B, seq_len]).

    The model sees D extra trailing tokens so MTP depth k can read t_{i+k} for every i < seq_len; causality
    means the first seq_len positions are unaffected by them.
    """
    return window_BS[:, :seq_len + mtp_depth], window_BS[:, 1:seq_len + 1]


def objective(logits_BTV: jax.Array, aux: Aux, window_BS: jax.Array, cfg: TrainConfig,
              mtp_depth: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, parts). Only the first seq_len positions of every head are scored."""
    seq_len = cfg.seq_len
    main = cross_entropy(logits_BTV[:, :seq_len], window_BS[:, 1:seq_len + 1])
    mtp_losses = [cross_entropy(m[:, :seq_len], window_BS[:, k + 1:seq_len + k + 1])
                  for k, m in enumerate(aux.mtp_logits[:mtp_depth], start=1)]
    mtp = jnp.mean(jnp.stack(mtp_losses)) if mtp_losses else jnp.float32(0.0)
    field = "seq_balance_loss" if cfg.balance_scope == "sequence" else "batch_balance_loss"
    balance = jnp.sum(aux.per_router(field))  # main MoE layers and MTP blocks
    total = main + cfg.mtp_lambda * mtp + cfg.alpha * balance
    return total, {"loss": main, "mtp_loss": mtp, "balance_loss": balance, "total_loss": total}
