"""backend_policy.choose: every per-backend implementation choice, pinned per backend and mesh."""

import pytest

from dsv3_jax.backend_policy import GROUP_BLOCK_ROWS, MeshFacts, choose, current_backend, normalise_backend
from dsv3_jax.config import ConfigError, get_preset

V3 = get_preset("deepseek-v3-671b")
SMALL = get_preset("small")
EP = MeshFacts(devices=8, token_shards=8, experts_split_tokens=True)


@pytest.mark.parametrize("backend, expected", [
    ("cpu", dict(moe_dispatch="ragged", grouped_gemm="blocks", gemm_kernel=None, attention="xla",
                 attention_kernel=None, interpret=True, decode_dispatch="capacity", loss="xla", loss_chunk=None)),
    ("gpu", dict(moe_dispatch="ragged", grouped_gemm="kernel", gemm_kernel="triton", attention="tokamax",
                 attention_kernel="triton", interpret=False, decode_dispatch="ragged", loss="chunked",
                 loss_chunk=512)),
    ("tpu", dict(moe_dispatch="ragged", grouped_gemm="kernel", gemm_kernel="mosaic", attention="splash",
                 attention_kernel=None, interpret=False, decode_dispatch="ragged", loss="chunked",
                 loss_chunk=512)),
])
def test_auto_choices_per_backend_are_pinned(backend, expected):
    """What `auto` becomes on each backend (the measurements behind each are in backend_policy's docstrings)."""
    impl = choose(V3, backend)
    assert {k: getattr(impl, k) for k in expected} == expected
    assert impl.exchange == "none" and impl.block_rows == GROUP_BLOCK_ROWS == 128


@pytest.mark.parametrize("backend, exchange", [("cpu", "padded"), ("gpu", "ragged"), ("tpu", "ragged")])
def test_expert_parallel_exchange_per_backend(backend, exchange):
    impl = choose(V3, backend, EP)
    assert impl.exchange == exchange and impl.expert_parallel
    # tokens the token axes cannot divide (one sequence while generating) run unsplit: GSPMD shards them
    assert choose(V3, backend, EP, n_tokens=3).exchange == "gspmd"
    # experts not split over a token axis: nothing for the exchange to use
    assert choose(V3, backend, MeshFacts(devices=8, token_shards=1)).exchange == "gspmd"


def test_explicit_choices_are_never_overridden():
    cfg = V3.replace(moe_dispatch="blocked", grouped_gemm="ragged_dot", attention_impl="xla")
    for backend in ("cpu", "gpu", "tpu"):
        impl = choose(cfg, backend)
        assert (impl.moe_dispatch, impl.grouped_gemm, impl.attention) == ("blocked", "ragged_dot", "xla")
    # blocked under expert parallelism: the block GEMM on each shard's own experts after ragged's exchange
    assert choose(cfg, "tpu", EP).grouped_gemm == "blocks"
    # flash on CPU: splash through its interpreter (how the suite checks the kernel call sites)
    flash_cpu = choose(V3.replace(attention_impl="flash"), "cpu")
    assert (flash_cpu.attention, flash_cpu.interpret) == ("splash", True)
    assert choose(V3.replace(grouped_gemm="kernel"), "cpu").gemm_kernel == "xla"


def test_chunked_attention_and_fp8():
    chunked = V3.replace(attention_chunk=512)
    assert (choose(chunked, "cpu").attention, choose(chunked, "cpu").attention_chunk) == ("chunked", 512)
    assert choose(chunked, "tpu").attention == "splash"  # auto prefers the kernel where there is one
    assert choose(chunked.replace(attention_impl="chunked"), "tpu").attention == "chunked"
    with pytest.raises(ConfigError, match="attention_impl"):
        V3.replace(attention_impl="chunked").validate()
    fp8 = V3.replace(fp8="deepseek")
    assert choose(fp8, "gpu").moe_dispatch == "capacity"  # the grouped GEMMs have no FP8 emulation
    assert choose(fp8, "gpu", EP).exchange == "gspmd"


def test_capacity_spill_only_dropless_on_one_device_with_many_experts():
    cap = V3.replace(moe_dispatch="capacity")
    assert choose(cap, "cpu").capacity_spill
    assert not choose(cap, "cpu", EP).capacity_spill
    assert not choose(cap.replace(capacity_factor=1.25), "cpu").capacity_spill
    assert not choose(SMALL.replace(moe_dispatch="capacity"), "cpu").capacity_spill  # 16 experts, top-4


def test_backend_names():
    assert normalise_backend("cuda") == "gpu" and normalise_backend("tpu") == "tpu"
    with pytest.raises(ValueError, match="unknown backend"):
        normalise_backend("metal")
    assert current_backend() == "cpu"
