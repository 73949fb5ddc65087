"""Float32-aware comparison tolerances for the test suite: a relative part plus an absolute part scaled by the
magnitude of the values involved, both counted in float32 ulps (F32_EPS = 2^-23 ~ 1.19e-7 each).

Why not a bare `atol=1e-6`: two float32 computations of the same quantity by different code paths (dense vs
sparse dispatch, jit vs eager, another CPU's SIMD width, another XLA fusion or GEMM blocking choice) add the
same terms in a different order, so they round differently. The rounding error of a float32 dot of K terms is
bounded by about K * eps * sum_i |a_i b_i| (Higham's gamma_K; with round-to-nearest the errors mostly cancel and
~sqrt(K) * eps * sum_i |a_i b_i| is typical): it scales with the magnitude of the *terms*, neither with the
result (cancellation makes small outputs from large terms) nor with an absolute constant. `atol=1e-6` is ~8
ulps at 1.0, ~1 ulp at 8.0 and a million ulps at 1e-6: too tight for outputs of magnitude ~10 (the AMD EPYC
failure: dense and sparse MoE dispatch up to 1.9e-6 apart on outputs of magnitude ~6, i.e. ~3 eps * max|out|)
and meaningless for small ones. So every tolerance here is

    |actual - expected| <= rtol_ulps * eps * |expected|  +  atol_ulps * eps * scale      (elementwise)

with `scale` the magnitude of the terms (default: max |expected|; pass e.g. max(|a| @ |b|) or the largest
operand of a sum when the terms are larger than the result) and the ulp counts chosen per call site from the
number of roundings that differ between the two sides (about the reduction length for worst cases). Paths
that are bit-identical (same code, same inputs) should be compared exactly instead.
"""

from __future__ import annotations

import chex
import jax
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 2^-23: one ulp of 1.0 (relative spacing of float32)


def _max_abs(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.max(np.abs(x))) if x.size else 0.0


def f32_tolerance(expected, *, rtol_ulps: float = 4.0, atol_ulps: float = 4.0,
                  scale: float | None = None) -> tuple[float, float]:
    """(rtol, atol) for np.testing.assert_allclose / chex: rtol = rtol_ulps * eps and atol = atol_ulps * eps *
    scale, where scale (the magnitude of the terms that were summed) defaults to max |expected|."""
    scale = _max_abs(expected) if scale is None else float(scale)
    return rtol_ulps * F32_EPS, atol_ulps * F32_EPS * scale


def _describe(rtol_ulps, atol_ulps, expected, scale) -> str:
    scale = _max_abs(expected) if scale is None else float(scale)
    return f"float32 tolerance: {rtol_ulps} ulps relative + {atol_ulps} ulps of scale {scale:.6g}"


def assert_close_f32(actual, expected, *, rtol_ulps: float = 4.0, atol_ulps: float = 4.0,
                     scale: float | None = None, err_msg: str = "") -> None:
    """Elementwise |actual - expected| <= rtol_ulps*eps*|expected| + atol_ulps*eps*scale (see the module doc).

    `scale` defaults to max |expected|. Shapes must agree (a scalar `expected` broadcasts). Compared in float64
    (exact copies of the float32 values), so the check itself adds no rounding.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert expected.ndim == 0 or actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    rtol, atol = f32_tolerance(expected, rtol_ulps=rtol_ulps, atol_ulps=atol_ulps, scale=scale)
    note = _describe(rtol_ulps, atol_ulps, expected, scale)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol,
                               err_msg=f"{err_msg}\n{note}" if err_msg else note)


def assert_trees_close_f32(actual, expected, *, rtol_ulps: float = 4.0, atol_ulps: float = 4.0,
                           scale: float | None = None, err_msg: str = "") -> None:
    """`assert_close_f32` leaf by leaf through chex.assert_trees_all_close; each leaf's scale is its own
    max |expected| unless `scale` is given. The tree structures must be equal."""
    chex.assert_trees_all_equal_structs(actual, expected)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
        rtol, atol = f32_tolerance(want, rtol_ulps=rtol_ulps, atol_ulps=atol_ulps, scale=scale)
        note = f"{err_msg} leaf {jax.tree_util.keystr(path)}: {_describe(rtol_ulps, atol_ulps, want, scale)}"
        chex.assert_trees_all_close(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol,
                                    custom_message=note.strip())
