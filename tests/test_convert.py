"""HF safetensors import/export: exact round trips, FP8 block quantisation, malformed checkpoints."""

from __future__ import annotations

import json
import math
import re
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from dsv3_jax import ConfigError, get_preset, init_model
from dsv3_jax.convert import (EXPERTS, FP8, CheckpointError, dequantize_blockwise, from_hf, hf_name,
                              quantize_blockwise, to_hf)
from dsv3_jax import layout
from dsv3_jax.moe import RouterBias
from dsv3_jax import hf_config
from tolerances import F32_EPS, assert_close_f32

TINY = get_preset("tiny")
IDS = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 9)))


def _model(cfg=TINY, seed=0):
    """A model whose router biases are random and nonzero, so a dropped or misplaced bias shows."""
    model = init_model(cfg, seed)
    rng = np.random.default_rng(seed + 100)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        if isinstance(var, RouterBias):
            var.set_value(jnp.asarray(rng.normal(0, 0.1, var.get_value().shape), jnp.float32))
    return model


def _params(model):
    return {".".join(map(str, p)): (type(v), np.asarray(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k][0] is pb[k][0], k
        assert pa[k][1].dtype == pb[k][1].dtype, k
        np.testing.assert_array_equal(pa[k][1], pb[k][1], err_msg=k)


def _outputs(model):
    """Main and MTP logits (eager: after the first model, cheaper than one jit compile per configuration)."""
    logits, aux = model(IDS)
    return [np.asarray(logits)] + [np.asarray(x) for x in aux.mtp_logits]


def _tensors(path):
    """{name: (safetensors dtype, shape)} of every tensor under a checkpoint directory."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (s.get_dtype(), tuple(s.get_shape()))
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """(model, fp32 single-file export of it)."""
    model = _model()
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    to_hf(model, path, dtype="float32")
    return model, path


def _copy_ckpt(src, dst, edit=None, config_edit=None):
    """Copy an unsharded fp32 checkpoint, letting `edit` change its tensor dict and `config_edit` its config."""
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ---- round trips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None, "n_shared_experts": 0},
                                     {"n_shared_experts": 2, "num_nextn_predict_layers": 2},
                                     {"num_nextn_predict_layers": 0, "first_k_dense_replace": 0}],
                         ids=["tiny", "direct_q_no_shared", "two_shared_mtp2", "mtp0_all_moe"])
def test_round_trip_fp32_is_exact(tmp_path, changes):
    cfg = TINY.replace(**changes)
    model = _model(cfg, seed=3)
    to_hf(model, tmp_path, dtype="float32")
    cfg2, model2 = from_hf(tmp_path)
    assert cfg2 == cfg
    _assert_same_params(model, model2)
    for a, b in zip(_outputs(model), _outputs(model2), strict=True):
        np.testing.assert_array_equal(a, b)
    names = _tensors(tmp_path)
    L = cfg.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert names["model.layers.1.mlp.gate.e_score_correction_bias"] == ("F32", (cfg.n_routed_experts,))
    assert names["model.layers.0.self_attn.o_proj.weight"][1] == (cfg.hidden_size, cfg.num_attention_heads * cfg.v_head_dim)
    for k in range(cfg.mtp_depth):  # MTP at L+k with copies of the shared embedding and head
        assert names[f"model.layers.{L + k}.eh_proj.weight"][1] == (cfg.hidden_size, 2 * cfg.hidden_size)
        assert names[f"model.layers.{L + k}.embed_tokens.weight"][1] == (cfg.vocab_size, cfg.hidden_size)
        assert names[f"model.layers.{L + k}.shared_head.head.weight"][1] == (cfg.vocab_size, cfg.hidden_size)
    assert not any(n.startswith(f"model.layers.{L + cfg.mtp_depth}.") for n in names)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == cfg.mtp_depth and "quantization_config" not in config


def test_mtp_copies_equal_main_tensors(tiny_ckpt):
    _, path = tiny_ckpt
    t = load_file(str(path / "model.safetensors"))
    np.testing.assert_array_equal(t["model.layers.3.embed_tokens.weight"], t["model.embed_tokens.weight"])
    np.testing.assert_array_equal(t["model.layers.3.shared_head.head.weight"], t["lm_head.weight"])


def test_sharded_export_with_index(tmp_path):
    model = _model(seed=5)
    to_hf(model, tmp_path, dtype="float32", max_shard_bytes=40_000)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    tensors = _tensors(tmp_path)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(4 * math.prod(s) for _, s in tensors.values())
    for shard in shards:  # only a tensor larger than the limit may overflow a shard on its own
        assert shard.stat().st_size < 40_000 + 20_000
    cfg2, model2 = from_hf(tmp_path)
    _assert_same_params(model, model2)


def test_bf16_export(tmp_path):
    model = _model(seed=7)
    to_hf(model, tmp_path)  # default bfloat16
    dtypes = {n: d for n, (d, _) in _tensors(tmp_path).items()}
    assert dtypes.pop("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
    assert set(d for n, d in dtypes.items() if "e_score_correction_bias" not in n) == {"BF16"}
    cfg2, model2 = from_hf(tmp_path)  # bf16 files -> fp32 params, exactly the bf16-rounded values
    for k, (_, a) in _params(model).items():
        b = _params(model2)[k][1]
        expected = a if "gate.bias" in k else a.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(b, expected, err_msg=k)
    for a, b in zip(_outputs(model), _outputs(model2), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)
    cfg3, model3 = from_hf(tmp_path, jnp.bfloat16)
    assert cfg3.param_dtype == cfg3.dtype == "bfloat16"
    assert model3.lm_head.kernel.get_value().dtype == jnp.bfloat16
    assert model3.moe_layers.mlp.gate.bias.get_value().dtype == jnp.float32
    cfg4, _ = from_hf(tmp_path, jnp.float32, compute_dtype=jnp.bfloat16)
    assert (cfg4.param_dtype, cfg4.dtype) == ("float32", "bfloat16")


def test_refuses_to_overwrite(tmp_path):
    model = _model()
    to_hf(model, tmp_path, dtype="float32", max_shard_bytes=40_000)
    with pytest.raises(FileExistsError):
        to_hf(model, tmp_path, dtype="float32")
    to_hf(model, tmp_path, dtype="float32", overwrite=True)  # stale shards and index are removed
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    from_hf(tmp_path)


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None}, {"num_nextn_predict_layers": 2},
                                     {"scan_layers": False}])
def test_name_table_is_one_to_one(changes):
    cfg = TINY.replace(**changes)
    model = nnx.eval_shape(lambda: init_model(cfg))
    names = []
    for slot in layout.layer_slots(model):  # scanned stacks: one slot per layer, named as in the unrolled layout
        name, kind = hf_name(slot.leaf, cfg)
        names += [name.replace("{j}", str(j)) for j in range(cfg.n_routed_experts)] if kind == EXPERTS else [name]
    assert len(names) == len(set(names))
    with pytest.raises(KeyError, match="no HF name"):
        hf_name("layers.0.self_attn.nonsense.kernel", cfg)


# ---- FP8 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((576, 192), (128, 128)), ((20, 33), (8, 16))])
def test_quantize_blockwise_error_bounds(shape, block):
    rng = np.random.default_rng(shape[0])
    w = rng.normal(0, 1, shape).astype(np.float32) * rng.lognormal(0, 2, (shape[0], 1)).astype(np.float32)
    w[: block[0], : block[1]] = 0.0  # an all-zero block must not divide by zero
    q, scale_inv = quantize_blockwise(w, block)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    assert q.dtype == ml_dtypes.float8_e4m3fn and q.shape == shape
    assert scale_inv.dtype == np.float32 and scale_inv.shape == grid
    deq = dequantize_blockwise(q, scale_inv, block)
    assert deq.dtype == np.float32 and np.all(np.isfinite(deq))
    for bi in range(grid[0]):
        for bj in range(grid[1]):
            sl = (slice(bi * block[0], (bi + 1) * block[0]), slice(bj * block[1], (bj + 1) * block[1]))
            wb, db, s = w[sl], deq[sl], scale_inv[bi, bj]
            amax = np.abs(wb).max()  # a partial edge block is scaled by its own (cropped) contents
            # the same correctly rounded float32 quotient (1 ulp of slack for a reciprocal-and-multiply)
            assert s == pytest.approx(amax / 448 if amax > 0 else 1.0, rel=F32_EPS)
            # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormal spacing 2^-9 -> absolute <= s * 2^-10;
            # plus float32's roundings of w / s and q * s (1/2 ulp of |w| each)
            bound = np.abs(wb) * (2.0**-4 + 2 * F32_EPS) + s * 2.0**-10
            assert np.all(np.abs(db - wb) <= bound)
            if amax > 0:
                at = np.unravel_index(np.abs(wb).argmax(), wb.shape)
                # the block max maps to exactly +-448: 448 * s is |w| up to the roundings of s and of the product
                assert db[at] == pytest.approx(wb[at], rel=F32_EPS)
    np.testing.assert_array_equal(deq[: block[0], : block[1]], 0.0)


def test_dequantize_blockwise_by_hand():
    q = np.ones((3, 5), ml_dtypes.float8_e4m3fn)
    scale = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    expected = np.array([[1, 1, 2, 2, 3], [1, 1, 2, 2, 3], [4, 4, 5, 5, 6]], np.float32)
    np.testing.assert_array_equal(dequantize_blockwise(q, scale, (2, 2)), expected)
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_blockwise(q, scale[:, :2], (2, 2))


def _dequantised_reference(model, block):
    """The model with every FP8-quantised weight replaced by dequantise(quantise(W)), in the HF [out, in] layout."""
    cfg = model.cfg
    for slot in layout.layer_slots(model):  # per layer of a scanned stack
        _, kind = hf_name(slot.leaf, cfg)
        whole = np.array(slot.var.get_value())
        w = whole if slot.index is None else whole[slot.index]
        if kind == FP8:
            w[...] = dequantize_blockwise(*quantize_blockwise(w.T, block), block).T
        elif kind == EXPERTS:
            w[...] = np.stack([dequantize_blockwise(*quantize_blockwise(e.T, block), block).T for e in w])
        slot.var.set_value(jnp.asarray(whole))
    return model


@pytest.mark.parametrize("block", [(128, 128), (16, 8)])
def test_fp8_export_import(tmp_path, block):
    model = _model(seed=11)
    to_hf(model, tmp_path, fp8=True, block=block)  # unquantised tensors in bf16, as the official checkpoint
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": list(block)}
    tensors = _tensors(tmp_path)
    quantised = {n for n, (d, _) in tensors.items() if d == "F8_E4M3"}
    for name in quantised:
        rows, cols = tensors[name][1]
        assert tensors[name + "_scale_inv"] == ("F32", (math.ceil(rows / block[0]), math.ceil(cols / block[1])))
    assert {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.3.mlp.experts.5.up_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight",
            "model.layers.3.self_attn.q_b_proj.weight"} <= quantised
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight",
                 "model.layers.3.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert tensors[name][0] == "BF16", name
    assert tensors["model.layers.2.mlp.gate.e_score_correction_bias"][0] == "F32"
    # Exactly what the official checkpoint quantises: every self_attn / mlp projection, not the router.
    expected = {n for n in tensors if re.search(r"_proj(_with_mqa)?\.weight$", n) and (".self_attn." in n or ".mlp." in n)}
    assert quantised == expected

    # With fp32 for the unquantised tensors, the import equals the model with dequantised FP8 weights.
    to_hf(model, tmp_path / "f32", fp8=True, dtype="float32", block=block)
    _, imported = from_hf(tmp_path / "f32")
    reference = _dequantised_reference(_model(seed=11), block)
    _assert_same_params(reference, imported)
    for a, b in zip(_outputs(reference), _outputs(imported), strict=True):
        assert_close_f32(b, a)  # same weights, same program: bit-identical in practice (as the fp32 round trip)
    # and the bf16 variant is that model with its unquantised weights rounded to bf16
    _, imported_bf16 = from_hf(tmp_path)
    for k, (_, a) in _params(reference).items():
        _, kind = hf_name(re.sub(r"^(dense|moe)_layers\.", "layers.0.", k), TINY)  # kinds do not depend on the layer
        b = _params(imported_bf16)[k][1]
        if kind not in (FP8, EXPERTS) and "gate.bias" not in k:
            a = a.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_fp8_import_of_hand_quantised_checkpoint(tiny_ckpt, tmp_path):
    """An FP8 file written by another tool (safetensors' own writer) imports to the dequantised weights."""
    model, path = tiny_ckpt
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"

    def quantise(t):
        t[name], t[name + "_scale_inv"] = quantize_blockwise(t[name], (8, 8))

    dst = _copy_ckpt(path, tmp_path / "q", quantise,
                     lambda c: c.update(quantization_config={"quant_method": "fp8", "weight_block_size": [8, 8]}))
    _, imported = from_hf(dst)
    # layer 1 is the first MoE layer: row 0 of the scanned MoE stack
    w = np.asarray(model.moe_layers.self_attn.kv_a_proj_with_mqa.kernel.get_value()[0]).T
    expected = dequantize_blockwise(*quantize_blockwise(w, (8, 8)), (8, 8)).T
    np.testing.assert_array_equal(np.asarray(imported.moe_layers.self_attn.kv_a_proj_with_mqa.kernel.get_value()[0]),
                                  expected)


@pytest.mark.parametrize("source_scanned", [True, False], ids=["scanned_to_unrolled", "unrolled_to_scanned"])
def test_round_trip_across_layouts(tmp_path, source_scanned):
    """A checkpoint exported from one layout imports into the other with the same outputs and re-exports to
    identical tensors: the per-layer names and values do not depend on the layout."""
    source = _model(TINY.replace(scan_layers=source_scanned), seed=3)
    to_hf(source, tmp_path / "a", dtype="float32")
    _, other = from_hf(tmp_path / "a", scan_layers=not source_scanned)
    assert other.cfg.scan_layers is (not source_scanned)
    assert hasattr(other, "layers") is source_scanned
    for a, b in zip(_outputs(source), _outputs(other), strict=True):
        assert_close_f32(a, b, atol_ulps=16)
    to_hf(other, tmp_path / "b", dtype="float32")
    ta, tb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


# ---- malformed checkpoints -----------------------------------------------------------------------------------
def _drop(name):
    return lambda t: t.pop(name)


@pytest.mark.parametrize("edit,match", [
    (_drop("model.layers.2.self_attn.o_proj.weight"), "missing tensor 'model.layers.2.self_attn.o_proj.weight'"),
    (_drop("model.layers.1.mlp.experts.6.up_proj.weight"), "missing tensor 'model.layers.1.mlp.experts.6.up_proj"),
    (_drop("model.layers.1.mlp.gate.e_score_correction_bias"), "e_score_correction_bias"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
     r"unexpected tensors in checkpoint \(1\): 'model.layers.0.mlp.extra.weight'"),
    (lambda t: t.update({"model.layers.9.input_layernorm.weight": np.zeros(32, np.float32)}),
     "unexpected tensors.*model.layers.9.input_layernorm.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": np.zeros((16, 32), np.float32)}),
     r"'model.layers.0.self_attn.o_proj.weight' has shape \[16, 32\], expected \[32, 16\]"),
    (lambda t: t.update({"model.layers.2.mlp.experts.0.down_proj.weight": np.zeros((32, 15), np.float32)}),
     r"'model.layers.2.mlp.experts.0.down_proj.weight' has shape \[32, 15\], expected \[32, 16\]"),
    (lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": np.zeros((32, 16), np.int32)}),
     "'model.layers.0.self_attn.kv_b_proj.weight' has unsupported dtype I32"),
    (lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight":
                         t["model.layers.0.self_attn.kv_b_proj.weight"].astype(ml_dtypes.float8_e4m3fn)}),
     "FP8 tensor 'model.layers.0.self_attn.kv_b_proj.weight' has no 'model.layers.0.self_attn.kv_b_proj.weight_scale_inv'"),
    (lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight":
                         t["model.layers.0.self_attn.kv_b_proj.weight"].astype(ml_dtypes.float8_e4m3fn),
                         "model.layers.0.self_attn.kv_b_proj.weight_scale_inv": np.ones((2, 1), np.float32)}),
     r"'model.layers.0.self_attn.kv_b_proj.weight_scale_inv' has shape \[2, 1\], expected \[1, 1\]"),
    (lambda t: t.update({"model.layers.1.mlp.gate.weight":
                         t["model.layers.1.mlp.gate.weight"].astype(ml_dtypes.float8_e4m3fn),
                         "model.layers.1.mlp.gate.weight_scale_inv": np.ones((1, 1), np.float32)}),
     "'model.layers.1.mlp.gate.weight' is stored as F8_E4M3, but this tensor is never block-quantised"),
], ids=["missing", "missing_expert", "missing_bias", "extra", "extra_layer", "wrong_shape", "wrong_expert_shape",
        "int_dtype", "fp8_without_scale", "wrong_scale_shape", "fp8_router"])
def test_malformed_tensors(tiny_ckpt, tmp_path, edit, match):
    _, path = tiny_ckpt
    with pytest.raises(CheckpointError, match=match):
        from_hf(_copy_ckpt(path, tmp_path / "bad", edit))


def test_ignorable_tensors_are_ignored(tiny_ckpt, tmp_path):
    model, path = tiny_ckpt
    dst = _copy_ckpt(path, tmp_path / "ok", lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32)}))
    _assert_same_params(model, from_hf(dst)[1])


def test_index_pointing_to_missing_shard(tmp_path):
    to_hf(_model(), tmp_path, dtype="float32", max_shard_bytes=40_000)
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{victim.name}', which does not exist"):
        from_hf(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    to_hf(_model(), tmp_path, dtype="float32", max_shard_bytes=40_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = sorted(tmp_path.glob("*.safetensors"))[0].name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.layers.0.ghost.weight' is listed"):
        from_hf(tmp_path)


def test_unindexed_shards_are_scanned(tiny_ckpt, tmp_path):
    model, path = tiny_ckpt
    tensors = load_file(str(path / "model.safetensors"))
    dst = tmp_path / "two"
    dst.mkdir()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, str(dst / "a.safetensors"))
    save_file({k: tensors[k] for k in names[1::2]}, str(dst / "b.safetensors"))
    (dst / "config.json").write_text((path / "config.json").read_text())
    _assert_same_params(model, from_hf(dst)[1])
    save_file({names[0]: tensors[names[0]]}, str(dst / "c.safetensors"))
    with pytest.raises(CheckpointError, match=f"'{names[0]}' appears in both"):
        from_hf(dst)


def test_empty_and_missing_directories(tmp_path):
    with pytest.raises(CheckpointError, match="missing config.json"):
        from_hf(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        from_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(hf_config.to_hf(TINY)))
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files"):
        from_hf(tmp_path)


def test_bad_config_fails_before_tensors_are_read(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf_config.to_hf(TINY), "topk_group": 9}))
    with pytest.raises(ConfigError, match="topk_group"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config.to_hf(TINY)))
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        from_hf(tmp_path)


def test_checkpoint_without_mtp_layers(tmp_path):
    """transformers' save_pretrained drops the MTP layer although config.json still counts it."""
    model = _model(TINY.replace(num_nextn_predict_layers=0))
    to_hf(model, tmp_path, dtype="float32")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.3.*num_nextn_predict_layers=0"):
        from_hf(tmp_path)
    cfg, loaded = from_hf(tmp_path, num_nextn_predict_layers=0)
    _assert_same_params(model, loaded)


def test_mtp_layers_can_be_dropped_on_import(tiny_ckpt):
    model, path = tiny_ckpt
    cfg, loaded = from_hf(path, num_nextn_predict_layers=0)
    assert cfg.mtp_depth == 0 and len(loaded.mtp) == 0
    np.testing.assert_array_equal(_outputs(model)[0], _outputs(loaded)[0])


@pytest.mark.parametrize("copy", ["embed_tokens.weight", "shared_head.head.weight"])
def test_mtp_copy_mismatch_warns(tiny_ckpt, tmp_path, copy):
    model, path = tiny_ckpt
    name = f"model.layers.3.{copy}"
    dst = _copy_ckpt(path, tmp_path / "bad", lambda t: t.update({name: t[name] + 1.0}))
    with pytest.warns(UserWarning, match=name.replace(".", r"\.")):
        _, loaded = from_hf(dst)
    _assert_same_params(model, loaded)  # the main tensors are used


def test_matching_mtp_copies_do_not_warn(tiny_ckpt):
    _, path = tiny_ckpt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_hf(path)


def test_mtp_copies_may_be_omitted(tiny_ckpt, tmp_path):
    model, path = tiny_ckpt
    dst = _copy_ckpt(path, tmp_path / "nocopies", lambda t: [t.pop(f"model.layers.3.{c}")
                                                             for c in ("embed_tokens.weight", "shared_head.head.weight")])
    _assert_same_params(model, from_hf(dst)[1])


def test_shard_tensors_outside_the_index(tmp_path):
    """A listed shard's tensor that the index omits is still read if needed, and reported if unused."""
    model = _model()
    to_hf(model, tmp_path, dtype="float32", max_shard_bytes=40_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.gate.weight"]
    index_path.write_text(json.dumps(index))
    _assert_same_params(model, from_hf(tmp_path)[1])
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    save_file({**tensors, "model.layers.0.stray.weight": np.ones(2, np.float32)}, str(shard), {"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensors.*'model.layers.0.stray.weight'"):
        from_hf(tmp_path)


def test_truncated_file(tiny_ckpt, tmp_path):
    _, path = tiny_ckpt
    dst = _copy_ckpt(path, tmp_path / "cut")
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="lies outside the file"):
        from_hf(dst)
