"""Ahead-of-time compilation of the real sharded train step for accelerators this host does not have.

XLA compiles for a TPU topology from any host once libtpu is installed (`requirements-tpu.txt`):
`jax.experimental.topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")` describes the
slice's chips, a mesh is built over those devices, every argument becomes a `jax.ShapeDtypeStruct` carrying its
`NamedSharding`, and `lower().compile()` returns the TPU executable with its own memory and cost analyses.
`compile_train_step` does exactly that for the function `train` runs (same mesh plan, sharding rules, remat,
gradient accumulation and MoE dispatch), so a cluster user learns whether a configuration compiles and fits
before renting the slice.

GPU targets (`h100:8`, `h200:8x4`) work the same way through the CUDA plugin (`requirements-gpu.txt`), with the
device description written in `dsv3_jax/gpu_specs.py`.

FLOPs: XLA's cost analysis does not exist on GPU and counts the body of a `while` loop once (one layer per
scanned stack, one microbatch), so `flops_per_step` comes from `dsv3_jax.hlo_cost`, which counts the matmuls of
the optimised HLO (GPU dots and GEMM calls, TPU convolutions and grouped-matmul kernels) with every loop
expanded by its trip count. XLA's own figure is kept, for TPU, as `xla_flops_loop_bodies_once`.
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

from dsv3_jax.backend_policy import choose
from dsv3_jax.config import ConfigError
from dsv3_jax.gpu_specs import GPU_SPECS, target_config_textproto
from dsv3_jax.hlo_cost import analyse as analyse_hlo

GIB = 2 ** 30
# HBM per chip, from the vendors' published specifications (Cloud TPU system architecture pages): v5p 95 GiB,
# v5e 16 GiB, v6e (Trillium) 32 GiB, v4 32 GiB.
TPU_HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}
GPU_INSTALL = ('GPU targets need the CUDA plugin: pip install -r requirements-gpu.txt (jax[cuda12]==0.10.2, '
               '~5.5 GB; compiles on any host, no GPU needed)')
TPU_INSTALL = ('TPU targets need libtpu: pip install -r requirements-tpu.txt (jax[tpu]==0.10.2, ~700 MB; '
               'compiles on any host, no TPU needed)')


@dataclasses.dataclass(frozen=True)
class Target:
    """A compilation target: a TPU slice (`v5p:8x8x8`, chips along each torus axis) or NVIDIA GPU nodes
    (`h100:8` one node of 8 GPUs, `h100:8x4` four such nodes)."""

    text: str
    platform: str  # "tpu" | "gpu"
    generation: str  # "v5p", "h100", ...
    chips: int
    hbm_gib: float  # per device
    nodes: int = 1  # GPU hosts (a TPU slice's hosts are libtpu's business)


def parse_target(text: str) -> Target:
    """`v5p:2x2x1` or `h100:8[xN]` -> Target; a ConfigError naming --target for anything else (before any
    backend starts)."""
    generation, sep, shape = text.partition(":")
    generation = generation.lower()
    if generation in TPU_HBM_GIB and sep and re.fullmatch(r"\d+(x\d+){1,2}", shape):
        chips = math.prod(int(n) for n in shape.split("x"))
        if chips >= 1:
            return Target(text, "tpu", generation, chips, TPU_HBM_GIB[generation])
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", shape)
    if generation in GPU_SPECS and sep and match:
        per_node, nodes = int(match.group(1)), int(match.group(2) or 1)
        if 1 <= per_node <= 8 and nodes >= 1:
            return Target(text, "gpu", generation, per_node * nodes, GPU_SPECS[generation].memory_gib, nodes)
        raise ConfigError("--target", f"{text!r}: a node holds 1 to 8 GPUs and there is at least one node "
                          f"(h100:8 is one node of 8, h100:8x4 four of them)")
    raise ConfigError("--target", f"{text!r} is not a TPU topology such as v5p:2x2x1 or v5e:4x4 (generations: "
                      f"{', '.join(sorted(TPU_HBM_GIB))}) nor GPU nodes such as h100:8 or h200:8x2 "
                      f"(GPUs: {', '.join(sorted(GPU_SPECS))})")


def prepare_backend(target: Target) -> None:
    """Settings that must be in place before JAX starts a backend (or libtpu loads). A GPU target compiles
    through the CUDA plugin with no GPU present, so JAX must not try to start it as a device backend (it would
    fail `cuInit` and never register the plugin's compiler), and XLA must not use CUB's radix sort, whose
    scratch size is asked of a real device, nor autotune Triton GEMMs."""
    if target.platform == "tpu":
        # Compiling needs no TPU, so several compiles may share a host; without this libtpu takes a host-wide
        # lock (/tmp/libtpu_lockfile) that refuses a second process and outlives a killed one.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        return
    # Without a device XLA cannot autotune Triton GEMM tilings, and its untuned default finds none for some
    # shapes (e.g. [16388, 1024] x [1024, 7168]: "Couldn't find output tile sizes"); cuBLAS GEMMs need no
    # tuning. Memory figures are those of that program; a real node may pick Triton GEMMs after autotuning.
    for flag in ("--xla_gpu_enable_cub_radix_sort=false", "--xla_gpu_enable_triton_gemm=false"):
        if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    jax.config.update("jax_platforms", "cpu")


def has_cuda_plugin() -> bool:
    """Whether JAX's CUDA 12 plugin (requirements-gpu.txt) is installed, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def target_devices(target: Target) -> list[Any]:
    """The target's (abstract) devices; a ConfigError with the install line when the plugin is missing."""
    import importlib.util

    from jax.experimental import topologies

    if target.platform == "gpu":
        if not has_cuda_plugin():
            raise ConfigError("--target", GPU_INSTALL)
        prepare_backend(target)
        config = target_config_textproto(GPU_SPECS[target.generation])
        per_node = target.chips // target.nodes
        try:
            with _native_stderr_quiet():
                topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                                        topology=f"1x{target.nodes}x{per_node}")
        except Exception as err:  # noqa: BLE001 - the plugin's message names the problem
            raise ConfigError("--target", f"the CUDA plugin cannot describe {target.text!r}: "
                              f"{str(err).splitlines()[0]}") from None
        return list(topology.devices)
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("--target", TPU_INSTALL)
    prepare_backend(target)
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


def model_flops_per_token(config: Any) -> float:
    """6 x active parameters (forward + backward) plus attention's 12 x layers x heads x (q.k + p.v dims) x
    seq / 2 (causal), per trained token."""
    from dsv3_jax.accounting import count_params

    cfg, seq = config.model, config.train.seq_len
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq
    return 6.0 * count_params(cfg).active + attention


def compile_train_step(config: Any, target: Target, dump_hlo: str | None = None) -> dict[str, Any]:
    """AOT-compile `train`'s step for `target` and report what XLA says about it (one JSON-able dict)."""
    from dsv3_jax.plan import estimate_memory
    from dsv3_jax.train.setup import build_training

    config.validate()
    devices = target_devices(target)
    setup = build_training(config, devices)  # impossible meshes fail here
    mc, tc = config.model, config.train
    impl = choose(mc, target.platform, setup.plan.facts())
    t0 = time.perf_counter()
    # `auto` choices are made for the target, not for this host's backend: the layers ask the policy for the
    # backend of JAX's default device, and the kernel libraries pick their implementation by it too.
    with jax.default_device(devices[0]):
        lowered = setup.train_step.lower(setup.abstract, setup.window)
    mesh = dict(setup.plan.mesh.shape)
    estimate = estimate_memory(mc, tc, mesh, fsdp=config.mesh.fsdp, backend=target.platform)
    base = {"target": target.text, "platform": target.platform, "devices": len(devices),
            "device_kind": getattr(devices[0], "device_kind", str(devices[0])), "mesh": mesh,
            "fsdp": config.mesh.fsdp,
            "plan_gib": {"total": round(estimate.total / GIB, 3),
                         "activations_and_gradients": round((estimate.activations + estimate.gradients) / GIB, 3)},
            "config": {"layers": mc.num_hidden_layers, "moe_dispatch": impl.moe_dispatch,
                       "grouped_gemm": impl.grouped_gemm, "attention": impl.attention,
                       "attention_chunk": impl.attention_chunk, "loss": impl.loss, "exchange": impl.exchange,
                       "capacity_factor": mc.capacity_factor, "remat": mc.remat, "scan_layers": mc.scan_layers,
                       "grad_accum": tc.grad_accum, "batch_size": tc.batch_size, "seq_len": tc.seq_len,
                       "dtype": mc.dtype}}
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - only XLA's out-of-memory verdict is a result, the rest re-raises
        needed = re.search(r"HLO temporaries \(([0-9.]+)([KMGT])\) exceeds available HBM \(([0-9.]+)([KMGT])\)",
                           str(err))
        if "RESOURCE_EXHAUSTED" not in str(err) or needed is None:
            raise
        unit = {"K": 2 ** -20, "M": 2 ** -10, "G": 1, "T": 2 ** 10}  # XLA's binary units, to GiB
        return {**base, "compile_s": round(time.perf_counter() - t0, 1), "fits": False,
                "hbm_gib": {"temporaries": round(float(needed.group(1)) * unit[needed.group(2)], 3),
                            "available": round(float(needed.group(3)) * unit[needed.group(4)], 3),
                            "capacity": target.hbm_gib},
                "flops_per_step": None, "collectives": None, "host_peak_rss_gib": round(_peak_rss_gib(), 2),
                "error": str(err).splitlines()[0][:400]}
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()  # None on GPU
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    hlo = compiled.as_text()
    hlo_cost = analyse_hlo(hlo)
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, "train_step.optimized.hlo.txt"), "w") as f:
            f.write(hlo)
    hbm = {"arguments": mem.argument_size_in_bytes / GIB, "outputs": mem.output_size_in_bytes / GIB,
           "temporaries": mem.temp_size_in_bytes / GIB, "aliased": mem.alias_size_in_bytes / GIB}
    # donated state: outputs alias the arguments, so they are counted once
    hbm["total"] = hbm["arguments"] + hbm["outputs"] - hbm["aliased"] + hbm["temporaries"]
    hbm["capacity"] = target.hbm_gib
    tokens = tc.batch_size * tc.seq_len
    model_flops = model_flops_per_token(config) * tokens
    flops = hlo_cost["matmul_flops"] * len(devices) or None  # None: no matmul the counter knows (hlo_cost.py)
    return {**base, "compile_s": round(compile_s, 1),
            "hbm_gib": {k: round(v, 3) for k, v in hbm.items()}, "fits": hbm["total"] <= target.hbm_gib,
            "flops_per_step": flops, "flops_per_device": flops / len(devices) if flops else None,
            "host_peak_rss_gib": round(_peak_rss_gib(), 2),
            "model_flops_per_token": model_flops_per_token(config), "model_flops_per_step": model_flops,
            "flops_over_model": round(flops / model_flops, 3) if flops else None, "tokens_per_step": tokens,
            "xla_flops_loop_bodies_once": float(cost["flops"]) if cost and "flops" in cost else None,
            "while_loop_trips": hlo_cost["while_loops"], "collectives": hlo_cost["collectives"],
            "kernel_calls": hlo_cost["kernel_calls"]}


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


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
             (f"matmul FLOPs per step {report['flops_per_step']:.4e} (all devices, from the optimised HLO with "
              f"loop trip counts) = {report['flops_over_model']:.3f} x the model's 6N_active + attention "
              f"({report['model_flops_per_token']:.4e} per token x {report['tokens_per_step']} tokens)"
              if report["flops_per_step"] else
              f"model FLOPs per token {report['model_flops_per_token']:.4e}; XLA cost analysis (loop bodies once) "
              f"{report['xla_flops_loop_bodies_once']:.4e}"),
             f"host peak memory while compiling {report['host_peak_rss_gib']} GiB",
             "collectives per step (per device, loops expanded):"]
    for op, v in report["collectives"].items():
        lines.append(f"  {op}: {v['count']} ops, {v['bytes'] / 2**30:.2f} GiB of results")
    return "\n".join(lines)
