"""The first thing to run on a machine with one GPU or TPU: are the kernels right there, how fast are the
training steps, and does `compile`'s memory prediction hold? One command, one JSON object, minutes.

    python benchmarks/device_check.py            # on the accelerator host (GPU: .venv-gpu; TPU: requirements-tpu)
    python benchmarks/device_check.py --dry-run  # anywhere: the same plumbing at toy sizes, kernels interpreted

It reports:
- `kernels`: each fused kernel backend_policy.choose picks on this device (MLA causal attention, the routed
  experts' grouped matmul) against the XLA path on the same device, at V3's head dims: max relative error of
  the output and of every input gradient (bf16 inputs, fp32 reductions);
- `steps`: the `small` and `moe-1b` presets' train steps as the trainer compiles them: tokens/s, achieved
  TFLOP/s (model FLOPs, aot.model_flops_per_token) and MFU against the chip's bf16 dense peak (PEAK_TFLOPS),
  and the device's real peak memory (`memory_stats`) against the compiled program's own prediction
  (`memory_analysis`: arguments + outputs - aliased + temporaries).

No accelerator number exists yet for this project: the README's results say so until this has run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense bf16 peak per chip, TFLOP/s (vendor datasheets: H100/H200 SXM, TPU v4/v5e/v5p/v6e system architecture).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "v4": 275.0, "v5 lite": 197.0, "v5e": 197.0, "v5p": 459.0,
               "TPU v5": 459.0, "v6": 918.0}


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in device_kind.lower():
            return peak
    return None


def _max_rel(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check_kernels(dry_run: bool) -> list[dict]:
    """Each kernel the policy picks here against the XLA path: output and input-gradient relative errors."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.backend_policy import choose, current_backend
    from dsv3_jax.config import get_preset
    from dsv3_jax.kernels import causal_attention, grouped_matmul
    from dsv3_jax.mla import attend

    backend = current_backend()
    impl = choose(get_preset("deepseek-v3-671b"), backend)
    if dry_run and impl.attention == "xla":  # on CPU: the accelerator call sites through their reference paths
        impl = dataclasses.replace(impl, attention="splash", grouped_gemm="kernel", gemm_kernel="xla", interpret=True)
    b, t, h = (1, 256, 2) if dry_run else (1, 4096, 16)
    keys = jax.random.split(jax.random.key(0), 8)
    q, k = (jax.random.normal(keys[i], (b, t, h, 192), jnp.bfloat16) for i in (0, 1))
    v = jax.random.normal(keys[2], (b, t, h, 128), jnp.bfloat16)
    cot = jax.random.normal(keys[3], (b, t, h, 128), jnp.float32)
    scale = 192 ** -0.5
    rows = []

    def xla_attention(q, k, v):  # mla.attend with the rope part folded into q/k (same scores)
        zeros = jnp.zeros((*k.shape[:2], 0), k.dtype)
        return attend(q, jnp.zeros((*q.shape[:3], 0), q.dtype), k, zeros, v, jnp.tril(jnp.ones((t, t), bool)), scale)

    def fused(q, k, v):
        return causal_attention(q, k, v, scale, impl.attention, impl.attention_kernel, impl.interpret)

    def value_and_grads(fn):
        out, vjp = jax.vjp(lambda *a: fn(*a).astype(jnp.float32), q, k, v)
        return out, vjp(cot)

    (out_k, grads_k), (out_x, grads_x) = (jax.jit(value_and_grads, static_argnums=0)(f) for f in (fused, xla_attention))
    rows.append({"kernel": f"attention:{impl.attention}", "output_rel_err": _max_rel(out_k, out_x),
                 **{f"d{n}_rel_err": _max_rel(a, c) for n, a, c in zip("qkv", grads_k, grads_x)}})

    m, d, f, g = (512, 256, 128, 8) if dry_run else (32768, 7168, 2048, 8)
    x = jax.random.normal(keys[4], (m, d), jnp.bfloat16)
    w = jax.random.normal(keys[5], (g, d, f), jnp.bfloat16) * 0.02
    sizes = jnp.full((g,), m // g, jnp.int32)
    gcot = jax.random.normal(keys[6], (m, f), jnp.float32)
    kernel_name = impl.gemm_kernel or "xla"

    def gmm_value_and_grads(fn):
        out, vjp = jax.vjp(lambda x, w: fn(x, w).astype(jnp.float32), x, w)
        return out, vjp(gcot)

    kern = jax.jit(gmm_value_and_grads, static_argnums=0)(lambda x, w: grouped_matmul(x, w, sizes, kernel_name))
    ref = jax.jit(gmm_value_and_grads, static_argnums=0)(
        lambda x, w: jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32))
    rows.append({"kernel": f"grouped_matmul:{kernel_name}", "output_rel_err": _max_rel(kern[0], ref[0]),
                 "dx_rel_err": _max_rel(kern[1][0], ref[1][0]), "dw_rel_err": _max_rel(kern[1][1], ref[1][1])})
    return rows


def check_steps(dry_run: bool, steps: int) -> list[dict]:
    """Tokens/s, MFU and real against predicted peak memory of the trainer's step for two presets."""
    import jax

    from benchmarks._step import trainer_step
    from dsv3_jax.aot import model_flops_per_token
    from dsv3_jax.config import get_preset
    from dsv3_jax.train.config import Config, DataConfig
    from dsv3_jax.train.presets import train_preset

    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind)
    rows = []
    for preset in (("tiny",) if dry_run else ("small", "moe-1b")):
        model = get_preset(preset) if dry_run else get_preset(preset).replace(dtype="bfloat16")
        train = train_preset("small" if preset == "tiny" else preset)
        if dry_run:
            train = dataclasses.replace(train, batch_size=2, seq_len=32, grad_accum=1)
        config = Config(model=model, train=train, data=DataConfig())
        step = trainer_step(config)
        seconds, _ = step.median_s(steps, warmup=2)
        mem = step.compiled.memory_analysis()
        predicted = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                     + mem.temp_size_in_bytes)
        stats = device.memory_stats() or {}
        tokens = train.batch_size * train.seq_len
        achieved = model_flops_per_token(config) * tokens / seconds / 1e12
        rows.append({"preset": preset, "batch": train.batch_size, "seq_len": train.seq_len,
                     "compile_s": round(step.compile_s, 1), "step_s": round(seconds, 4),
                     "tokens_per_s": round(tokens / seconds, 1), "model_tflops_per_s": round(achieved, 2),
                     "mfu": round(achieved / peak, 4) if peak else None,
                     "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "predicted_bytes": predicted,
                     "peak_over_predicted": (round(stats["peak_bytes_in_use"] / predicted, 3)
                                             if stats.get("peak_bytes_in_use") else None)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="toy sizes on any backend (CPU: kernels interpreted)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per preset (after 2 warm-up steps)")
    args = p.parse_args(argv)
    import jax

    t0 = time.perf_counter()
    device = jax.devices()[0]
    report = {"dry_run": args.dry_run, "backend": jax.default_backend(), "device_kind": device.device_kind,
              "peak_bf16_tflops": peak_tflops(device.device_kind), "jax": jax.__version__}
    report["kernels"] = check_kernels(args.dry_run)
    report["steps"] = check_steps(args.dry_run, 2 if args.dry_run else args.steps)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
