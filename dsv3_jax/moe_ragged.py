"""`ragged` MoE dispatch (docs/design.md (MoE dispatch strategies)): sort assignments by expert +
`jax.lax.ragged_dot`, dropless and exact; expert-parallel through `jax.shard_map` with a ragged all-to-all
exchange.

Shape suffixes as in moe.py: N tokens, E routed experts, K experts per token, D hidden, F expert width,
A = N*K assignments. In the expert-parallel path lower-case n is one shard's tokens, L = E/P the experts of one
shard, P the size of the expert mesh axis and M the receive-buffer rows (bound below).

Transports (`transport=` of `ragged_experts_ep`):
- "ragged": `jax.lax.ragged_all_to_all`, moving exactly the routed rows. XLA:CPU cannot run it in jax 0.10.2
  ("HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter", also jax-ml/jax#34755), so it
  is for GPU/TPU.
- "padded": the same ragged semantics emulated with one fixed-size `jax.lax.all_to_all` of per-destination
  buffers padded to the dropless worst case (`_padded_ragged_all_to_all`). It runs on every backend and moves
  P*C rows per shard in each direction, C = n*min(K, L).
- "auto" (default): backend_policy.exchange_transport for the mesh's platform ("padded" on CPU, "ragged"
  elsewhere); the layers pass backend_policy.choose's answer.
Both transports share all the offset arithmetic, so the CPU tests of "padded" also check what "ragged" is
given; only the `ragged_all_to_all` primitive itself is untested on CPU.

Buffer bound (dropless): a token's K experts are distinct (route() takes a top-k), so it sends at most
min(K, L) rows to any one shard: each source sends <= C = n*min(K, L) rows to a destination, and a shard
receives at most M = P*C rows. Routing that repeats an expert within a token breaks this bound: the padded
transport would then silently drop rows (duplicate experts are never produced by route()).

Grouped GEMMs (`grouped_gemm`, model.grouped_gemm): `kernel` is tokamax's grouped-matmul kernel
(kernels.grouped_matmul: Mosaic megablox on TPU, Triton on GPU; forward and backward are kernel calls at 1.00x
the useful FLOPs), what `auto` picks on GPU/TPU. XLA lowers `ragged_dot` to a masked dense matmul over every
group on GPU and CPU (63x the useful FLOPs for a 64-expert top-8 layer compiled for an H100), and on TPU to a
grouped-matmul kernel whose weight gradient is a dense masked convolution (21.8x for forward and backward on
v5p). `blocks` multiplies padded blocks of rows by their group's weights (`_blocked_grouped_swiglu`, ~1.25x),
the measured fastest on CPU and what `auto` picks there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.backend_policy import GROUP_BLOCK_ROWS, exchange_transport, normalise_backend
from dsv3_jax.kernels import grouped_matmul
from dsv3_jax.remat_names import EXPERT_GATE, EXPERT_UP, tag


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    """Start offsets of consecutive segments with sizes x."""
    return jnp.cumsum(x, axis=axis) - x


def sort_by_expert(topk_idx_NK: jax.Array, n_experts: int) -> tuple[jax.Array, ...]:
    """Assignments sorted by expert: (order [A], expert [A], token [A], counts [E] int32, rank within expert [A]).

    Shared by every dispatch that groups rows by expert (`capacity`, `blocked`, `ragged`). The sort is stable,
    so within an expert earlier tokens come first (and keep their slots when a capacity limit drops the
    overflow).
    """
    expert_A = topk_idx_NK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    sorted_expert_A = expert_A[order_A]
    counts_E = jnp.bincount(expert_A, length=n_experts).astype(jnp.int32)
    rank_A = jnp.arange(expert_A.shape[0]) - (jnp.cumsum(counts_E) - counts_E)[sorted_expert_A]
    return order_A, sorted_expert_A, order_A // topk_idx_NK.shape[1], counts_E, rank_A


BLOCKS_PER_STEP = 8  # blocks whose weights are gathered at once (bounds the gathered-weight temporary)


def _grouped_swiglu(rows_RD: jax.Array, gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array,
                    group_sizes_E: jax.Array, grouped_gemm: str = "ragged_dot",
                    gemm_kernel: str | None = None) -> jax.Array:
    """SwiGLU of expert-grouped rows; rows past sum(group_sizes) come out as zeros.

    `grouped_gemm` says how the grouped matmuls run (backend_policy.choose): `kernel` is tokamax's grouped
    matmul with implementation `gemm_kernel`, `ragged_dot` XLA's grouped GEMM (see the module docstring for what
    it compiles to), `blocks` is `_blocked_grouped_swiglu`."""
    if grouped_gemm == "blocks":
        return _blocked_grouped_swiglu(rows_RD, gate_EDF, up_EDF, down_EFD, group_sizes_E)
    if grouped_gemm == "kernel":
        matmul = lambda x, w: grouped_matmul(x, w, group_sizes_E, gemm_kernel or "xla")  # noqa: E731
    else:
        matmul = lambda x, w: jax.lax.ragged_dot(x, w, group_sizes_E)  # noqa: E731
    h_RF = (jax.nn.silu(tag(matmul(rows_RD, gate_EDF), EXPERT_GATE)) * tag(matmul(rows_RD, up_EDF), EXPERT_UP))
    return matmul(h_RF.astype(down_EFD.dtype), down_EFD)


def block_layout(group_sizes_E: jax.Array, n_rows: int, block: int,
                 round_to: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows grouped by expert, each group padded to whole blocks of `block` rows: (padded start [E], padded end
    [E], the group of each block [n_blocks]). n_blocks is the static bound ceil((R + E*(block-1)) / block),
    rounded up to a multiple of `round_to`; blocks past the last group hold only zero rows (and name the last
    group). Shared by `blocked` dispatch and the `blocks` grouped GEMM."""
    n_groups = group_sizes_E.shape[0]
    n_blocks = -(-(n_rows + n_groups * (block - 1)) // block)
    n_blocks = -(-n_blocks // round_to) * round_to
    padded_E = -(-group_sizes_E // block) * block
    padded_end_E = jnp.cumsum(padded_E)
    block_group_B = jnp.minimum(jnp.searchsorted(padded_end_E, jnp.arange(n_blocks) * block, side="right"),
                                n_groups - 1)
    return padded_end_E - padded_E, padded_end_E, block_group_B


def _blocked_grouped_swiglu(rows_RD: jax.Array, gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array,
                            group_sizes_E: jax.Array, block: int = GROUP_BLOCK_ROWS,
                            blocks_per_step: int = BLOCKS_PER_STEP) -> jax.Array:
    """Grouped SwiGLU from plain matmuls: each group's rows are padded to whole blocks of `block` rows, and a
    `lax.scan` multiplies `blocks_per_step` blocks per step by their own group's weights.

    Work is R + E*(block-1) rows at most instead of the E*R of a dense-masked ragged_dot. The scan bounds the
    gathered weights to `blocks_per_step` [D, F] matrices at a time, and its body saves only matmul outputs
    for the backward pass (the weight gathers are redone), so no [blocks, D, F] tensor ever exists.
    """
    n_rows, dim = rows_RD.shape
    n_groups = gate_EDF.shape[0]
    block = max(1, min(block, n_rows))
    padded_start_E, padded_end_E, block_group_B = block_layout(group_sizes_E, n_rows, block, blocks_per_step)
    n_blocks = block_group_B.shape[0]
    n_steps = n_blocks // blocks_per_step
    row_end_E = jnp.cumsum(group_sizes_E)
    row_R = jnp.arange(n_rows)
    group_R = jnp.searchsorted(row_end_E, row_R, side="right")  # == E for rows past the groups
    valid_R = group_R < n_groups
    group_R = jnp.minimum(group_R, n_groups - 1)
    dest_R = jnp.where(valid_R, padded_start_E[group_R] + row_R - (row_end_E - group_sizes_E)[group_R],
                       n_blocks * block)
    padded_PD = jnp.zeros((n_blocks * block, dim), rows_RD.dtype).at[dest_R].set(rows_RD, mode="drop")

    used_blocks = padded_end_E[-1] // block  # blocks holding any row; the rest are all zeros
    active_n = jnp.arange(n_steps) * blocks_per_step < used_blocks
    y_nSbD = _block_scan_swiglu(padded_PD.reshape(n_steps, blocks_per_step, block, dim),
                                block_group_B.reshape(n_steps, blocks_per_step), active_n, gate_EDF, up_EDF,
                                down_EFD)
    return y_nSbD.reshape(n_blocks * block, dim).at[dest_R].get(mode="fill", fill_value=0)


def _swiglu_blocks(x_SbD: jax.Array, gate_SDF: jax.Array, up_SDF: jax.Array,
                   down_SFD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(gate pre-activation, up, output) of S blocks, each by its own [D, F] / [F, D] weights."""
    g_SbF = tag(jnp.einsum("sbd,sdf->sbf", x_SbD, gate_SDF), EXPERT_GATE)
    u_SbF = tag(jnp.einsum("sbd,sdf->sbf", x_SbD, up_SDF), EXPERT_UP)
    return g_SbF, u_SbF, jnp.einsum("sbf,sfd->sbd", jax.nn.silu(g_SbF) * u_SbF, down_SFD)


@jax.custom_vjp
def _block_scan_swiglu(x_nSbD: jax.Array, group_nS: jax.Array, active_n: jax.Array, gate_EDF: jax.Array,
                       up_EDF: jax.Array, down_EFD: jax.Array) -> jax.Array:
    """SwiGLU of every block by its group's weights, `S` blocks per `lax.scan` step; steps whose `active_n` is
    false (all-zero blocks past the used rows) skip their matmuls at run time, forward and backward.

    A custom VJP because the automatic one is slow: the gradient of a weight gather inside a scan body is a
    scatter-add into a fresh zero [E, D, F] array in every step, then added to the running sum, which costs
    O(E * D * F) memory traffic per step whether or not the step is skipped (measured ~10 ms per step at 256
    experts on a CPU). The backward here scatter-adds each step's block gradients into the [E, D, F]
    accumulators it carries, which XLA updates in place, and saves only the two [b, F] matmul outputs per
    block from the forward pass (the weight gathers are redone)."""
    return _block_scan_fwd(x_nSbD, group_nS, active_n, gate_EDF, up_EDF, down_EFD)[0]


def _block_scan_fwd(x_nSbD, group_nS, active_n, gate_EDF, up_EDF, down_EFD):
    def step(carry, xs):
        x_SbD, group_S, active = xs

        def run(x_SbD, group_S):
            return _swiglu_blocks(x_SbD, gate_EDF[group_S], up_EDF[group_S], down_EFD[group_S])

        def skip(x_SbD, group_S):
            zeros_SbF = _zeros_varying(x_SbD.shape[:2] + gate_EDF.shape[2:], x_SbD, gate_EDF)
            return zeros_SbF, zeros_SbF, _zeros_varying(x_SbD.shape, x_SbD, down_EFD)

        g_SbF, u_SbF, y_SbD = jax.lax.cond(active, run, skip, x_SbD, group_S)
        return carry, (y_SbD, g_SbF, u_SbF)

    _, (y_nSbD, g_nSbF, u_nSbF) = jax.lax.scan(step, None, (x_nSbD, group_nS, active_n))
    return y_nSbD, (x_nSbD, group_nS, active_n, g_nSbF, u_nSbF, gate_EDF, up_EDF, down_EFD)


def _block_scan_bwd(residuals, dy_nSbD):
    x_nSbD, group_nS, active_n, g_nSbF, u_nSbF, gate_EDF, up_EDF, down_EFD = residuals

    def step(grads, xs):
        x_SbD, group_S, active, g_SbF, u_SbF, dy_SbD = xs

        def run(grads, x_SbD, group_S, g_SbF, u_SbF, dy_SbD):
            d_gate, d_up, d_down = grads
            gate_SDF, up_SDF, down_SFD = gate_EDF[group_S], up_EDF[group_S], down_EFD[group_S]
            sig_SbF = jax.nn.sigmoid(g_SbF)
            silu_SbF = g_SbF * sig_SbF
            dh_SbF = jnp.einsum("sbd,sfd->sbf", dy_SbD, down_SFD)
            du_SbF = dh_SbF * silu_SbF
            dg_SbF = dh_SbF * u_SbF * (sig_SbF + silu_SbF * (1 - sig_SbF))  # silu'(g)
            dx_SbD = (jnp.einsum("sbf,sdf->sbd", dg_SbF, gate_SDF) + jnp.einsum("sbf,sdf->sbd", du_SbF, up_SDF))
            d_gate = d_gate.at[group_S].add(jnp.einsum("sbd,sbf->sdf", x_SbD, dg_SbF))
            d_up = d_up.at[group_S].add(jnp.einsum("sbd,sbf->sdf", x_SbD, du_SbF))
            d_down = d_down.at[group_S].add(jnp.einsum("sbf,sbd->sfd", silu_SbF * u_SbF, dy_SbD))
            return (d_gate, d_up, d_down), dx_SbD

        def skip(grads, x_SbD, group_S, g_SbF, u_SbF, dy_SbD):
            return grads, _zeros_varying(x_SbD.shape, x_SbD, gate_EDF)

        return jax.lax.cond(active, run, skip, grads, x_SbD, group_S, g_SbF, u_SbF, dy_SbD)

    # The carry's type must not change between steps, so the accumulators vary over the rows' axes as well.
    zeros = tuple(_zeros_varying(w.shape, w, x_nSbD) for w in (gate_EDF, up_EDF, down_EFD))
    (d_gate, d_up, d_down), dx_nSbD = jax.lax.scan(step, zeros, (x_nSbD, group_nS, active_n, g_nSbF, u_nSbF,
                                                                  dy_nSbD))
    return (_sum_to_type_of(dx_nSbD, x_nSbD), None, None, _sum_to_type_of(d_gate, gate_EDF),
            _sum_to_type_of(d_up, up_EDF), _sum_to_type_of(d_down, down_EFD))


def _zeros_varying(shape: tuple[int, ...], *operands: jax.Array) -> jax.Array:
    """Zeros of `shape` in the operands' promoted dtype that, inside shard_map, vary over every mesh axis any
    operand varies over: the type a matmul of those operands would have. `lax.cond` branches and `lax.scan`
    carries need equal types, so a skipped branch's zeros must match the computed branch's outputs. Outside
    shard_map this is plain zeros."""
    zeros = jnp.zeros(shape, jnp.result_type(*operands))
    for operand in operands:
        zeros = zeros + jnp.zeros_like(operand[(0,) * operand.ndim])  # a scalar carries the operand's axes
    return zeros


def _sum_to_type_of(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Inside shard_map: sum a cotangent over the mesh axes it varies over and its primal does not (the
    rows' data axis for weight gradients, the tensor axis that splits F for the rows' gradient), as automatic
    differentiation would; a no-op outside."""
    extra = tuple(sorted(jax.typeof(cotangent).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


_block_scan_swiglu.defvjp(_block_scan_fwd, _block_scan_bwd)


def _combine(y_AD: jax.Array, order_A: jax.Array, topk_weight_NK: jax.Array) -> jax.Array:
    """Unsort expert-ordered outputs and take each token's weighted sum of its K rows in fp32."""
    n_tokens, top_k = topk_weight_NK.shape
    y_NKD = jnp.zeros_like(y_AD).at[order_A].set(y_AD, unique_indices=True).reshape(n_tokens, top_k, -1)
    # Elementwise multiply + sum (not an einsum) so accelerators cannot pick a reduced-precision matmul.
    out_ND = jnp.sum(y_NKD.astype(jnp.float32) * topk_weight_NK.astype(jnp.float32)[..., None], axis=1)
    return out_ND.astype(y_AD.dtype)


def ragged_experts(x_ND: jax.Array, topk_idx_NK: jax.Array, topk_weight_NK: jax.Array, gate_EDF: jax.Array,
                   up_EDF: jax.Array, down_EFD: jax.Array, grouped_gemm: str = "ragged_dot",
                   gemm_kernel: str | None = None) -> jax.Array:
    """Dropless routed experts on one device: sort by expert, grouped matmuls, unsort, weighted sum -> [N, D]."""
    x_ND = x_ND.astype(gate_EDF.dtype)
    order_A, _, token_A, counts_E, _ = sort_by_expert(topk_idx_NK, gate_EDF.shape[0])
    y_AD = _grouped_swiglu(x_ND[token_A], gate_EDF, up_EDF, down_EFD, counts_E, grouped_gemm, gemm_kernel)
    return _combine(y_AD, order_A, topk_weight_NK)


def _padded_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                              send_sizes: jax.Array, output_offsets: jax.Array, recv_sizes: jax.Array, *,
                              axis_name: str, capacity: int) -> jax.Array:
    """`jax.lax.ragged_all_to_all` semantics (one slice per peer) via a fixed-size all_to_all of [P, C] buffers.

    Every slice must hold at most `capacity` rows; rows past it are dropped.
    """
    slot_C = jnp.arange(capacity)
    src_PC = input_offsets[:, None] + slot_C[None, :]
    send_PC = slot_C[None, :] < send_sizes[:, None]
    mask_PC = send_PC.reshape(send_PC.shape + (1,) * (operand.ndim - 1))
    buf_PCD = jnp.where(mask_PC, operand.at[src_PC].get(mode="fill", fill_value=0), 0)
    recv_PCD = jax.lax.all_to_all(buf_PCD, axis_name, 0, 0, tiled=True)
    # Sender s told us (in its output_offsets) where its slice goes in our output.
    at_P = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dst_PC = jnp.where(slot_C[None, :] < recv_sizes[:, None], at_P[:, None] + slot_C[None, :], output.shape[0])
    return output.at[dst_PC.reshape(-1)].set(recv_PCD.reshape(-1, *operand.shape[1:]), mode="drop")


def exchange_capacity(n_tokens: int, top_k: int, n_local: int, n_shards: int,
                      capacity_factor: float | None) -> int:
    """Rows one token shard may send one expert shard (and so each receive slot per source).

    Dropless (None): n*min(K, L), the most a shard's n tokens can route to L distinct experts. With a factor:
    ceil(factor * n*K / P), the fair share of a balanced router times the factor, capped by the dropless bound.
    """
    dropless = n_tokens * min(top_k, n_local)
    if capacity_factor is None:
        return dropless
    return max(1, min(dropless, math.ceil(capacity_factor * n_tokens * top_k / n_shards)))


def _clip_segments(counts_PL: jax.Array, capacity: int) -> jax.Array:
    """Per-(destination or source, local expert) counts after keeping the first `capacity` rows of each row P.

    Rows of one slice are ordered by local expert, so a full slice loses its last experts' latest tokens.
    """
    kept_end_PL = jnp.minimum(jnp.cumsum(counts_PL, axis=1), capacity)
    return kept_end_PL - jnp.concatenate([jnp.zeros_like(kept_end_PL[:, :1]), kept_end_PL[:, :-1]], axis=1)


def _ep_shard(x_nD, idx_nK, weight_nK, gate_LDF, up_LDF, down_LFD, *, n_experts: int, expert_axis: str,
              token_axes: tuple[str, ...], tensor_axis: str | None, transport: str,
              capacity_factor: float | None, grouped_gemm: str,
              gemm_kernel: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One shard's dispatch -> local experts -> return -> combine; also the psum'd global counts [E] and the
    global number of assignments the exchange capacity dropped.

    With `tensor_axis`, this shard holds a slice of every local expert's width F (Megatron-style): the tensor
    shards of one token group do the same dispatch, each computes its partial down projection, and a psum
    over the tensor axis completes the rows before they travel back.
    """
    n_tokens, top_k = idx_nK.shape
    n_local = gate_LDF.shape[0]
    n_shards = n_experts // n_local
    x_nD = x_nD.astype(gate_LDF.dtype)
    order_A, _, token_A, counts_E, _ = sort_by_expert(idx_nK, n_experts)
    global_counts_E = jax.lax.psum(counts_E, token_axes)

    # Expert-sorted rows are also sorted by destination shard (expert e lives on shard e // L).
    # Slices start where the full slices would (send_offsets) but carry at most `capacity` rows; both sides
    # know the cap, so the sender and receiver clip identically without another exchange.
    capacity = exchange_capacity(n_tokens, top_k, n_local, n_shards, capacity_factor)
    n_rows = n_shards * capacity
    counts_PL = counts_E.reshape(n_shards, n_local)
    send_offsets_P = _exclusive_cumsum(counts_PL.sum(1))
    send_sizes_P = jnp.minimum(counts_PL.sum(1), capacity)
    dropped = jax.lax.psum(jnp.sum(counts_PL) - jnp.sum(send_sizes_P), token_axes)
    recv_counts_PL = _clip_segments(jax.lax.all_to_all(counts_PL, expert_axis, 0, 0, tiled=True), capacity)
    recv_sizes_P = recv_counts_PL.sum(1)  # row s: from source s
    recv_offsets_P = _exclusive_cumsum(recv_sizes_P)  # sources land back to back in our buffer
    remote_recv_offsets_P = jax.lax.all_to_all(recv_offsets_P, expert_axis, 0, 0, tiled=True)
    remote_send_offsets_P = jax.lax.all_to_all(send_offsets_P, expert_axis, 0, 0, tiled=True)

    if transport == "ragged":
        exchange = lambda *a: jax.lax.ragged_all_to_all(*a, axis_name=expert_axis)  # noqa: E731
    else:
        exchange = lambda *a: _padded_ragged_all_to_all(*a, axis_name=expert_axis, capacity=capacity)  # noqa: E731
    x_MD = exchange(x_nD[token_A], jnp.zeros((n_rows, x_nD.shape[1]), x_nD.dtype), send_offsets_P,
                    send_sizes_P, remote_recv_offsets_P, recv_sizes_P)

    # Received rows are grouped by (source, local expert); regroup them by local expert for ragged_dot.
    seg_ends = jnp.cumsum(recv_counts_PL.reshape(-1))
    row_M = jnp.arange(n_rows)
    seg_M = jnp.searchsorted(seg_ends, row_M, side="right")  # == P*L for unused rows
    valid_M = seg_M < n_shards * n_local
    seg_M = jnp.minimum(seg_M, n_shards * n_local - 1)
    src_M, local_M = seg_M // n_local, seg_M % n_local
    rank_M = row_M - (seg_ends - recv_counts_PL.reshape(-1))[seg_M]
    group_sizes_L = recv_counts_PL.sum(0)
    start_PL = _exclusive_cumsum(group_sizes_L)[None, :] + _exclusive_cumsum(recv_counts_PL, axis=0)
    grouped_M = jnp.where(valid_M, start_PL[src_M, local_M] + rank_M, n_rows)
    rows_MD = jnp.zeros_like(x_MD).at[grouped_M].set(x_MD, mode="drop")
    y_grouped_MD = _grouped_swiglu(rows_MD, gate_LDF, up_LDF, down_LFD, group_sizes_L, grouped_gemm, gemm_kernel)
    if tensor_axis is not None:
        y_grouped_MD = jax.lax.psum(y_grouped_MD, tensor_axis)
    y_MD = y_grouped_MD.at[grouped_M].get(mode="fill", fill_value=0)

    # Dropped assignments get no row back: they stay zero in y_AD and add nothing to their token.
    y_AD = exchange(y_MD, jnp.zeros((n_tokens * top_k, y_MD.shape[1]), y_MD.dtype), recv_offsets_P,
                    recv_sizes_P, remote_send_offsets_P, send_sizes_P)
    return _combine(y_AD, order_A, weight_nK), global_counts_E, dropped


def ragged_experts_ep(x_ND: jax.Array, topk_idx_NK: jax.Array, topk_weight_NK: jax.Array, gate_EDF: jax.Array,
                      up_EDF: jax.Array, down_EFD: jax.Array, *, mesh: Mesh, expert_axis: str = "expert",
                      token_axes: Sequence[str] = ("data", "expert"), tensor_axis: str | None = None,
                      capacity_factor: float | None = None, transport: str = "auto",
                      grouped_gemm: str = "ragged_dot",
                      gemm_kernel: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Expert-parallel `ragged_experts`: (out [N, D] sharded like the tokens, global expert counts [E] int32,
    global count of dropped assignments int32).

    `capacity_factor` None is dropless: every receive buffer is sized for the worst case, P*n*min(K, L) rows
    per shard, which at scale is far more memory than the rows a balanced router sends (P*n*K/P). A factor
    bounds what one token shard sends one expert shard to ceil(factor * n*K / P) rows (`exchange_capacity`);
    the overflow of a (source, destination) pair is dropped, the destination's last local experts first,
    and counted. Unlike `capacity` dispatch this bounds exchange pairs, not experts.

    Tokens (and routing) are split over `token_axes`, experts over `expert_axis` (each shard holds E/P experts'
    weights); with `tensor_axis` each expert's width F is split over that axis too (tokens are replicated over
    it). Other mesh axes are replicated. The counts are psum'd over `token_axes`, i.e. the global per-expert
    loads the aux-loss-free bias update needs.
    """
    token_axes = tuple(token_axes)
    if transport == "auto":
        transport = exchange_transport(normalise_backend(mesh.devices.flat[0].platform))
    if transport not in ("ragged", "padded"):
        raise ValueError(f"transport must be 'auto', 'ragged' or 'padded', got {transport!r}")
    if tensor_axis is not None and (tensor_axis in token_axes or tensor_axis == expert_axis):
        raise ValueError(f"tensor_axis {tensor_axis!r} must differ from the expert and token axes")
    for axis in (expert_axis, *token_axes, *((tensor_axis,) if tensor_axis else ())):
        if axis not in mesh.shape:
            raise ValueError(f"mesh axis {axis!r} not in mesh axes {tuple(mesh.shape)}")
    if expert_axis not in token_axes:
        raise ValueError(f"expert_axis {expert_axis!r} must be one of token_axes {token_axes}: tokens replicated "
                         "over the expert axis would be computed once per expert shard")
    n_experts = gate_EDF.shape[0]
    n_token_shards = 1
    for axis in token_axes:
        n_token_shards *= mesh.shape[axis]
    if n_experts % mesh.shape[expert_axis]:
        raise ValueError(f"n_experts={n_experts} not divisible by mesh axis {expert_axis!r}={mesh.shape[expert_axis]}")
    if x_ND.shape[0] % n_token_shards:
        raise ValueError(f"tokens N={x_ND.shape[0]} not divisible by the {n_token_shards} shards of {token_axes}")

    if tensor_axis is not None and gate_EDF.shape[2] % mesh.shape[tensor_axis]:
        raise ValueError(f"expert width F={gate_EDF.shape[2]} not divisible by mesh axis "
                         f"{tensor_axis!r}={mesh.shape[tensor_axis]}")

    tokens = P(token_axes)
    in_width, out_width = P(expert_axis, None, tensor_axis), P(expert_axis, tensor_axis, None)
    body = jax.shard_map(
        lambda *args: _ep_shard(*args, n_experts=n_experts, expert_axis=expert_axis, token_axes=token_axes,
                                tensor_axis=tensor_axis, transport=transport, capacity_factor=capacity_factor,
                                grouped_gemm=grouped_gemm, gemm_kernel=gemm_kernel),
        mesh=mesh, in_specs=(tokens, tokens, tokens, in_width, in_width, out_width),
        out_specs=(tokens, P(), P()),
        # Pallas kernels (tokamax's grouped matmul) declare no varying-axes types for their outputs
        check_vma=grouped_gemm != "kernel")
    return body(x_ND, topk_idx_NK, topk_weight_NK, gate_EDF, up_EDF, down_EFD)
