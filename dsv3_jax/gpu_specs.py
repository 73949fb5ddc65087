"""Device descriptions of the NVIDIA GPUs `compile --target` knows, for compiling without the GPU.

XLA's GPU compiler normally asks the driver what it compiles for. Deviceless, it takes the same facts from a
`GpuTargetConfigProto` (XLA's `stream_executor/device_description.proto`, text format). We write ours from the
vendors' published specifications, one `GpuSpec` per product, and render the proto from it:

* H100 SXM5 80GB: NVIDIA H100 Tensor Core GPU datasheet and the NVIDIA Hopper (GH100) architecture whitepaper:
  132 SMs, 80 GB HBM3 at 3.35 TB/s, 50 MB L2, 1.98 GHz boost clock, compute capability 9.0.
* H200 SXM 141GB: NVIDIA H200 Tensor Core GPU datasheet: the same GH100 die (132 SMs, 50 MB L2, 1.98 GHz) with
  141 GB HBM3e at 4.8 TB/s.
* Per-SM limits shared by every Hopper part (CUDA C++ Programming Guide, "Compute Capabilities", 9.0): 228 KB
  shared memory per SM of which 227 KB per block when opted in (48 KB without), 64K 32-bit registers per SM and
  per block, 2048 resident threads per SM, 1024 threads per block, warps of 32, grid limits 2^31-1 x 65535 x
  65535, block limits 1024 x 1024 x 64.
* Software versions: the CUDA runtime and cuDNN that `requirements-gpu.txt` installs (CUDA 12.9, cuDNN 9.10 as
  the oldest 9.x our plugin accepts), so the compiler picks the code paths a node with that stack would.

Memory capacity is the datasheet's (80 and 141, read as GiB). CUDA makes slightly less available on a real
device (79.1 GiB on an H100 80GB), so a configuration within ~1 GiB of the limit is not a safe fit.
"""

from __future__ import annotations

import dataclasses

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    name: str  # the device name the driver reports
    sm_count: int
    memory_gib: float
    memory_bandwidth_bytes_s: float
    l2_cache_bytes: int
    boost_clock_ghz: float
    compute_capability: tuple[int, int]
    nvlink_links: int


# Hopper (compute capability 9.0) per-SM and per-block limits.
_HOPPER_LIMITS = {
    "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 1024,
    "shared_memory_per_core": 228 * 1024, "shared_memory_per_block_optin": 227 * 1024,
    "threads_per_core_limit": 2048, "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
    "block_dim_limit_x": 2 ** 31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
    "thread_dim_limit_x": 1024, "thread_dim_limit_y": 1024, "thread_dim_limit_z": 64, "fpus_per_core": 128,
}
CUDA_RUNTIME = "12.9.0"
CUDNN = (9, 10, 0)

GPU_SPECS: dict[str, GpuSpec] = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", sm_count=132, memory_gib=80, memory_bandwidth_bytes_s=3.35e12,
                    l2_cache_bytes=50 * 2 ** 20, boost_clock_ghz=1.98, compute_capability=(9, 0), nvlink_links=18),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", sm_count=132, memory_gib=141, memory_bandwidth_bytes_s=4.8e12,
                    l2_cache_bytes=50 * 2 ** 20, boost_clock_ghz=1.98, compute_capability=(9, 0), nvlink_links=18),
}


def target_config_textproto(spec: GpuSpec) -> str:
    """The `GpuTargetConfigProto` text XLA's deviceless GPU compiler reads (`topologies.get_topology_desc(
    platform="cuda", target_config=...)`)."""
    major, minor = spec.compute_capability
    fields = {
        **_HOPPER_LIMITS,
        "core_count": spec.sm_count,
        "memory_bandwidth": int(spec.memory_bandwidth_bytes_s),
        "l2_cache_size": spec.l2_cache_bytes,
        "clock_rate_ghz": spec.boost_clock_ghz,
        "device_memory_size": int(spec.memory_gib * GIB),
    }
    lines = ["gpu_device_info {"]
    lines += [f"  {key}: {value}" for key, value in fields.items()]
    lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
              f'  name: "{spec.name}"',
              '  device_vendor: "NVIDIA Corporation"',
              f'  runtime_version: "{CUDA_RUNTIME}"',
              f'  dnn_version: "{".".join(map(str, CUDNN))}"',
              f"  device_interconnect_info {{ active_links: {spec.nvlink_links} }}",
              "}",
              'platform_name: "CUDA"',
              f"dnn_version_info {{ major: {CUDNN[0]} minor: {CUDNN[1]} patch: {CUDNN[2]} }}",
              f'device_description_str: "{spec.name}"']
    return "\n".join(lines) + "\n"
