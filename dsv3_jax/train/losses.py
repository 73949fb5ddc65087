"""Training objective: next-token CE + lambda * mean MTP CE + alpha * balance loss (V3 §2.2, §2.1.2)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.backend_policy import Implementation
from dsv3_jax.head_loss import chunked_cross_entropy
from dsv3_jax.layers import Linear
from dsv3_jax.model import Aux
from dsv3_jax.train.config import TrainConfig

# (each prediction head's output [B, T, ...], its targets [B, T]) -> each head's mean cross-entropy [H]
HeadScore = Callable[[list[jax.Array], list[jax.Array]], jax.Array]


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean token cross-entropy in fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT).mean()


def head_score(lm_head: Linear, impl: Implementation) -> tuple[bool, HeadScore]:
    """(whether the model should stop at the lm_head's inputs, how a head's output is scored), as the
    backend policy's `loss` says: whole logits through `cross_entropy`, or hidden states through the chunked
    loss that applies the lm_head itself."""
    if impl.loss == "xla":
        return False, score_logits
    kernel_DV, dtype = lm_head.kernel[...], lm_head.compute_dtype

    def score_hidden(hidden: list[jax.Array], targets: list[jax.Array]) -> jax.Array:
        return chunked_cross_entropy(jnp.stack(hidden), kernel_DV, jnp.stack(targets), impl.loss_chunk, dtype)
    return True, score_hidden


def score_logits(logits: list[jax.Array], targets: list[jax.Array]) -> jax.Array:
    """Each head's `cross_entropy` from its whole logits [B, T, V]: [H]."""
    return jnp.stack([cross_entropy(logits_BTV, targets_BT) for logits_BTV, targets_BT in zip(logits, targets)])


def split_window(window_BS: jax.Array, seq_len: int, mtp_depth: int) -> tuple[jax.Array, jax.Array]:
    """A window of seq_len + 1 + D tokens -> (model input [B, seq_len + D], main targets [B, seq_len]).

    The model sees D extra trailing tokens so MTP depth k can read t_{i+k} for every i < seq_len; causality
    means the first seq_len positions are unaffected by them.
    """
    return window_BS[:, :seq_len + mtp_depth], window_BS[:, 1:seq_len + 1]


def objective(main_out: jax.Array, aux: Aux, window_BS: jax.Array, cfg: TrainConfig, mtp_depth: int,
              score: HeadScore = score_logits, head_inputs: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, parts). Only the first seq_len positions of every head are scored. The heads' outputs are
    logits (`main_out` and `aux.mtp_logits`), or with `head_inputs` the lm_head's inputs (`main_out` and
    `aux.mtp_head_inputs`), which `score` turns into a loss (`head_score`)."""
    seq_len = cfg.seq_len
    mtp_outs = aux.mtp_head_inputs if head_inputs else aux.mtp_logits
    outs = [main_out, *mtp_outs[:mtp_depth]]  # head k predicts t_{i+k+1}
    losses_H = score([out[:, :seq_len] for out in outs],
                     [window_BS[:, k + 1:seq_len + k + 1] for k in range(len(outs))])
    main = losses_H[0]
    mtp = jnp.mean(losses_H[1:]) if len(outs) > 1 else jnp.float32(0.0)
    field = "seq_balance_loss" if cfg.balance_scope == "sequence" else "batch_balance_loss"
    balance = jnp.sum(aux.per_router(field))  # main MoE layers and MTP blocks
    total = main + cfg.mtp_lambda * mtp + cfg.alpha * balance
    return total, {"loss": main, "mtp_loss": mtp, "balance_loss": balance, "total_loss": total}
