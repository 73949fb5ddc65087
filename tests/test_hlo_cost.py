"""Matmul FLOPs and collectives counted from optimised HLO text (dsv3_jax/hlo_cost.py), loops expanded.

Checked against programs whose FLOPs are known by construction, compiled on this host's CPU backend (the text
format is XLA's on every backend), and against hand-written HLO for the GPU/TPU-only forms (GEMM custom calls,
async collectives, ragged-dot)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dsv3_jax.hlo_cost import analyse


def _hlo(fn, *shapes) -> str:
    return jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile().as_text()


def test_a_plain_matmul_counts_two_flops_per_multiply_add():
    out = analyse(_hlo(lambda a, b: a @ b, (64, 32), (32, 48)))
    assert out["matmul_flops"] == 2 * 64 * 32 * 48 and out["while_loops"] == []


def test_a_scanned_matmul_counts_every_iteration():
    def scanned(w_LDD, x_BD):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x_BD, w_LDD)[0]

    out = analyse(_hlo(scanned, (7, 32, 32), (16, 32)))
    assert out["while_loops"] == [7]
    assert out["matmul_flops"] == 7 * 2 * 16 * 32 * 32


def test_nested_loops_multiply_and_xla_cost_analysis_does_not():
    def nested(w_LDD, x_BD):
        def outer(h, w):
            return jax.lax.fori_loop(0, 3, lambda _, g: jnp.sin(g @ w), h), None
        return jax.lax.scan(outer, x_BD, w_LDD)[0]

    compiled = jax.jit(nested).lower(jax.ShapeDtypeStruct((5, 8, 8), jnp.float32),
                                     jax.ShapeDtypeStruct((4, 8), jnp.float32)).compile()
    out = analyse(compiled.as_text())
    assert out["matmul_flops"] == 5 * 3 * 2 * 4 * 8 * 8
    assert compiled.cost_analysis()["flops"] < out["matmul_flops"]  # why this module exists


def test_gemm_custom_calls_ragged_dot_and_async_collectives():
    hlo = """HloModule m

%body (p: (s32[], f32[16,32])) -> (s32[], f32[16,32]) {
  %p = (s32[], f32[16,32]{1,0}) parameter(0)
  %h = f32[16,32]{1,0} get-tuple-element(%p), index=1
  %w = f32[32,32]{1,0} constant({...})
  %gemm = (f32[16,32]{1,0}, s8[1024]{0}) custom-call(%h, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %ag = (bf16[4,4]{1,0}, bf16[16,4]{1,0}) all-gather-start(%h), dimensions={0}
  %agd = bf16[16,4]{1,0} all-gather-done(%ag)
  ROOT %t = (s32[], f32[16,32]{1,0}) tuple(%i, %h)
}

%cond (p: (s32[], f32[16,32])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[16,32], g: s32[4], lhs: bf16[64,8], rhs: bf16[4,8,16]) -> f32[16,32] {
  %x = f32[16,32]{1,0} parameter(0)
  %g = s32[4]{0} parameter(1)
  %lhs = bf16[64,8]{1,0} parameter(2)
  %rhs = bf16[4,8,16]{2,1,0} parameter(3)
  %rd = bf16[64,16]{1,0} ragged-dot(%lhs, %rhs, %g), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %ata = bf16[64,16]{1,0} all-to-all(%rd), dimensions={0}
  %w = (s32[], f32[16,32]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  ROOT %r = f32[16,32]{1,0} get-tuple-element(%w), index=1
}
"""
    out = analyse(hlo)
    assert out["while_loops"] == [6]
    assert out["matmul_flops"] == 6 * 2 * 16 * 32 * 32 + 2 * 64 * 16 * 8
    assert out["collectives"] == {"all-gather": {"count": 6, "bytes": 6 * 16 * 4 * 2},
                                  "all-to-all": {"count": 1, "bytes": 64 * 16 * 2}}


def test_both_branches_of_a_conditional_are_counted():
    """A `lax.cond` compiles to a conditional with true/false computations; its matmuls count (an upper bound:
    which branch runs is decided at run time)."""
    def branchy(p, a, b):
        return jax.lax.cond(p > 0, lambda x, y: x @ y, lambda x, y: jnp.zeros((x.shape[0], y.shape[1])), a, b)

    compiled = jax.jit(branchy).lower(jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((16, 8), jnp.float32),
                                      jax.ShapeDtypeStruct((8, 4), jnp.float32)).compile()
    assert analyse(compiled.as_text())["matmul_flops"] == 2 * 16 * 8 * 4


def test_tpu_matmul_forms():
    """XLA:TPU's forms, as it prints them: a matmul as a window-1 convolution, a batched matmul (4 groups) as a
    convolution whose batch dim is a dilated window (one real tap per output position), and the
    grouped-matmul kernel call of ragged_dot's forward."""
    hlo = """HloModule tpu

ENTRY %main (a: bf16[2,257,64], w: bf16[64,96,1], x: bf16[4,512,32], y: bf16[4,512,16], g: s32[1], l: bf16[512,32], r: bf16[8,32,16]) -> bf16[2,257,96] {
  %a = bf16[2,257,64]{2,1,0} parameter(0)
  %w = bf16[64,96,1]{2,1,0} parameter(1)
  %x = bf16[4,512,32]{2,1,0} parameter(2)
  %y = bf16[4,512,16]{2,1,0} parameter(3)
  %g = s32[1]{0} parameter(4)
  %l = bf16[512,32]{1,0} parameter(5)
  %r = bf16[8,32,16]{2,1,0} parameter(6)
  %dw = bf16[4,32,16]{2,1,0} convolution(%x, %y), window={size=4 stride=3 lhs_dilate=4}, dim_labels=0fb_0io->0bf
  %ragged-dot-none = bf16[512,16]{1,0} custom-call(%g, %l, %r), custom_call_target="tpu_custom_call"
  ROOT %mm = bf16[2,257,96]{2,1,0} convolution(%a, %w), window={size=1}, dim_labels=0bf_io0->0bf
}
"""
    out = analyse(hlo)
    assert out["matmul_flops"] == 2 * 2 * 257 * 96 * 64 + 2 * 4 * 32 * 16 * 512 + 2 * 512 * 32 * 16


def test_text_without_an_entry_is_refused():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        analyse("HloModule empty\n")
