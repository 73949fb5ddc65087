"""Ahead-of-time compilation of the real sharded train step for accelerators this host does not have.

XLA compiles for a TPU topology from any host once libtpu is installed (`requirements-tpu.txt`):
`jax.experimental.topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")` describes the
slice's chips, a mesh is built over those devices, every argument becomes a `jax.ShapeDtypeStruct` carrying its
`NamedSharding`, and `lower().compile()` returns the TPU executable with its own memory and cost analyses.
`compile_train_step` does exactly that for the function `train` runs (same mesh plan, sharding rules, remat,
gradient accumulation and MoE dispatch), so a cluster user learns whether a configuration compiles and fits
before renting the slice.

Caveat on FLOPs: XLA's cost analysis counts the body of a `while` loop once, so for scanned layers
(`model.scan_layers`) or gradient accumulation its `flops` covers one layer per stack and one microbatch.
The report gives that figure as `xla_flops_loop_bodies_once` and the model FLOPs per token separately.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from dsv3_jax.config import ConfigError

GIB = 2 ** 30
# HBM per chip, from the vendors' published specifications (Cloud TPU system architecture pages): v5p 95 GiB,
# v5e 16 GiB, v6e (Trillium) 32 GiB, v4 32 GiB.
TPU_HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}
TPU_INSTALL = ('TPU targets need libtpu: pip install -r requirements-tpu.txt (jax[tpu]==0.10.2, ~700 MB; '
               'compiles on any host, no TPU needed)')
COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


@dataclasses.dataclass(frozen=True)
class Target:
    """A compilation target: a TPU slice topology such as `v5p:2x2x1` (chips along each torus axis)."""

    text: str
    platform: str  # "tpu"
    generation: str  # "v5p", ...
    chips: int
    hbm_gib: float  # per device

    def describe(self) -> str:
        return f"{self.text}: {self.chips} {self.generation} chips, {self.hbm_gib:g} GiB HBM each"


def parse_target(text: str) -> Target:
    """`v5p:2x2x1` -> Target; a ConfigError naming --target for anything else (before any backend starts)."""
    generation, sep, shape = text.partition(":")
    generation = generation.lower()
    if generation in TPU_HBM_GIB and sep and re.fullmatch(r"\d+(x\d+){1,2}", shape):
        chips = math.prod(int(n) for n in shape.split("x"))
        if chips >= 1:
            return Target(text, "tpu", generation, chips, TPU_HBM_GIB[generation])
    raise ConfigError("--target", f"{text!r} is not a TPU topology such as v5p:2x2x1 or v5e:4x4 "
                      f"(generations: {', '.join(sorted(TPU_HBM_GIB))}; GPU targets are not built yet)")


def target_devices(target: Target) -> list[Any]:
    """The target's (abstract) devices; a ConfigError with the install line when the plugin is missing."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("--target", TPU_INSTALL)
    from jax.experimental import topologies

    try:
        with _native_stderr_quiet():  # libtpu warns that this host has no TPU metadata: true and harmless here
            topology = topologies.get_topology_desc(topology_name=target.text, platform="tpu")
    except Exception as err:  # noqa: BLE001 - libtpu's message names the problem
        raise ConfigError("--target", f"libtpu does not know the topology {target.text!r}: "
                          f"{str(err).splitlines()[0]}") from None
    return list(topology.devices)


@contextlib.contextmanager
def _native_stderr_quiet() -> Iterator[None]:
    """Send file descriptor 2 (where C++ libraries log) to a temporary file for the duration; replay it if the
    block raises, so nothing useful is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in an HLO module's text (async `-start` halves included;
    bytes are the op's result shapes). Ops inside loop bodies are counted once, like XLA's cost analysis."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if match is None:
            continue
        op = match.group(2)
        out[op]["count"] += 1
        out[op]["bytes"] += _shape_bytes(match.group(1))
    return {op: v for op, v in out.items() if v["count"]}


def _shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO result shape such as `f32[8,128]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"([a-z]+[0-9a-z]*)\[([0-9,]*)\]", shape_text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def model_flops_per_token(config: Any) -> float:
    """6 x active parameters (forward + backward) plus attention's 12 x layers x heads x (q.k + p.v dims) x
    seq / 2 (causal), per trained token."""
    from dsv3_jax.accounting import count_params

    cfg, seq = config.model, config.train.seq_len
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq
    return 6.0 * count_params(cfg).active + attention


def compile_train_step(config: Any, target: Target, dump_hlo: str | None = None) -> dict[str, Any]:
    """AOT-compile `train`'s step for `target` and report what XLA says about it (one JSON-able dict)."""
    from dsv3_jax import sharding
    from dsv3_jax.plan import estimate_memory
    from dsv3_jax.train.step import abstract_train_state, jit_train_step, state_shardings

    config.validate()
    devices = target_devices(target)
    plan = sharding.plan_from_config(config, devices, every_param=False)  # impossible meshes fail here
    mc, tc = config.model, config.train
    graphdef, abstract = abstract_train_state(mc, tc, plan)
    plan.check_divisible(abstract.params)
    shardings = state_shardings(plan, abstract)
    window = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len + 1 + mc.mtp_depth), jnp.int32,
                                  sharding=plan.batch_sharding())
    t0 = time.perf_counter()
    lowered = jit_train_step(graphdef, mc, tc, plan, shardings).lower(abstract, window)
    mesh = dict(plan.mesh.shape)
    estimate = estimate_memory(mc, tc, mesh, fsdp=config.mesh.fsdp, backend=target.platform)
    base = {"target": target.text, "platform": target.platform, "devices": len(devices),
            "device_kind": getattr(devices[0], "device_kind", str(devices[0])), "mesh": mesh,
            "fsdp": config.mesh.fsdp,
            "plan_gib": {"total": round(estimate.total / GIB, 3),
                         "activations_and_gradients": round((estimate.activations + estimate.gradients) / GIB, 3)},
            "config": {"layers": mc.num_hidden_layers, "moe_dispatch": mc.moe_dispatch,
                       "capacity_factor": mc.capacity_factor, "remat": mc.remat, "scan_layers": mc.scan_layers,
                       "grad_accum": tc.grad_accum, "batch_size": tc.batch_size, "seq_len": tc.seq_len,
                       "dtype": mc.dtype}}
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - only XLA's out-of-memory verdict is a result, the rest re-raises
        needed = re.search(r"HLO temporaries \(([0-9.]+)G\) exceeds available HBM \(([0-9.]+)G\)", str(err))
        if "RESOURCE_EXHAUSTED" not in str(err) or needed is None:
            raise
        return {**base, "compile_s": round(time.perf_counter() - t0, 1), "fits": False,
                "hbm_gib": {"temporaries": float(needed.group(1)), "available": float(needed.group(2)),
                            "capacity": target.hbm_gib},
                "error": str(err).splitlines()[0][:400]}
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    hlo = compiled.as_text()
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, "train_step.optimized.hlo.txt"), "w") as f:
            f.write(hlo)
    hbm = {"arguments": mem.argument_size_in_bytes / GIB, "outputs": mem.output_size_in_bytes / GIB,
           "temporaries": mem.temp_size_in_bytes / GIB, "aliased": mem.alias_size_in_bytes / GIB}
    # donated state: outputs alias the arguments, so they are counted once
    hbm["total"] = hbm["arguments"] + hbm["outputs"] - hbm["aliased"] + hbm["temporaries"]
    hbm["capacity"] = target.hbm_gib
    return {**base, "compile_s": round(compile_s, 1),
            "hbm_gib": {k: round(v, 3) for k, v in hbm.items()}, "fits": hbm["total"] <= target.hbm_gib,
            "xla_flops_loop_bodies_once": float(cost["flops"]) if cost and "flops" in cost else None,
            "model_flops_per_token": model_flops_per_token(config),
            "tokens_per_step": tc.batch_size * tc.seq_len,
            "collectives": hlo_collectives(hlo)}


def format_report(report: dict[str, Any]) -> str:
    """A readable summary of `compile_train_step`'s report."""
    hbm = report["hbm_gib"]
    mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
    head = f"target {report['target']}: {report['devices']} x {report['device_kind']}, mesh {mesh}" + (
        " (fsdp)" if report["fsdp"] else "")
    if "error" in report:
        return "\n".join([head, f"DOES NOT FIT: XLA needs {hbm['temporaries']:g} GiB of temporaries per chip, "
                                 f"{hbm['available']:g} GiB are available (found after {report['compile_s']} s)",
                           f"plan's estimate: {report['plan_gib']['total']:.3f} GiB per device in total"])
    lines = [head,
             f"compiled in {report['compile_s']} s",
             f"per device: arguments {hbm['arguments']:.3f} GiB, outputs {hbm['outputs']:.3f} GiB "
             f"(aliased {hbm['aliased']:.3f}), temporaries {hbm['temporaries']:.3f} GiB, total {hbm['total']:.3f} "
             f"of {hbm['capacity']:g} GiB -> {'fits' if report['fits'] else 'DOES NOT FIT'}",
             f"plan's estimate: {report['plan_gib']['total']:.3f} GiB per device",
             f"model FLOPs per token {report['model_flops_per_token']:.3e}; XLA cost analysis (loop bodies once) "
             f"{report['xla_flops_loop_bodies_once']}"]
    for op, v in report["collectives"].items():
        lines.append(f"  {op}: {v['count']} ops, {v['bytes'] / 2**20:.1f} MiB of results")
    return "\n".join(lines)
