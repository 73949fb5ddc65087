"""Names of the intermediates that rematerialisation policies may keep (`jax.ad_checkpoint.checkpoint_name`).

A leaf module: the layers tag their outputs with these names, `dsv3_jax.stack` turns `model.remat` into a
policy over them, and `dsv3_jax.plan` counts what each policy keeps. One list, so the three cannot drift.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

MLA_Q_LATENT = "mla_q_latent"  # q_a_proj output [N, q_lora]
MLA_Q = "mla_q"  # q_b_proj / q_proj output [N, H (dn + dr)]
MLA_KV_LATENT = "mla_kv_latent"  # kv_a_proj_with_mqa output [N, C + dr]
MLA_KV = "mla_kv"  # kv_b_proj output [N, H (dn + dv)]
MLA_ATTENTION_OUT = "mla_attention_out"  # softmax(QK^T) V, the o_proj input [N, H dv]
EXPERT_GATE = "expert_gate"  # routed-expert gate GEMM output [dispatch rows, F]
EXPERT_UP = "expert_up"  # routed-expert up GEMM output [dispatch rows, F]
MLP_GATE = "mlp_gate"  # dense-layer and shared-expert gate GEMM output [N, F]
MLP_UP = "mlp_up"  # dense-layer and shared-expert up GEMM output [N, F]

# `model.remat=minimal` keeps these: linear in tokens to store, each a GEMM (or the whole attention core,
# for the o_proj input) to recompute.
MINIMAL_SAVED = (MLA_Q_LATENT, MLA_Q, MLA_KV_LATENT, MLA_KV, MLA_ATTENTION_OUT, EXPERT_GATE, EXPERT_UP, MLP_GATE,
                 MLP_UP)


def tag(x: jax.Array, name: str) -> jax.Array:
    """`x` named for rematerialisation policies (an identity in the forward pass)."""
    return checkpoint_name(x, name)
