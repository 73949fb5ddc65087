"""Per-backend policy: what the `auto` settings become on a backend (one function per choice, each decided
by measurement; benchmarks/README.md). The MoE layer, `plan` and `compile` ask here.
"""

from __future__ import annotations

from dsv3_jax.config import ModelConfig


def resolve_moe_dispatch(dispatch: str, backend: str | None = None, fp8: str = "none") -> str:
    """The concrete dispatch for `dispatch` on `backend` (default: JAX's default backend).

    `ragged` everywhere, decided by measurement: with its default `blocks` grouped GEMM it is the fastest
    dropless dispatch on CPU at 8 to 256 experts (benchmarks/README.md, "Dropless dispatch on CPU after the
    custom-VJP block scan"), and on GPU/TPU (compiled costs, "MoE dispatch per backend"); CPU meshes exchange
    rows with the padded emulation of ragged_all_to_all, which XLA:CPU cannot run. Under an FP8 recipe `auto` is
    `capacity` everywhere: the block GEMMs take no dot_general to emulate FP8 with (validate() rejects an
    explicit ragged + fp8).
    """
    del backend  # the same answer on every backend today; the argument lets a future measurement differ
    if dispatch != "auto":
        return dispatch
    return "capacity" if fp8 != "none" else "ragged"


def resolve_grouped_gemm(grouped_gemm: str, backend: str | None = None) -> str:
    """The concrete grouped GEMM of `ragged` dispatch on `backend` (default: JAX's default backend).

    `blocks` on every backend, decided from the compiled programs of a 64-expert top-8 training step
    (forward and backward; benchmarks/README.md, "MoE dispatch per backend"): XLA 0.10.2 compiles
    `ragged_dot` on GPU (and CPU) into one dense matmul over every group with a masked, expanded input (63x the
    useful FLOPs on an H100); on TPU its forward is a true grouped-matmul kernel (1.00x) but its weight
    gradient a dense masked convolution over every group (21.8x for the whole step on v5p). `blocks` compiles
    to ~1.25x on both. The backend stays an argument so that a future XLA can change one answer.
    """
    if grouped_gemm != "auto":
        return grouped_gemm
    del backend  # same answer everywhere today (see above)
    return "blocks"


def resolve_for_backend(cfg: ModelConfig, backend: str) -> ModelConfig:
    """`cfg` with its per-backend choices (`moe_dispatch`, `grouped_gemm` = auto) decided for `backend`, as a
    run on that backend would decide them: for compiling on one host for another (dsv3_jax/aot.py)."""
    return cfg.replace(moe_dispatch=resolve_moe_dispatch(cfg.moe_dispatch, backend, cfg.fp8),
                       grouped_gemm=resolve_grouped_gemm(cfg.grouped_gemm, backend))
