"""Cached decoding against teacher forcing (random-init and HF fixtures), absorbed vs expanded attention,
speculative decoding against plain greedy, sampling rules, cache sizes and request validation.

MoE dispatch in the equality tests is dropless (`dense`, or `capacity`/`blocked` without a capacity factor):
with a capacity factor, which tokens are dropped depends on how many tokens share a call (the whole sequence
in teacher forcing, one or two per row while decoding), so the two would legitimately differ.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import convert
from dsv3_jax.config import PRESETS
from dsv3_jax.generate import GenerationError, Generator, bucket, check_request, with_dispatch
from dsv3_jax.kv_cache import (LatentEntries, cache_numbers_per_token, expanded_cache_bytes_per_token, init_cache,
                               latent_cache_bytes_per_token)
from dsv3_jax.loading import load_run
from dsv3_jax.mla import MLA
from dsv3_jax.model import init_model
from dsv3_jax.sampling import Sampling, SamplingError, filtered_logits, probabilities, speculative_accept
from tolerances import F32_EPS, assert_close_f32

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
TINY = PRESETS["tiny"]
# Cached decoding computes every layer in another grouping than the full forward (one query row at a time over
# the cache, absorbed attention reassociating W_uk / W_uv with the kv_lora_rank latent, right-padded prefill):
# the same float32 sums in other orders, through 3-4 layers and the MTP block. Each stage differs by a few ulps
# of its terms (about the logits' magnitude), so the logits differ by tens of ulps of max |logit| at most
# (measured up to 16, MTP of fp8_blocks). Any cache, position or mask bug is O(0.1) or more.
DECODE_ULPS = 64
# Our forward against transformers' (PyTorch eager, float32) on the committed fixtures: two implementations,
# every reduction in its own order, as above (test_parity_hf: measured up to 14 ulps of max |logit|).
HF_ULPS = 64


def _teacher_forced_errors(model, ids_BT: np.ndarray, prompt_lengths: list[int], kind: str) -> tuple[float, float]:
    """Max |logit difference| of main and MTP logits between one full forward and prefill + token-by-token
    decoding (rows with different prompt lengths, so positions and masks differ per row), each in float32 ulps
    of the largest full-forward logit (|difference| / (eps * max |logit|))."""
    ref_BTV, aux = model(jnp.asarray(ids_BT))
    ref_BTV, ref_mtp = np.asarray(ref_BTV), np.asarray(aux.mtp_logits[0])
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    batch, seq_len = ids_BT.shape

    @jax.jit
    def prefill(state, ids_BP, lengths_B, cache, mtp_cache):
        m = nnx.merge(graphdef, state)
        final_BPD, cache = m.prefill(ids_BP, lengths_B, cache)
        head_in, mtp_cache = m.mtp_prefill(final_BPD, ids_BP, lengths_B, mtp_cache)
        return m.head(final_BPD), m.head(head_in), final_BPD, cache, mtp_cache

    @jax.jit
    def step(state, tok_B1, h_prev_B1D, cache, mtp_cache):
        m = nnx.merge(graphdef, state)
        final_B1D, cache = m.decode(tok_B1, cache)
        head_in, mtp_cache = m.mtp_decode(h_prev_B1D, tok_B1, mtp_cache)
        return m.head(final_B1D), m.head(head_in), final_B1D, cache, mtp_cache

    lengths = np.array(prompt_lengths, np.int32)
    prefill_len = bucket(int(lengths.max()), 8)
    padded = np.zeros((batch, prefill_len), np.int32)  # right padding; junk ids must not leak into real rows
    for b, n in enumerate(lengths):
        padded[b, :n] = ids_BT[b, :n]
        padded[b, n:] = (np.arange(prefill_len - n) * 7 + 1) % cfg.vocab_size
    capacity = seq_len + 8
    cache = init_cache(cfg, cfg.num_hidden_layers, batch, capacity, kind)
    mtp_cache = init_cache(cfg, 1, batch, capacity, kind)
    logits, mtp_logits, final, cache, mtp_cache = prefill(state, jnp.asarray(padded), jnp.asarray(lengths), cache,
                                                          mtp_cache)
    err = mtp_err = 0.0
    for b, n in enumerate(lengths):
        err = max(err, np.abs(np.asarray(logits)[b, :n] - ref_BTV[b, :n]).max())
        if n > 1:
            mtp_err = max(mtp_err, np.abs(np.asarray(mtp_logits)[b, :n - 1] - ref_mtp[b, :n - 1]).max())
    h_prev = final[jnp.arange(batch), lengths - 1][:, None]
    for j in range(seq_len - int(lengths.min())):
        pos = lengths + j
        tok = ids_BT[np.arange(batch), np.minimum(pos, seq_len - 1)][:, None]  # finished rows: any token
        logits, mtp_logits, h_prev, cache, mtp_cache = step(state, jnp.asarray(tok), h_prev, cache, mtp_cache)
        for b, p in enumerate(pos):
            if p < seq_len:
                err = max(err, np.abs(np.asarray(logits)[b, 0] - ref_BTV[b, p]).max())
                mtp_err = max(mtp_err, np.abs(np.asarray(mtp_logits)[b, 0] - ref_mtp[b, p - 1]).max())
    return float(err / (F32_EPS * np.abs(ref_BTV).max())), float(mtp_err / (F32_EPS * np.abs(ref_mtp).max()))


@pytest.mark.parametrize("kind,dispatch", [("latent", "capacity"), ("latent", "blocked"), ("expanded", "dense")])
def test_cached_decoding_matches_teacher_forcing(kind, dispatch):
    cfg = TINY.replace(init_std=0.1, moe_dispatch=dispatch)
    model = init_model(cfg, seed=1)
    ids = np.asarray(jax.random.randint(jax.random.key(0), (3, 13), 0, cfg.vocab_size))
    err_ulps, mtp_err_ulps = _teacher_forced_errors(model, ids, [5, 1, 9], kind)
    assert err_ulps <= DECODE_ULPS and mtp_err_ulps <= DECODE_ULPS, (err_ulps, mtp_err_ulps)


@pytest.mark.parametrize("name,kind", [("qlora_groups", "latent"), ("directq_yarn", "latent"),
                                       ("yarn_mscale", "latent"), ("fp8_blocks", "latent"),
                                       ("directq_yarn", "expanded")])
def test_hf_fixture_decoding_matches_hf_logits(name, kind):
    """Cached decoding of the imported HF fixtures reproduces HF's own full-forward logits and MTP logits."""
    _, model = convert.from_hf(FIXTURES / name, dtype=jnp.float32, moe_dispatch="dense")
    ref = np.load(FIXTURES / name / "reference.npz")
    ids = ref["input_ids"]
    err_ulps, mtp_err_ulps = _teacher_forced_errors(model, ids, [6, 3], kind)
    assert err_ulps <= DECODE_ULPS and mtp_err_ulps <= DECODE_ULPS, (err_ulps, mtp_err_ulps)
    # and the teacher-forced forward itself is HF's: so decoding matches HF, not just our own forward
    assert_close_f32(model(jnp.asarray(ids))[0], ref["logits"], rtol_ulps=0, atol_ulps=HF_ULPS)


@pytest.mark.parametrize("q_lora", [True, False])
def test_absorbed_attention_equals_expanded(q_lora):
    """One MLA layer: the absorbed path over the latent cache and the expanded per-head K/V path give the same
    output for several new tokens at different per-row positions."""
    cfg = TINY.replace(init_std=0.3) if q_lora else TINY.replace(q_lora_rank=None, rope_scaling=None, init_std=0.3)
    mla = MLA(cfg, nnx.Rngs(params=2))
    rng = np.random.default_rng(0)
    prompt_BTD = jnp.asarray(rng.standard_normal((2, 8, cfg.hidden_size)), jnp.float32)
    new_BTD = jnp.asarray(rng.standard_normal((2, 3, cfg.hidden_size)), jnp.float32)
    positions_BT = jnp.asarray([[8, 9, 10], [4, 5, 6]])  # row 1 treats slots >= 4 of its prompt as junk
    outs = {}
    for kind in ("latent", "expanded"):
        entries = init_cache(cfg, 1, 2, 16, kind).layer(0)
        _, entries = mla.prefill(prompt_BTD, entries)
        outs[kind], _ = mla.decode(new_BTD, positions_BT, entries)
    assert isinstance(init_cache(cfg, 1, 2, 16, "latent").layer(0), LatentEntries)
    # absorbed attention regroups the same products ((q W_uk) . c instead of q . (W_uk c), and likewise for
    # W_uv) over kv_lora_rank = 16 and head dims of 8: a few ulps of max |output| apart (measured 1.5)
    assert_close_f32(outs["latent"], outs["expanded"], atol_ulps=16)
    assert float(jnp.abs(outs["latent"]).max()) > 1e-2  # not trivially zero


def _drafter_friendly_model(seed: int = 0):
    """A random tiny model whose MTP module mostly agrees with the main model: unit-scale embeddings dominate
    the residual stream, and eh_proj passes the next token's embedding through, so the draft for t_{i+2} is
    close to what the main model predicts from t_{i+1}. Attention and experts still perturb both, so some
    drafts are rejected (about half with these settings): both branches of the verify step run."""
    cfg = TINY.replace(init_std=0.1, moe_dispatch="capacity")
    model = init_model(cfg, seed=seed)
    d = cfg.hidden_size
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] / cfg.init_std
    eh = model.mtp[0].eh_proj.kernel[...]
    model.mtp[0].eh_proj.kernel[...] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], 0) + eh
    return model


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9] * 11, [3]]


@pytest.fixture(scope="module")
def friendly_generator():
    return Generator(_drafter_friendly_model())


def test_speculative_greedy_equals_plain_greedy(friendly_generator):
    plain = friendly_generator.generate(PROMPTS, 24)
    spec = friendly_generator.generate(PROMPTS, 24, speculative=True)
    assert spec.tokens == plain.tokens
    assert all(len(t) == 24 for t in plain.tokens)
    assert 0.1 < spec.acceptance_rate < 0.95, spec.acceptance_rate  # both accept and reject paths ran
    assert spec.steps < plain.steps
    # Batch rows are independent: each prompt alone gives the same tokens (per-row positions and masks).
    for prompt, tokens in zip(PROMPTS, plain.tokens):
        assert friendly_generator.generate([prompt], 24).tokens[0] == tokens


def test_decode_dispatch_swaps_only_the_moe_strategy():
    """Prefill runs the model's own dispatch (`blocked` here), steps the decode dispatch: same tokens."""
    model = init_model(TINY.replace(init_std=0.1, moe_dispatch="blocked"), seed=3)
    graphdef, state = nnx.split(model)
    swapped = nnx.merge(with_dispatch(graphdef, state, "dense"), state)
    assert {m.cfg.moe_dispatch for _, m in nnx.iter_graph(swapped) if hasattr(m, "cfg")} == {"dense"}
    assert model.moe_layers.mlp.experts.cfg.moe_dispatch == "blocked"  # the original is untouched
    own = Generator(model, decode_dispatch=None).generate(PROMPTS[:2], 8, speculative=True)
    dense = Generator(model, decode_dispatch="dense").generate(PROMPTS[:2], 8, speculative=True)
    assert own.tokens == dense.tokens


def test_decode_step_compiles_once_per_cache_bucket(friendly_generator):
    g = friendly_generator
    g.generate([[1, 2, 3]], 10)
    compiled, prefills = len(g._executables), g._prefill._cache_size()
    g.generate([[4, 5, 6, 7, 8, 9, 10]], 12)  # another prompt length, same buckets
    assert len(g._executables) == compiled and g._prefill._cache_size() == prefills
    g.generate([[4, 5, 6, 7, 8, 9, 10] * 3], 12)  # a longer prompt: a new prefill bucket, same cache bucket
    assert len(g._executables) == compiled and g._prefill._cache_size() == prefills + 1


def test_stop_tokens_end_rows(friendly_generator):
    g = friendly_generator
    full = g.generate(PROMPTS, 16).tokens
    row0 = full[0]
    cut = next(i for i in range(2, len(row0)) if row0[i] not in row0[:i])
    result = g.generate(PROMPTS, 16, stop_ids=[row0[cut]])
    assert result.tokens[0] == row0[:cut]
    assert result.finish_reasons[0] == "stop"
    for tokens, reference, reason in zip(result.tokens[1:], full[1:], result.finish_reasons[1:]):
        assert tokens == [t for t in reference[:len(tokens)]] and (reason == "length") == (len(tokens) == 16)


def test_seeded_speculative_sampling_is_reproducible(friendly_generator):
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.9)
    a = friendly_generator.generate(PROMPTS, 12, sampling, seed=3, speculative=True)
    b = friendly_generator.generate(PROMPTS, 12, sampling, seed=3, speculative=True)
    c = friendly_generator.generate(PROMPTS, 12, sampling, seed=4, speculative=True)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert 0 < a.acceptance_rate < 1


# ---- sampling rules ----------------------------------------------------------------------------------------

def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda s: np.isfinite(np.asarray(filtered_logits(logits, s)))[0].tolist()  # noqa: E731
    assert kept(Sampling(1.0, top_k=2)) == [True, True, False, False, False]
    assert kept(Sampling(1.0, top_p=0.5)) == [True, False, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(Sampling(1.0, top_p=0.8)) == [True, True, True, False, False]  # 0.7 < 0.8 needs the third
    assert kept(Sampling(1.0, top_k=4, top_p=0.99)) == [True, True, True, True, False]
    np.testing.assert_array_equal(np.asarray(probabilities(logits, Sampling(0.0)))[0], [1, 0, 0, 0, 0])  # one-hot
    sharp = np.asarray(probabilities(logits, Sampling(0.5)))[0]
    squared = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2  # temperature 0.5 squares the probabilities
    # float32 against float64: p rounded to float32 (1/2 ulp, doubled by the square), log's absolute error
    # (~1 ulp of |log p| <= 3, doubled by 1/T, so ~6 ulps relative after exp), exp, the 5-term normalisation and
    # the division: 16 ulps relative (measured 0.5); a wrong temperature is off by tens of percents.
    assert_close_f32(sharp, squared / squared.sum(), rtol_ulps=16, atol_ulps=0)
    for bad in (Sampling(-1.0), Sampling(1.0, top_k=-1), Sampling(1.0, top_p=0.0), Sampling(1.0, top_p=1.5)):
        with pytest.raises(SamplingError):
            bad.validate()


def test_speculative_accept_rule_samples_the_target_distribution():
    """Draft d ~ q, accept with min(1, p/q), else resample from (p - q)+: the emitted token is ~ p."""
    p = np.array([0.5, 0.1, 0.3, 0.1], np.float32)
    q = np.array([0.1, 0.6, 0.1, 0.2], np.float32)
    n = 200_000
    k_draft, k_accept = jax.random.split(jax.random.key(0))
    draft = jax.random.categorical(k_draft, jnp.log(jnp.asarray(q)), shape=(n,))
    accepted, replacement = speculative_accept(k_accept, draft, jnp.broadcast_to(q, (n, 4)),
                                               jnp.broadcast_to(p, (n, 4)), greedy=False)
    emitted = np.where(np.asarray(accepted), np.asarray(draft), np.asarray(replacement))
    np.testing.assert_allclose(np.bincount(emitted, minlength=4) / n, p, atol=5e-3)
    assert abs(np.asarray(accepted).mean() - np.minimum(p, q).sum()) < 5e-3  # acceptance = sum min(p, q)

    one_hot = lambda i: jnp.asarray(np.eye(4, dtype=np.float32)[[i]])  # noqa: E731
    acc, rep = speculative_accept(k_accept, jnp.asarray([2]), one_hot(2), one_hot(2), greedy=True)
    assert bool(acc[0])
    acc, rep = speculative_accept(k_accept, jnp.asarray([2]), one_hot(2), one_hot(1), greedy=True)
    assert not bool(acc[0]) and int(rep[0]) == 1


# ---- cache size ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_bytes_per_token(dtype):
    cfg = TINY
    batch, slots = 3, 40
    cache = init_cache(cfg, cfg.num_hidden_layers, batch, slots, "latent", dtype)
    per_token = sum(a.nbytes for a in cache.entries) / (batch * slots)
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * jnp.dtype(dtype).itemsize
    assert per_token == expected == latent_cache_bytes_per_token(cfg, dtype)
    expanded = init_cache(cfg, cfg.num_hidden_layers, batch, slots, "expanded", dtype)
    assert sum(a.nbytes for a in expanded.entries) / (batch * slots) == expanded_cache_bytes_per_token(cfg, dtype)


def test_671b_cache_figures_without_allocating():
    cfg = PRESETS["deepseek-v3-671b"]
    assert cache_numbers_per_token(cfg) == 576
    assert latent_cache_bytes_per_token(cfg, "bfloat16") == 576 * 61 * 2 == 70_272
    # MHA-style expanded cache: 128 heads x (128 nope + 128 value) + the shared 64-dim rope key, per layer
    assert expanded_cache_bytes_per_token(cfg, "bfloat16") == (128 * 256 + 64) * 61 * 2
    shapes = jax.eval_shape(lambda: init_cache(cfg, cfg.num_hidden_layers, 1, 4096, "latent", "bfloat16"))
    assert sum(np.prod(a.shape) * a.dtype.itemsize for a in shapes.entries) == 4096 * 70_272


# ---- bad requests fail before anything compiles ------------------------------------------------------------

def test_bad_requests_are_refused():
    cfg = TINY
    with pytest.raises(GenerationError, match="no prompt"):
        check_request(cfg, [], 5)
    with pytest.raises(GenerationError, match="empty"):
        check_request(cfg, [[1, 2], []], 5)
    with pytest.raises(GenerationError, match="max_new"):
        check_request(cfg, [[1]], 0)
    with pytest.raises(GenerationError, match="does not fit the cache"):
        check_request(cfg, [[1] * 20], 5, cache_len=20)
    with pytest.raises(GenerationError, match="needs 26 cache slots"):
        check_request(cfg, [[1] * 20], 5, speculative=True, cache_len=25)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        check_request(cfg, [[1] * 250], 10)
    with pytest.raises(GenerationError, match="outside"):
        check_request(cfg, [[1, cfg.vocab_size]], 5)
    with pytest.raises(GenerationError, match="MTP"):
        check_request(cfg.replace(num_nextn_predict_layers=0), [[1]], 5, speculative=True)
    with pytest.raises(GenerationError, match="needs MLA"):
        check_request(cfg.replace(attention="mha"), [[1]], 5)
    assert check_request(cfg, [[1] * 20, [2]], 5) == (32, 64)  # prefill bucket, cache slots
    abstract = nnx.eval_shape(lambda: init_model(cfg.replace(capacity_factor=1.25)))
    with pytest.raises(GenerationError, match="capacity"):
        Generator(abstract)


def test_unknown_or_untrained_run_dir_is_refused(tmp_path):
    with pytest.raises(GenerationError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(GenerationError, match="config.json"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GenerationError, match="no checkpoint"):
        load_run(tmp_path)
