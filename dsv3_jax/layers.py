"""Basic layers: RMSNorm, Linear with an injectable dot_general, Embed, SwiGLU MLP.

Parameters are stored in `cfg.param_dtype` (fp32 master weights by default) and cast to `cfg.dtype` for
compute. Kernels use the JAX layout [in, out]; the HF/PyTorch layout [out, in] is transposed on import.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.remat_names import MLP_GATE, MLP_UP, tag
from dsv3_jax.partitioning import constrain, param

DotGeneral = Callable[..., jax.Array]


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], cfg: ModelConfig) -> jax.Array:
    """N(0, init_std) in the parameter dtype (DeepSeek-V3 initialises every weight with std 0.006)."""
    return (cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(cfg.param_dtype)


def quantised_if(dot_general: DotGeneral) -> dict[str, bool]:
    """Parameter metadata for a weight whose GEMM runs through `dot_general`: marked when that is not the
    plain high-precision one (an FP8 recipe's)."""
    return {} if dot_general is jax.lax.dot_general else {"quantised": True}


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the weight (HF order)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.weight = param(jnp.ones((dim,), cfg.param_dtype), "norm")
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...].astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))  # explicit broadcast
        return weight * normed.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ W without bias; `dot_general` is injectable so FP8 recipes can replace the GEMM.

    `axes` are the kernel's logical axes (in, out). A kernel whose GEMM runs through an injected dot_general is
    marked `quantised` (FP8 tiles must not straddle its shards: `fp8.check_mesh_tiling`)."""

    def __init__(self, in_features: int, out_features: int, cfg: ModelConfig, rngs: nnx.Rngs,
                 axes: tuple[str | None, str | None], dot_general: DotGeneral = jax.lax.dot_general):
        self.kernel = param(normal_init(rngs, (in_features, out_features), cfg), *axes,
                            **quantised_if(dot_general))
        self.compute_dtype = dtype_of(cfg.dtype)
        self.dot_general = dot_general

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.compute_dtype)
        kernel = self.kernel[...].astype(self.compute_dtype)
        return self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class Embed(nnx.Module):
    """Token embedding table [vocab, hidden] (not tied to the output head in DeepSeek-V3)."""

    def __init__(self, vocab_size: int, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embedding = param(normal_init(rngs, (vocab_size, dim), cfg), "vocab", "embed")
        self.compute_dtype = dtype_of(cfg.dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Under FSDP the table's hidden dim is split over data, like the ids' batch dim: gathering from it
        # directly makes GSPMD replicate the result; all-gather that dim first (vocab stays split).
        table = constrain(self.embedding[...], "vocab", None)
        return jnp.take(table, ids, axis=0).astype(self.compute_dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); used for dense layers and shared experts.

    `hidden_axis` is the logical axis of the hidden width: `mlp` for a dense layer's (intermediate_size),
    `expert_mlp` for the shared experts' (multiples of moe_intermediate_size)."""

    def __init__(self, dim: int, hidden: int, cfg: ModelConfig, rngs: nnx.Rngs,
                 dot_general: DotGeneral = jax.lax.dot_general, hidden_axis: str = "mlp"):
        self.gate_proj = Linear(dim, hidden, cfg, rngs, ("embed", hidden_axis), dot_general)
        self.up_proj = Linear(dim, hidden, cfg, rngs, ("embed", hidden_axis), dot_general)
        self.down_proj = Linear(hidden, dim, cfg, rngs, (hidden_axis, "embed"), dot_general)
        self.hidden_axis = hidden_axis

    def __call__(self, x: jax.Array) -> jax.Array:
        # x is [B, T, D] (dense layers) or [N, D] (shared experts); tokens stay split like the batch and the
        # hidden dim like the weights (tensor), instead of GSPMD picking one and re-sharding the other.
        hidden = jax.nn.silu(tag(self.gate_proj(x), MLP_GATE)) * tag(self.up_proj(x), MLP_UP)
        hidden = constrain(hidden, "batch", *(["length"] * (x.ndim - 2)), self.hidden_axis)
        return self.down_proj(hidden)
