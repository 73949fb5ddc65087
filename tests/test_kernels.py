"""The fused kernels' call sites (dsv3_jax/kernels.py) through the libraries' CPU reference paths, with the
arguments the accelerators get: splash attention in interpret mode, tokamax's `xla` implementation. Values
and gradients against float64 oracles, fp32 and bf16, sequences that are not whole blocks, MLA and the MTP
modules through the model, a mesh (8 fake devices, in a subprocess), and the FLOPs `hlo_cost` counts for the
kernel calls of real TPU / GPU programs."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import mla as mla_module
from dsv3_jax.backend_policy import choose
from dsv3_jax.config import PRESETS
from dsv3_jax.hlo_cost import analyse, kernel_scope
from dsv3_jax.kernels import causal_attention, causal_pairs, grouped_matmul
from dsv3_jax.model import DeepSeekV3
from tolerances import assert_close_f32

ROOT = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]
KERNELS = [("splash", None, True), ("tokamax", "xla", False)]


def _oracle_attention(q, k, v, scale):
    """Causal softmax attention in float64 numpy, [B, T, H, *]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("bthd,bshd->bhts", q, k) * scale
    t = q.shape[1]
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshv->bthv", probs, v)


def _inputs(seq_len, dtype, heads=2, qk=48, v=32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (2, seq_len, heads, d), dtype) for key, d in zip(keys, (qk, qk, v)))


@pytest.mark.parametrize("kernel, implementation, interpret", KERNELS)
@pytest.mark.parametrize("seq_len", [128, 130])  # a whole splash block, and one padded to two
def test_causal_attention_matches_float64_oracle(kernel, implementation, interpret, seq_len):
    q, k, v = _inputs(seq_len, jnp.float32)
    scale = 0.15
    out = causal_attention(q, k, v, scale, kernel, implementation, interpret)
    assert out.shape == (2, seq_len, 2, 32) and out.dtype == jnp.float32
    # fp32 softmax attention over <= 130 keys of 48-dim products: a few ulps of the output scale per reduction
    assert_close_f32(out, _oracle_attention(q, k, v, scale), atol_ulps=64)


@pytest.mark.parametrize("kernel, implementation, interpret", KERNELS)
def test_causal_attention_gradients_match_float64(kernel, implementation, interpret):
    q, k, v = _inputs(130, jnp.float32, seed=1)
    cotangent = jax.random.normal(jax.random.key(9), (2, 130, 2, 32))
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)  # noqa: E731
    got = jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, 0.15, kernel, implementation, interpret)),
                   argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64(True):
        def reference(q, k, v):
            scores = jnp.einsum("bthd,bshd->bhts", q, k) * 0.15
            scores = jnp.where(jnp.tril(jnp.ones((130, 130), bool)), scores, -jnp.inf)
            return jnp.einsum("bhts,bshv->bthv", jax.nn.softmax(scores, -1), v)
        want = jax.grad(loss(reference), argnums=(0, 1, 2))(*(a.astype(jnp.float64) for a in (q, k, v)))
        want = [np.asarray(w) for w in want]
    for name, g, w in zip("qkv", got, want):
        assert_close_f32(g, w, atol_ulps=256, err_msg=f"d{name}")


@pytest.mark.parametrize("kernel, implementation, interpret", KERNELS)
def test_causal_attention_in_bfloat16(kernel, implementation, interpret):
    q, k, v = _inputs(128, jnp.bfloat16, seed=2)
    out = causal_attention(q, k, v, 0.15, kernel, implementation, interpret)
    assert out.dtype == jnp.bfloat16
    want = _oracle_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), 0.15)
    # bf16 inputs and probabilities: 8 bits of mantissa, a few roundings deep
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=3e-2)


def _model_logits(cfg, tokens):
    model = DeepSeekV3(cfg, nnx.Rngs(params=0))
    logits, aux = jax.jit(lambda m, t: m(t))(model, tokens)
    return np.asarray(logits), [np.asarray(x) for x in aux.mtp_logits]


@pytest.mark.parametrize("via", ["splash", "tokamax"])
def test_model_with_fused_attention_matches_xla(via, monkeypatch):
    """The tiny model (MLA in every layer and in its MTP module) with the fused call site against XLA attention:
    splash is what attention_impl=flash runs on CPU; tokamax is GPU's call site, patched to its xla reference."""
    cfg = TINY.replace(init_std=0.3)
    if via == "tokamax":
        real = mla_module.implementation
        monkeypatch.setattr(mla_module, "implementation", lambda c: dataclasses.replace(
            choose(c, "gpu"), attention_kernel="xla", interpret=True) if c.attention_impl == "flash" else real(c))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)), jnp.int32)
    want, want_mtp = _model_logits(cfg.replace(attention_impl="xla"), tokens)
    got, got_mtp = _model_logits(cfg.replace(attention_impl="flash"), tokens)
    assert_close_f32(got, want, atol_ulps=64)
    assert len(got_mtp) == len(want_mtp) == cfg.mtp_depth >= 1  # the MTP modules' attention is compared too
    for g, w in zip(got_mtp, want_mtp):
        assert_close_f32(g, w, atol_ulps=64)


def test_grouped_matmul_matches_oracle_and_zeroes_unused_rows():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    w = rng.standard_normal((4, 16, 8)).astype(np.float32)
    sizes = np.array([7, 0, 20, 5], np.int32)  # 32 rows used, 8 rows of padding
    want = np.zeros((40, 8))
    start = 0
    for g, n in enumerate(sizes):
        want[start:start + n] = x[start:start + n].astype(np.float64) @ w[g].astype(np.float64)
        start += n
    got = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), "xla")
    assert_close_f32(got, want, atol_ulps=16)
    assert not np.any(np.asarray(got)[32:])
    dx, dw = jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, jnp.asarray(sizes), "xla") ** 2), (0, 1))(
        jnp.asarray(x), jnp.asarray(w))
    assert not np.any(np.asarray(dx)[32:]) and not np.any(np.asarray(dw)[1])  # padding and the empty group


def test_moe_with_kernel_grouped_gemm_matches_blocks():
    """ragged dispatch's grouped GEMM through the kernel call site equals the `blocks` GEMM, values and grads."""
    from dsv3_jax.moe import MoE

    cfg = TINY.replace(moe_dispatch="ragged", init_std=0.3)
    x = jax.random.normal(jax.random.key(4), (2, 12, cfg.hidden_size))

    def run(grouped_gemm):
        moe = MoE(cfg.replace(grouped_gemm=grouped_gemm), nnx.Rngs(params=1))
        out = nnx.jit(lambda m: m(x)[0])(moe)
        grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2)))(moe)
        return out, [g[...] for _, g in nnx.to_flat_state(grads)]

    (out_k, grads_k), (out_b, grads_b) = run("kernel"), run("blocks")
    assert_close_f32(out_k, out_b, atol_ulps=16)
    for a, b in zip(grads_k, grads_b):
        assert_close_f32(a, b, atol_ulps=64)


def test_kernels_under_a_mesh():
    """heads split over `tensor` (shard_map around splash) and the grouped-GEMM kernel inside the expert-
    parallel shard_map: the same loss and gradients as XLA attention and the `blocks` GEMM on that mesh."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_kernel_mesh_check.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, entry in report.items():
        want, got = entry["loss"]
        assert abs(got - want) <= 1e-5 * abs(want), name
        assert entry["grad_max_abs_diff"] <= 1e-5 * entry["grad_scale"], name


# ---- FLOPs of kernel calls, from HLO lines shaped like the real ones (v5p splash + megablox, H100 tokamax) ----
def _module(*instructions: str) -> str:
    body = "\n".join(f"  {line}" for line in instructions)
    return f"HloModule m\n\nENTRY %main (p: bf16[8]) -> bf16[8] {{\n{body}\n  ROOT %r = bf16[8] parameter(0)\n}}\n"


def test_hlo_cost_counts_kernel_flops_from_their_scopes():
    b, h, t, qk, v = 1, 4, 1024, 192, 128
    pairs = causal_pairs(t)
    scope = kernel_scope("attention", b, h, pairs, qk, v)
    tpu = 'custom_call_target="tpu_custom_call"'
    hlo = _module(
        f'%splash_mha_fwd_residuals.1 = (f32[128,128], bf16[4,1024,128]) custom-call(%a), {tpu}, '
        f'frontend_attributes={{kernel_metadata={{\n"x": 1\n}}}}, metadata={{op_name="jit(f)/jvp()/{scope}/splash"}}',
        f'%splash_mha_dq_no_residuals.1 = (f32[128,192], bf16[4,1024,192]) custom-call(%a), {tpu}, '
        f'metadata={{op_name="jit(f)/transpose(jvp())/{scope}/splash_mha_dq_no_residuals"}}',
        f'%splash_mha_dkv_no_residuals.1 = (bf16[4,1024,192], bf16[4,1024,128]) custom-call(%a), {tpu}, '
        f'metadata={{op_name="jit(f)/transpose(jvp())/{scope}/splash_mha_dkv_no_residuals"}}')
    per_head = 2.0 * b * h * pairs
    assert analyse(hlo)["matmul_flops"] == per_head * ((qk + v) + (2 * qk + v) + (2 * qk + 2 * v))

    triton = 'custom_call_target="__gpu$xla.gpu.triton"'
    tokamax = '\\"op\\":{\\"__type\\":\\"tokamax._src.ops.attention.pallas_triton'
    hlo = _module(
        f'%pallas_call.8 = (bf16[1024,4,128], f32[4,1024]) custom-call(%a), {triton}, '
        f'metadata={{op_name="jit(f)/{scope}/tokamax:{{{tokamax}.PallasTritonFlashAttention\\"}}"}}',
        f'%pallas_call.12 = (bf16[1024,4,192], bf16[1024,4,192], bf16[1024,4,128]) custom-call(%a), {triton}, '
        f'metadata={{op_name="jit(f)/transpose(jvp())/{scope}/tokamax:{{{tokamax}_vjp.PallasTritonFlashAttentionVjp'
        f'\\"}}"}}')
    assert analyse(hlo)["matmul_flops"] == per_head * ((qk + v) + (4 * qk + 3 * v))

    gmm = kernel_scope("gmm", 2048, 512, 256)
    hlo = _module(*(f'%gmm_megablox.{i} = bf16[2048,256] custom-call(%a), {tpu}, metadata={{op_name="{gmm}/k"}}'
                    for i in range(3)),
                  f'%other = bf16[2048,256] custom-call(%a), custom_call_target="AssumeGatherIndicesInBound", '
                  f'metadata={{op_name="{gmm}/k"}}')
    assert analyse(hlo)["matmul_flops"] == 3 * 2.0 * 2048 * 512 * 256


def test_device_check_dry_run_plumbing():
    """benchmarks/device_check.py --dry-run: its kernel comparisons and step timing run end to end on CPU."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--dry-run"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["dry_run"] and [k["kernel"] for k in report["kernels"]] == ["attention:splash",
                                                                               "grouped_matmul:xla"]
    for row in report["kernels"]:  # bf16 inputs: the kernel and XLA agree to bf16 rounding, not bit for bit
        assert all(v < 0.05 for k, v in row.items() if k.endswith("rel_err")), row
    assert report["steps"][0]["tokens_per_s"] > 0 and report["steps"][0]["predicted_bytes"] > 0
