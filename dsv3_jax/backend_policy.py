"""Per-backend policy: every implementation choice the model makes, decided in one pure function (`choose`).

Given the model config, the backend ("cpu" | "gpu" | "tpu") and what the mesh looks like (`MeshFacts`), `choose`
returns an `Implementation`: the MoE dispatch and its grouped GEMM, how tokens reach expert shards, whether
dropless `capacity` spills, which attention runs (XLA, chunked XLA, or a fused kernel), the LM-head loss, the
grouped-GEMM block size and the dispatch of generation's decode steps. The layers (through
`partitioning.implementation`), the memory `plan`, `compile` and generation all ask here, so a backend's
behaviour is changed in one place. Each `auto` answer is a measurement (benchmarks/README.md).

Kernels: on TPU, attention is Pallas splash attention (ships in jax) and the grouped GEMM tokamax's Mosaic
`ragged_dot` (megablox); on GPU, tokamax's Triton flash attention and Triton `ragged_dot`. On CPU they run only
when asked for explicitly, through their reference paths (splash with `interpret=True`, tokamax's `xla`
implementation): slow, but the same call sites, which is how the CPU suite checks them.
"""

from __future__ import annotations

import dataclasses

from dsv3_jax.config import ModelConfig

BACKENDS = ("cpu", "gpu", "tpu")
# Rows per block of the `blocks` grouped GEMM and of `blocked` dispatch: a multiple of GPU/TPU matmul tiles.
GROUP_BLOCK_ROWS = 128
# Dropless `capacity` on one device: slots for this multiple of each expert's fair share N*K/E, the assignments
# past them (few once routing is balanced) in blocks of SPILL_BLOCK_ROWS rows.
SPILL_CAPACITY_FACTOR = 1.25
SPILL_BLOCK_ROWS = 32
# Positions per chunk of the chunked LM-head loss: one chunk of V3's 129,280-word fp32 logits is 0.25 GiB per
# sequence (the whole 4K sequence's: 2 GiB), and 512 rows are whole GEMM tiles on every backend.
LOSS_CHUNK_POSITIONS = 512


@dataclasses.dataclass(frozen=True)
class MeshFacts:
    """What the policy needs to know about a mesh (partitioning.MeshPlan.facts() builds it)."""

    devices: int = 1
    token_shards: int = 1  # shards of the token (batch) axes
    experts_split_tokens: bool = False  # the experts' mesh axis is one of the token axes


@dataclasses.dataclass(frozen=True)
class Implementation:
    """Every per-backend choice for one model on one backend and mesh."""

    backend: str
    moe_dispatch: str  # dense | capacity | blocked | ragged
    grouped_gemm: str  # blocks | ragged_dot | kernel (the grouped GEMM of ragged dispatch)
    gemm_kernel: str | None  # tokamax ragged_dot implementation when grouped_gemm == kernel: mosaic | triton | xla
    exchange: str  # none (one device) | gspmd (XLA shards the dispatch) | ragged | padded (all-to-all transports)
    capacity_spill: bool  # dropless capacity: fair-share slots plus a block-padded spill, not E x N slots
    attention: str  # xla | chunked | splash | tokamax
    attention_kernel: str | None  # tokamax implementation (triton | mosaic | xla); None otherwise
    attention_chunk: int | None  # query chunk of `chunked`
    interpret: bool  # kernels run through their reference / interpret path (CPU)
    loss: str  # xla (whole fp32 logits) | chunked (head_loss.chunked_cross_entropy)
    loss_chunk: int | None  # positions per chunk of `chunked`
    block_rows: int
    decode_dispatch: str  # MoE dispatch of generation's 1-2-token decode and verify steps

    @property
    def expert_parallel(self) -> bool:
        return self.exchange in ("ragged", "padded")


def normalise_backend(platform: str) -> str:
    """JAX platform names ("cuda", "rocm", "gpu", "tpu", "cpu") as the policy's backends."""
    backend = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {platform!r} (one of {BACKENDS})")
    return backend


def current_backend() -> str:
    """The backend code is being traced for: the platform of JAX's default device when one is set (deviceless
    compilation for a TPU/GPU target points it at a target device), else JAX's default backend."""
    import jax

    device = jax.config.jax_default_device
    if device is not None and not isinstance(device, str):
        return normalise_backend(device.platform)
    return normalise_backend(device or jax.default_backend())


def exchange_transport(backend: str) -> str:
    """How expert-parallel dispatch moves rows: `ragged` (jax.lax.ragged_all_to_all, exactly the routed rows) on
    GPU/TPU; `padded` (its emulation with a fixed-size all_to_all) on CPU, which cannot run ragged_all_to_all
    (XLA:CPU, jax 0.10.2)."""
    return "padded" if backend == "cpu" else "ragged"


def _moe_dispatch(cfg: ModelConfig) -> str:
    """The concrete MoE dispatch. `ragged` everywhere, decided by measurement: with its grouped GEMM it is the
    fastest dropless dispatch on CPU at 8 to 256 experts (benchmarks/README.md, "Dropless dispatch on CPU after
    the custom-VJP block scan") and the cheapest compiled program on GPU/TPU ("MoE dispatch per backend"). Under
    an FP8 recipe `capacity`: the grouped GEMMs take no dot_general to emulate FP8 with (validate() rejects an
    explicit ragged + fp8)."""
    if cfg.moe_dispatch != "auto":
        return cfg.moe_dispatch
    return "capacity" if cfg.fp8 != "none" else "ragged"


def _grouped_gemm(cfg: ModelConfig, backend: str) -> tuple[str, str | None]:
    """(grouped_gemm, tokamax implementation). `auto`: the tokamax kernel on GPU/TPU (a grouped-matmul custom
    call, forward and backward, 1.00x the useful FLOPs; benchmarks/dispatch_cost.py), `blocks` on CPU, where
    the block scan is the measured fastest (XLA:CPU's ragged_dot is a dense matmul over every group)."""
    choice = cfg.grouped_gemm
    if choice == "auto":
        choice = "blocks" if backend == "cpu" else "kernel"
    if choice != "kernel":
        return choice, None
    return "kernel", {"tpu": "mosaic", "gpu": "triton", "cpu": "xla"}[backend]


def _attention(cfg: ModelConfig, backend: str) -> tuple[str, str | None]:
    """(attention, tokamax implementation). `auto` is the fused kernel on TPU/GPU (one MLA layer of the 671B
    preset at 4K tokens, projections included, forward + backward in bf16: 1.46 GiB of temporaries with splash
    on v5p and 1.15 GiB with tokamax Triton on H100, against 16.96 / 24.39 GiB for XLA;
    benchmarks/attention_memory.py) and XLA on CPU (`chunked` when model.attention_chunk is set). On TPU splash,
    not tokamax's Mosaic TPU kernel, whose backward does not stay fused for MLA's 192/128 head dims (16.9 GiB
    for the attention core). On GPU Triton, not Mosaic GPU: the two cores compile to the same 0.13 GiB, and
    Triton also runs on pre-Hopper GPUs; cuDNN refuses head dim 192."""
    choice = cfg.attention_impl
    if choice == "auto":
        choice = ("chunked" if cfg.attention_chunk else "xla") if backend == "cpu" else "flash"
    if choice != "flash":
        return choice, None
    if backend == "gpu":
        return "tokamax", "triton"
    return "splash", None  # TPU; on CPU the same kernel in interpret mode


def choose(cfg: ModelConfig, backend: str, mesh: MeshFacts | None = None, n_tokens: int | None = None,
           ) -> Implementation:
    """Every implementation choice of `cfg` on `backend` under `mesh` (None: one device). `n_tokens`, the
    routed tokens of one call, decides whether the expert-parallel exchange applies (the token axes must divide
    them; one sequence while generating may not); None assumes they do."""
    backend = normalise_backend(backend)
    mesh = mesh or MeshFacts()
    dispatch = _moe_dispatch(cfg)
    grouped_gemm, gemm_kernel = _grouped_gemm(cfg, backend)
    # Ragged's exchange (moe_ragged.ragged_experts_ep) moves only routed rows to each expert shard; `blocked`
    # takes it too, except under FP8 (the block GEMMs of the exchange path take no dot_general), where GSPMD
    # shards the program as written.
    exchanges = dispatch == "ragged" or (dispatch == "blocked" and cfg.fp8 == "none")
    splits_tokens = (mesh.devices > 1 and mesh.experts_split_tokens
                     and (n_tokens is None or n_tokens % mesh.token_shards == 0))
    if exchanges and splits_tokens:
        exchange = exchange_transport(backend)
    else:
        exchange = "none" if mesh.devices == 1 else "gspmd"
    if dispatch == "blocked" and exchange in ("ragged", "padded"):
        grouped_gemm, gemm_kernel = "blocks", None  # the same block-padded GEMM on each shard's own experts
    # Few experts per choice (E <= 4K, e.g. the small preset, or decoding): E x N slots are cheap, no spill.
    spill = (dispatch == "capacity" and cfg.capacity_factor is None and cfg.fp8 == "none"
             and cfg.n_routed_experts > 4 * cfg.num_experts_per_tok and mesh.devices == 1)
    attention, attention_kernel = _attention(cfg, backend)
    loss = _loss(cfg, backend)
    # Decode and verify steps see 1-2 tokens per row, where `blocked` pads every expert to a block (measured on
    # runs/small, CPU: plain / verify step 10.1 / 21.0 ms blocked, 8.5 / 15.3 ms capacity).
    decode_dispatch = "capacity" if backend == "cpu" else "ragged"
    return Implementation(
        backend=backend, moe_dispatch=dispatch, grouped_gemm=grouped_gemm, gemm_kernel=gemm_kernel,
        exchange=exchange, capacity_spill=spill, attention=attention,
        attention_kernel=attention_kernel,
        attention_chunk=cfg.attention_chunk if attention == "chunked" else None,
        interpret=backend == "cpu", loss=loss, loss_chunk=LOSS_CHUNK_POSITIONS if loss == "chunked" else None,
        block_rows=GROUP_BLOCK_ROWS,
        decode_dispatch=decode_dispatch)


def _loss(cfg: ModelConfig, backend: str) -> str:
    """The LM head's training loss. `auto`: `chunked` on GPU/TPU, where V3's logits dominate the head's memory
    (the main and MTP heads at 129,280 words, forward + backward, bf16: one 4K sequence per device 3.76 / 5.67
    GiB of temporaries through XLA on H100 / v5p, 2.19 / 2.18 GiB chunked; four sequences 17.5 / 10.1 against
    3.59 / 3.53 GiB; tokamax's fused Mosaic TPU loss 5.18 GiB either way; benchmarks/loss_memory.py), for one
    more head GEMM (1.33x the head's FLOPs); `xla` on CPU, whose small vocabularies make the chunked scan pure
    overhead and whose training curve stays as it was."""
    if cfg.loss_impl != "auto":
        return cfg.loss_impl
    return "xla" if backend == "cpu" else "chunked"
