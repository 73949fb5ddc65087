"""FP8 training emulation: DeepSeek-V3's fine-grained recipe, and per-tensor baselines, as a `dot_general`.

Every FP8 GEMM here is emulated: operands are quantised to a real `float8_e4m3fn` / `float8_e5m2` payload
with float32 scales, dequantised, and multiplied in float32: up to float32 rounding, a scaled FP8 GEMM with FP32
accumulation. It runs on any backend and is deterministic; it models the numerics, not the speed, of FP8
tensor cores.

Recipes (V3 §3.3; docs/semantics.md §11):
* `deepseek`: E4M3 for every operand of Fprop, Dgrad and Wgrad. Online max-abs scales per 1x128 activation
  tile (per token, per 128 channels of the contraction dim) and per 128x128 weight block. The backward pass
  keeps the FP8 activation and regroups it into 128x1 tiles (128 tokens of one channel) for Wgrad, which
  contracts over tokens; output gradients are tiled 1x128 along the Dgrad contraction dim and 128x1 along the
  Wgrad one (never 128x128 blocks: the paper saw that diverge).
* `per_tensor`: one current (just-in-time) scale per tensor, E4M3 forward and E5M2 gradients, the hybrid
  format of earlier FP8 training work; the common baseline.
  Both use *current* scaling (scales from the tensor being quantised), as DeepSeek-V3 does; delayed scaling
  (from an amax history of earlier steps) would need per-GEMM state threaded through the train step, and is
  not provided.

Optionally, `Accumulation` emulates the tensor cores' limited accumulation (about 14 mantissa bits, products
aligned to the largest exponent and truncated) with promotion to FP32 every `interval` elements.

Shapes inside the GEMM core are canonical: Z = the dot_general batch dims (e.g. routed experts), R = the
activation's leading free dims (e.g. sequences), M = its last free dim (tokens of a sequence), K = the
contraction dim, S = the weight's leading free dims, N = its last free dim. So x_ZRMK @ w_ZSKN -> y_ZRMSN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig

E4M3 = jnp.dtype(jnp.float8_e4m3fn)
E5M2 = jnp.dtype(jnp.float8_e5m2)
TILE = 128  # DeepSeek-V3's tile / block edge
F32 = jnp.float32

DotGeneral = Callable[..., jax.Array]


# ---- quantisation primitives -------------------------------------------------------------------------------
def format_max(fmt: Any) -> float:
    """Largest finite value of an FP8 format (448 for E4M3, 57344 for E5M2)."""
    return float(jnp.finfo(fmt).max)


def scale_from_amax(amax: jax.Array, fmt: Any, power_of_2: bool = False) -> jax.Array:
    """The scale s that maps amax onto the format's largest value (x_fp8 = x / s); 1 for all-zero tiles.

    Power-of-2 scales are rounded *up*, so amax / s still fits; they make scaling exact (no mantissa rounding
    when applying or removing the scale). A non-finite amax yields a non-finite scale on purpose: NaN/inf
    must reach the loss so the train step's non-finite guard sees it.
    """
    amax = amax.astype(F32)
    scale = amax / format_max(fmt)
    if power_of_2:
        mantissa, exponent = jnp.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
        scale = jnp.where(mantissa == 0.5, scale, jnp.ldexp(jnp.ones_like(scale), exponent))
    return jnp.where(amax == 0, jnp.ones_like(scale), scale)


def _tiles_for(shape: Sequence[int], tiles: Sequence[int | None]) -> tuple[int, ...]:
    """Effective tile edge per axis: None means the whole axis; an edge longer than the axis is the axis."""
    if len(tiles) != len(shape):
        raise ValueError(f"{len(tiles)} tile edges for an array of rank {len(shape)}")
    return tuple(max(1, n if t is None else min(t, n)) for n, t in zip(shape, tiles))


def _to_tile_view(x: jax.Array, tiles: tuple[int, ...]) -> jax.Array:
    """Zero-pad every axis to whole tiles (partial last tiles) and split axis i into (n_i / t_i, t_i).

    Zeros never raise a tile's amax, so padding leaves the scales of partial tiles unchanged.
    """
    pads = [(0, -n % t) for n, t in zip(x.shape, tiles)]
    if any(p for _, p in pads):
        x = jnp.pad(x, pads)
    split = []
    for n, t in zip(x.shape, tiles):
        split += [n // t, t]
    return x.reshape(split)


def _from_tile_view(x_view: jax.Array, shape: Sequence[int]) -> jax.Array:
    padded = [x_view.shape[2 * i] * x_view.shape[2 * i + 1] for i in range(len(shape))]
    return x_view.reshape(padded)[tuple(slice(0, n) for n in shape)]


def quantize_tiled(x: jax.Array, tiles: Sequence[int | None], fmt: Any = E4M3,
                   power_of_2: bool = False) -> tuple[jax.Array, jax.Array]:
    """(payload in `fmt` with x's shape, float32 scales [ceil(n_i / t_i)]): one max-abs scale per tile.

    `tiles` gives a tile edge per axis (1 = every index alone, None = the whole axis): (1, 128) is DeepSeek's
    1x128 activation tiling of [tokens, channels], (128, 128) its weight blocks, (None, None) per-tensor.
    Values beyond the format saturate at its largest finite value (only possible with a stale, i.e. delayed,
    scale; a current scale maps the tile's amax exactly onto it).
    """
    tiles = _tiles_for(x.shape, tiles)
    x_view = _to_tile_view(x.astype(F32), tiles)
    tile_axes = tuple(range(1, x_view.ndim, 2))
    scale_view = scale_from_amax(jnp.max(jnp.abs(x_view), axis=tile_axes, keepdims=True), fmt, power_of_2)
    fmax = format_max(fmt)
    q_view = jnp.clip(x_view / scale_view, -fmax, fmax).astype(fmt)
    return _from_tile_view(q_view, x.shape), scale_view.reshape(scale_view.shape[::2])


def quantize_with_scale(x: jax.Array, scale: jax.Array, fmt: Any = E4M3) -> jax.Array:
    """Quantise with a given (e.g. delayed) scale, saturating what the scale does not cover."""
    fmax = format_max(fmt)
    return jnp.clip(x.astype(F32) / scale, -fmax, fmax).astype(fmt)


def dequantize_tiled(q: jax.Array, scale: jax.Array, tiles: Sequence[int | None],
                     dtype: Any = F32) -> jax.Array:
    """Inverse of `quantize_tiled`: payload times its tile's scale."""
    tiles = _tiles_for(q.shape, tiles)
    q_view = _to_tile_view(q.astype(F32), tiles)
    scale_view = scale.reshape([d for n in scale.shape for d in (n, 1)])
    return _from_tile_view(q_view * scale_view, q.shape).astype(dtype)


def fake_quantize(x: jax.Array, tiles: Sequence[int | None], fmt: Any = E4M3,
                  power_of_2: bool = False) -> jax.Array:
    """x rounded through FP8 with per-tile scales, as float32."""
    q, scale = quantize_tiled(x, tiles, fmt, power_of_2)
    return dequantize_tiled(q, scale, tiles)


# ---- limited-precision accumulation --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Accumulation:
    """Tensor-core accumulation model (V3 §3.3.2: ~14 retained bits, promotion to FP32 every N_C elements).

    Each MMA step adds `mma_k` products to the running partial sum. Like the hardware's fixed-point adder
    tree, every summand (partial sum included) is aligned to the largest exponent among them and the bits
    below `mantissa_bits` of that exponent are dropped (truncation, i.e. round toward zero); the exact sum is
    truncated once more if it carried into a higher exponent. Every `interval` elements of K the partial sum
    is promoted: added into an FP32 accumulator and restarted. `interval >= K` models no promotion.
    Partial sums are formed from dequantised values (scale applied per element) instead of raw FP8 payloads
    with the scales applied at promotion; the relative truncation error is the same either way.
    """

    interval: int = TILE
    mantissa_bits: int = 14
    mma_k: int = 32

    def __post_init__(self):
        for name in ("interval", "mantissa_bits", "mma_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Accumulation.{name} must be an integer >= 1, got {value!r}")
        # Aligned summands are integers of mantissa_bits + 1 bits; their sum must stay exact in float32.
        if self.mantissa_bits + 1 + math.ceil(math.log2(self.mma_k + 1)) > 24:
            raise ValueError(f"Accumulation: {self.mantissa_bits} bits with mma_k={self.mma_k} cannot be "
                             "summed exactly in float32")


def _truncate_to_window(v: jax.Array, exponent: jax.Array, bits: int) -> jax.Array:
    """Drop the bits of v below `bits` mantissa bits under 2**(exponent - 1), rounding toward zero."""
    ulp = jnp.ldexp(jnp.ones_like(v), jnp.maximum(exponent - 1 - bits, -149))  # -149: keep subnormals exact
    return jnp.trunc(v / ulp) * ulp


def _aligned_add(partial_X: jax.Array, products_XG: jax.Array, bits: int) -> jax.Array:
    """One MMA step: partial + sum(products), every summand truncated at the largest one's exponent."""
    terms_XG = jnp.concatenate([partial_X[..., None], products_XG], axis=-1)
    _, exponent_X = jnp.frexp(jnp.max(jnp.abs(terms_XG), axis=-1))  # max |term| < 2**exponent
    total_X = jnp.sum(_truncate_to_window(terms_XG, exponent_X[..., None], bits), axis=-1)
    _, carried_X = jnp.frexp(total_X)
    return _truncate_to_window(total_X, carried_X, bits)


def limited_accumulation_bmm(a_ZPK: jax.Array, b_ZKQ: jax.Array, acc: Accumulation) -> jax.Array:
    """a @ b (float32 [Z, P, Q]) with partial sums kept to `acc.mantissa_bits`, promoted every `acc.interval`."""
    n_k = a_ZPK.shape[-1]
    interval = min(acc.interval, n_k)
    step = min(acc.mma_k, interval)
    n_chunks, n_steps = -(-n_k // interval), -(-interval // step)
    # K -> [chunk C, step G, lane g]; zero padding adds exact zeros to every partial sum.
    a_ZPK = jnp.pad(a_ZPK.astype(F32), ((0, 0), (0, 0), (0, n_chunks * interval - n_k)))
    b_ZKQ = jnp.pad(b_ZKQ.astype(F32), ((0, 0), (0, n_chunks * interval - n_k), (0, 0)))
    z, p, q = a_ZPK.shape[0], a_ZPK.shape[1], b_ZKQ.shape[2]
    a_ZPCI = jnp.pad(a_ZPK.reshape(z, p, n_chunks, interval), ((0, 0),) * 3 + ((0, n_steps * step - interval),))
    b_ZCIQ = jnp.pad(b_ZKQ.reshape(z, n_chunks, interval, q), ((0, 0), (0, 0), (0, n_steps * step - interval),
                                                              (0, 0)))
    a_GZPCg = a_ZPCI.reshape(z, p, n_chunks, n_steps, step).transpose(3, 0, 1, 2, 4)
    b_GZCgQ = b_ZCIQ.reshape(z, n_chunks, n_steps, step, q).transpose(2, 0, 1, 3, 4)

    def mma_step(partial_ZCPQ, operands):
        a_ZPCg, b_ZCgQ = operands
        products_ZCPQg = a_ZPCg.transpose(0, 2, 1, 3)[:, :, :, None, :] * b_ZCgQ.transpose(0, 1, 3, 2)[:, :, None]
        return _aligned_add(partial_ZCPQ, products_ZCPQg, acc.mantissa_bits), None

    partial_ZCPQ, _ = jax.lax.scan(mma_step, jnp.zeros((z, n_chunks, p, q), F32), (a_GZPCg, b_GZCgQ))
    return jnp.sum(partial_ZCPQ, axis=1)  # promotion: chunk partial sums added in FP32


def _bmm(a_ZPK: jax.Array, b_ZKQ: jax.Array, acc: Accumulation | None) -> jax.Array:
    """Batched matmul in float32: exact FP32 accumulation, or the limited tensor-core model."""
    if acc is None:
        return jnp.einsum("zpk,zkq->zpq", a_ZPK, b_ZKQ, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=F32)
    return limited_accumulation_bmm(a_ZPK, b_ZKQ, acc)


def _fprop(x_ZRMK: jax.Array, w_ZSKN: jax.Array, acc: Accumulation | None) -> jax.Array:
    z, r, m, k = x_ZRMK.shape
    _, s, _, n = w_ZSKN.shape
    y = _bmm(x_ZRMK.reshape(z, r * m, k), w_ZSKN.transpose(0, 2, 1, 3).reshape(z, k, s * n), acc)
    return y.reshape(z, r, m, s, n)


def _dgrad(g_ZRMSN: jax.Array, w_ZSKN: jax.Array, acc: Accumulation | None) -> jax.Array:
    z, r, m, s, n = g_ZRMSN.shape
    k = w_ZSKN.shape[2]
    dx = _bmm(g_ZRMSN.reshape(z, r * m, s * n), w_ZSKN.transpose(0, 1, 3, 2).reshape(z, s * n, k), acc)
    return dx.reshape(z, r, m, k)


def _wgrad(x_ZRMK: jax.Array, g_ZRMSN: jax.Array, acc: Accumulation | None) -> jax.Array:
    z, r, m, k = x_ZRMK.shape
    s, n = g_ZRMSN.shape[3:]
    dw = _bmm(x_ZRMK.reshape(z, r * m, k).transpose(0, 2, 1), g_ZRMSN.reshape(z, r * m, s * n), acc)
    return dw.reshape(z, k, s, n).transpose(0, 2, 1, 3)


# ---- recipes ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """How each GEMM operand is quantised. `scaling`: "tile" (DeepSeek) or "tensor" (one scale per tensor)."""

    scaling: str
    fwd_format: Any = E4M3  # activations and weights
    grad_format: Any = E4M3  # output gradients
    power_of_2: bool = False
    tile: int = TILE
    accumulation: Accumulation | None = None

    def __post_init__(self):
        if self.scaling not in ("tile", "tensor"):
            raise ValueError(f"Recipe.scaling must be 'tile' or 'tensor', got {self.scaling!r}")

    def tiles(self, role: str, ndim: int) -> tuple[int | None, ...]:
        """Tile edges for one canonical operand: x_ZRMK ("x", "x_wgrad"), w_ZSKN ("w"), g_ZRMSN ("g_*")."""
        if self.scaling == "tensor":
            return (1,) + (None,) * (ndim - 1)  # one scale per batch index: each expert's GEMM is its own
        t = self.tile
        return {"x": (1, 1, 1, t),  # 1x128: per token, per 128 channels of K
                "w": (1, 1, t, t),  # 128x128 blocks over (K, N)
                "x_wgrad": (1, 1, t, 1),  # 128x1: 128 tokens of one channel (Wgrad contracts over tokens)
                "g_dgrad": (1, 1, 1, 1, t),  # 1x128 along N, the Dgrad contraction dim
                "g_wgrad": (1, 1, t, 1, 1)}[role]  # 128x1 along tokens


DEEPSEEK = Recipe("tile")
PER_TENSOR = Recipe("tensor", grad_format=E5M2)
RECIPES: dict[str, Recipe | None] = {"none": None, "deepseek": DEEPSEEK, "per_tensor": PER_TENSOR}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fp8_gemm(recipe: Recipe, x_dtype: Any, w_dtype: Any, out_dtype: Any, x_ZRMK: jax.Array,
              w_ZSKN: jax.Array) -> jax.Array:
    return _fp8_gemm_fwd(recipe, x_dtype, w_dtype, out_dtype, x_ZRMK, w_ZSKN)[0]


def _fp8_gemm_fwd(recipe, x_dtype, w_dtype, out_dtype, x_ZRMK, w_ZSKN):
    x_tiles, w_tiles = recipe.tiles("x", 4), recipe.tiles("w", 4)
    xq, x_scale = quantize_tiled(x_ZRMK, x_tiles, recipe.fwd_format, recipe.power_of_2)
    wq, w_scale = quantize_tiled(w_ZSKN, w_tiles, recipe.fwd_format, recipe.power_of_2)
    y = _fprop(dequantize_tiled(xq, x_scale, x_tiles), dequantize_tiled(wq, w_scale, w_tiles), recipe.accumulation)
    # The backward pass keeps the FP8 payloads and scales, not the high-precision operands (as in the paper).
    return y.astype(out_dtype), (xq, x_scale, wq, w_scale)


def _fp8_gemm_bwd(recipe, x_dtype, w_dtype, out_dtype, residuals, g_ZRMSN):
    xq, x_scale, wq, w_scale = residuals
    x_ZRMK = dequantize_tiled(xq, x_scale, recipe.tiles("x", 4))
    w_ZSKN = dequantize_tiled(wq, w_scale, recipe.tiles("w", 4))
    g_ZRMSN = g_ZRMSN.astype(F32)
    g_dgrad = fake_quantize(g_ZRMSN, recipe.tiles("g_dgrad", 5), recipe.grad_format, recipe.power_of_2)
    if recipe.scaling == "tile":
        # Wgrad contracts over tokens, so both operands need scales along tokens: the cached FP8 activation is
        # regrouped into 128x1 tiles (quantised again) and the gradient is quantised 128x1 as well.
        x_wgrad = fake_quantize(x_ZRMK, recipe.tiles("x_wgrad", 4), recipe.fwd_format, recipe.power_of_2)
        g_wgrad = fake_quantize(g_ZRMSN, recipe.tiles("g_wgrad", 5), recipe.grad_format, recipe.power_of_2)
    else:  # one scale per tensor is valid along every dim
        x_wgrad, g_wgrad = x_ZRMK, g_dgrad
    dx = _dgrad(g_dgrad, w_ZSKN, recipe.accumulation)
    dw = _wgrad(x_wgrad, g_wgrad, recipe.accumulation)
    return dx.astype(x_dtype), dw.astype(w_dtype)


_fp8_gemm.defvjp(_fp8_gemm_fwd, _fp8_gemm_bwd)


# ---- dot_general --------------------------------------------------------------------------------------------
def _normalise_dims(dimension_numbers: Any, lhs_ndim: int, rhs_ndim: int):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    norm = lambda dims, ndim: tuple(int(d) % ndim for d in dims)  # noqa: E731
    lhs_contract, lhs_batch = norm(lhs_contract, lhs_ndim), norm(lhs_batch, lhs_ndim)
    rhs_contract, rhs_batch = norm(rhs_contract, rhs_ndim), norm(rhs_batch, rhs_ndim)
    if len(lhs_contract) != 1 or len(rhs_contract) != 1:
        raise ValueError("the FP8 dot_general contracts exactly one dim (tiles run along it), got "
                         f"lhs {lhs_contract} and rhs {rhs_contract}")
    if len(lhs_batch) != len(rhs_batch):
        raise ValueError(f"batch dims differ in number: lhs {lhs_batch}, rhs {rhs_batch}")
    return lhs_contract[0], rhs_contract[0], lhs_batch, rhs_batch


def _canonical(x: jax.Array, batch: tuple[int, ...], contract: int, contract_last: bool):
    """x transposed and reshaped to [Z, R, M, K] (contract_last) or [Z, S, K, N]; also its free dims' shape."""
    free = [d for d in range(x.ndim) if d != contract and d not in batch]
    lead, last = free[:-1], free[-1:]
    order = list(batch) + lead + ([*last, contract] if contract_last else [contract, *last])
    z = math.prod(x.shape[d] for d in batch)
    r = math.prod(x.shape[d] for d in lead)
    m = x.shape[last[0]] if last else 1
    k = x.shape[contract]
    shape = (z, r, m, k) if contract_last else (z, r, k, m)
    return jnp.transpose(x, order).reshape(shape), tuple(x.shape[d] for d in free)


def _out_dtype(lhs: jax.Array, rhs: jax.Array, preferred_element_type: Any) -> Any:
    # `x or y` would be wrong here: a numpy dtype has len() 0 and is therefore falsy.
    if preferred_element_type is None:
        return jnp.result_type(lhs.dtype, rhs.dtype)
    return jnp.dtype(preferred_element_type)


@functools.lru_cache(maxsize=None)
def fp8_dot_general(recipe: Recipe) -> DotGeneral:
    """A drop-in for `jax.lax.dot_general` whose GEMM runs through `recipe` (one contraction dim, any batch dims).

    The lhs is treated as the activation (tiles along its contraction dim and, for Wgrad, along its last free
    dim: tokens of one sequence, so a batch split over devices never splits a tile) and the rhs as the weight
    (128x128 blocks over its contraction dim and its last free dim). `precision` is ignored: the emulated GEMM
    always accumulates in FP32. Cached per recipe so models built twice share one function (equal graphdefs).
    """

    def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                    preferred_element_type: Any = None) -> jax.Array:
        del precision
        lhs_contract, rhs_contract, lhs_batch, rhs_batch = _normalise_dims(dimension_numbers, lhs.ndim, rhs.ndim)
        x_ZRMK, lhs_free = _canonical(lhs, lhs_batch, lhs_contract, contract_last=True)
        w_ZSKN, rhs_free = _canonical(rhs, rhs_batch, rhs_contract, contract_last=False)
        out_dtype = _out_dtype(lhs, rhs, preferred_element_type)
        y_ZRMSN = _fp8_gemm(recipe, lhs.dtype, rhs.dtype, out_dtype, x_ZRMK, w_ZSKN)
        batch_shape = tuple(lhs.shape[d] for d in lhs_batch)
        return y_ZRMSN.reshape(batch_shape + lhs_free + rhs_free)

    return dot_general


def recipe_for(cfg: ModelConfig) -> Recipe | None:
    """The model's recipe from `cfg.fp8` and its knobs (None: plain high-precision GEMMs)."""
    base = RECIPES[cfg.fp8]
    if base is None:
        return None
    acc = None if cfg.fp8_accumulation_interval is None else Accumulation(interval=cfg.fp8_accumulation_interval)
    return dataclasses.replace(base, power_of_2=cfg.fp8_power_of_2_scales, accumulation=acc)


def dot_general_for(cfg: ModelConfig) -> DotGeneral:
    """The dot_general every FP8-eligible Linear of the model uses."""
    recipe = recipe_for(cfg)
    return jax.lax.dot_general if recipe is None else fp8_dot_general(recipe)
