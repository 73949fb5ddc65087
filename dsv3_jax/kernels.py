"""Fused kernels on the hot paths, called exactly as the accelerators run them (backend_policy.choose says which):

- `causal_attention`: MLA's causal attention with q/k head dim 192 and v 128, unpadded. TPU: Pallas splash
  attention (ships in jax); GPU: tokamax's flash attention (Triton). On CPU the same calls run through the
  libraries' reference paths (splash `interpret=True`, tokamax `implementation="xla"`), which is how the suite
  checks the call sites. Under a mesh the kernel runs per shard (`jax.shard_map`: sequences over the batch
  axes, heads over `tensor`), since XLA cannot partition a kernel call.
- `grouped_matmul`: tokamax's `ragged_dot` (Mosaic megablox on TPU, Triton on GPU) for the routed experts;
  group sizes tell the kernel which rows hold work.

A kernel is an opaque custom call to XLA's cost analysis, so each call runs inside a named scope that records
its geometry (`hlo_cost.kernel_scope`); `hlo_cost` counts the FLOPs of the kernel calls it finds from it.
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.hlo_cost import kernel_scope
from dsv3_jax.partitioning import active_plan

SPLASH_BLOCK = 128  # splash's block sizes must be multiples of 128 lanes: sequences are padded to it
GMM_ROW_TILE = 128  # tokamax's Mosaic TPU grouped matmul needs rows in whole tiles (m % 128 == 0)


def causal_pairs(seq_len: int) -> int:
    """Visible (query, key) pairs of a causal [T, T] mask: what an attention kernel computes per head."""
    return seq_len * (seq_len + 1) // 2


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, seq_len: int, interpret: bool):
    """A causal splash-attention kernel for [heads, seq_len, *] operands, cached. Built eagerly on the CPU even
    when first asked for while tracing: its mask tables are concrete arrays (a traced one would leak into the
    cache), and building them on a deviceless TPU topology device, or under its mesh, fails."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * heads)

    def build():
        with jax.default_device(jax.devices("cpu")[0]):
            return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)

    # In a thread of its own: JAX's trace, mesh and default-device contexts are per thread, so the mask tables
    # are built eagerly on the CPU even while a step is being traced under a mesh (eager ops inside the run's
    # mesh context would be placed on its devices, which a deviceless multi-host topology cannot run).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(build).result()


def _splash(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, scale: float, kernel) -> jax.Array:
    """Splash attention on [B, T, H, *] operands (it takes [H, T, *] per sequence and no softmax scale: the
    queries are scaled first, in fp32). Sequences are padded to whole blocks: padded keys follow every real
    query, so the causal mask hides them; padded query rows are dropped."""
    seq_len = q_BTHK.shape[1]
    padded = -(-seq_len // SPLASH_BLOCK) * SPLASH_BLOCK
    q_BTHK = (q_BTHK.astype(jnp.float32) * scale).astype(q_BTHK.dtype)

    def heads_first(x_BTHK: jax.Array) -> jax.Array:
        return jnp.pad(x_BTHK, ((0, 0), (0, padded - seq_len), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    out_BHTV = jax.vmap(kernel)(heads_first(q_BTHK), heads_first(k_BSHK), heads_first(v_BSHV))
    return out_BHTV.transpose(0, 2, 1, 3)[:, :seq_len]


def tokamax_module():
    """tokamax, imported on first use. It reads absl flags and, finding them unparsed, parses sys.argv, which
    fails on any program's own arguments (pytest's, our CLI's): mark them parsed, with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    import tokamax

    return tokamax


def _tokamax(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, scale: float, implementation: str) -> jax.Array:
    return tokamax_module().dot_product_attention(q_BTHK, k_BSHK, v_BSHV, scale=scale, is_causal=True,
                                                   implementation=implementation)


def causal_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, scale: float, kernel: str,
                     implementation: str | None = None, interpret: bool = False) -> jax.Array:
    """Causal softmax(scale * q.k) v with a fused kernel (`kernel`: splash | tokamax; `implementation`: tokamax's,
    `interpret`: splash on CPU) -> [B, T, H, V] in v's dtype. Under an active mesh plan it runs per shard."""
    if kernel not in ("splash", "tokamax"):
        raise ValueError(f"attention kernel must be 'splash' or 'tokamax', got {kernel!r}")

    plan = active_plan()
    spec = P()
    if plan is not None and plan.mesh.devices.size > 1:
        spec = plan.spec(("batch", "length", "heads", None))
        for dim, entry in enumerate(spec):
            if q_BTHK.shape[dim] % plan.split_of(entry)[1]:  # e.g. one sequence while generating: not split
                spec = P(*(None if d == dim else e for d, e in enumerate(spec)))
    if kernel == "splash":  # built here, outside any trace of shard_map's body (see _splash_kernel)
        local_heads = q_BTHK.shape[2] // (plan.split_of(spec[2])[1] if len(spec) > 2 else 1)
        splash = _splash_kernel(local_heads, -(-q_BTHK.shape[1] // SPLASH_BLOCK) * SPLASH_BLOCK, interpret)

    def local(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array) -> jax.Array:
        batch, seq_len, heads, qk_dim = q_BTHK.shape
        geometry = (batch, heads, causal_pairs(seq_len), qk_dim, v_BSHV.shape[-1])
        with jax.named_scope(kernel_scope("attention", *geometry)):
            if kernel == "splash":
                return _splash(q_BTHK, k_BSHK, v_BSHV, scale, splash)
            return _tokamax(q_BTHK, k_BSHK, v_BSHV, scale, implementation or "xla")

    if spec == P():
        return local(q_BTHK, k_BSHK, v_BSHV)
    return jax.shard_map(local, mesh=plan.mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q_BTHK, k_BSHK, v_BSHV)


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, implementation: str) -> jax.Array:
    """Rows grouped by expert times their group's weights, [M, K] x [G, K, N] -> [M, N], with tokamax's
    grouped-matmul kernel (`implementation`: mosaic | triton | xla). Rows past sum(group_sizes) come out as
    zeros (the kernel leaves them unspecified; masked here so padding rows can never carry garbage)."""
    tokamax = tokamax_module()
    rows, depth = x_MK.shape
    pad = -rows % GMM_ROW_TILE  # Mosaic's kernel takes whole row tiles; padded rows are past every group
    if pad:
        x_MK = jnp.pad(x_MK, ((0, pad), (0, 0)))
    with jax.named_scope(kernel_scope("gmm", rows + pad, depth, w_GKN.shape[-1])):
        y_MN = tokamax.ragged_dot(x_MK, w_GKN, group_sizes_G.astype(jnp.int32), implementation=implementation)
    y_MN = y_MN[:rows]
    valid_M = jnp.arange(rows) < jnp.sum(group_sizes_G)
    return jnp.where(valid_M[:, None], y_MN, 0).astype(y_MN.dtype)
