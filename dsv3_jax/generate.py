"""Generation: prefill + single-token decode over a preallocated MLA cache, sampling, stop tokens, and MTP
speculative decoding.

How it runs:
- Prompts are right-padded to a power-of-two bucket and prefilled in one jitted call (one compile per bucket);
  the cache is preallocated for prompt + max_new tokens, rounded up to a power of two (one decode compile per
  cache size), and the same jitted decode step is reused for every token. Caches are donated, so XLA updates
  them in place.
- Decode attends over the latent cache with absorbed projections (`MLA.decode_absorbed`); `cache_kind=
  "expanded"` caches per-head K/V instead, for comparison.
- Speculative decoding drafts one token with the first MTP module and verifies it together with the pending
  token in one two-token forward of the main model (`_speculative_step`). Greedy output is exactly plain greedy
  decoding; with sampling, the speculative-sampling rule keeps the output distribution exact.
- MoE layers must not drop tokens here: with a capacity limit, whether a token is dropped depends on how many
  tokens share the call (prompt bucket, batch, 1 or 2 per step), so results would change with batching.
  The loaders force dropless dispatch and `Generator` refuses a model with a capacity factor.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dsv3_jax.config import ModelConfig
from dsv3_jax.kv_cache import CACHE_KINDS, KVCache, init_cache
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.partitioning import implementation
from dsv3_jax.sampling import Sampling, probabilities, sample, sample_from_probs, speculative_accept

MIN_PREFILL_BUCKET = 16
MIN_CACHE_BUCKET = 64


class GenerationError(ValueError):
    """A generation request that cannot run (bad prompt, lengths, checkpoint or settings)."""


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum): lengths share compiled programs by bucket."""
    size = minimum
    while size < n:
        size *= 2
    return size


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with dropless MoE dispatch (see the module docstring for why generation needs it)."""
    return cfg if cfg.capacity_factor is None else cfg.replace(capacity_factor=None)


@dataclasses.dataclass
class GenerationResult:
    """Generated ids per prompt (stop token excluded) and what it cost."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new reached)
    prefill_s: float  # prefill, compile included
    compile_s: float  # compiling the decode step (before decode timing starts)
    decode_s: float  # every decode step after the prefill
    decode_tokens: int  # tokens emitted by those steps (excluding the one the prefill samples)
    steps: int
    drafted: int = 0  # speculative: drafts offered by live rows
    accepted: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


@struct.dataclass
class SpecState:
    """Carry of speculative decoding. Invariant: mtp_cache.lengths + pend_count == cache.lengths; the MTP
    module still owes the positions between, each pairing a main hidden state with the token after it."""

    cache: KVCache
    mtp_cache: KVCache
    token_B: jax.Array  # the newest sampled token, not yet fed to the main model
    pend_h_B2D: jax.Array  # post-norm main hidden states awaiting the MTP module (first pend_count valid)
    pend_ids_B2: jax.Array  # the token following each of them
    pend_count_B: jax.Array  # 1 (last draft rejected) or 2 (accepted)


def _prefill(graphdef: nnx.GraphDef, state: nnx.State, ids_BP: jax.Array, lengths_B: jax.Array, cache: KVCache,
             mtp_cache: KVCache | None, key: jax.Array, sampling: Sampling):
    """Prompts into the caches; samples each row's first new token from its last prompt position."""
    model = nnx.merge(graphdef, state)
    final_BPD, cache = model.prefill(ids_BP, lengths_B, cache)
    last_BD = final_BPD[jnp.arange(ids_BP.shape[0]), lengths_B - 1]
    token_B = sample(key, model.head(last_BD), sampling)
    if mtp_cache is not None:
        _, mtp_cache = model.mtp_prefill(final_BPD, ids_BP, lengths_B, mtp_cache)
    return token_B, last_BD, cache, mtp_cache


def _decode_step(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, token_B: jax.Array, key: jax.Array,
                 sampling: Sampling) -> tuple[jax.Array, KVCache]:
    """Feed one token per row, sample the next."""
    model = nnx.merge(graphdef, state)
    final_B1D, cache = model.decode(token_B[:, None], cache)
    return sample(key, model.head(final_B1D[:, 0]), sampling), cache


def _speculative_step(graphdef: nnx.GraphDef, state: nnx.State, spec: SpecState, key: jax.Array,
                      sampling: Sampling) -> tuple[SpecState, jax.Array, jax.Array, jax.Array]:
    """Draft with MTP, verify [pending token, draft] in one main forward, accept or replace the draft.

    Returns (carry, emitted [B, 2], number emitted [B] (1 or 2), accepted [B]). With main length n and t_n
    pending: the draft d for t_{n+1} comes from the MTP module at position n-1; the main model computes p_n
    (for t_{n+1}) and, assuming d, p_{n+1}. Accepted: emit d and a bonus token from p_{n+1}; rejected: emit
    the replacement and drop d's cache slot by not counting it (it is overwritten next step).
    """
    model = nnx.merge(graphdef, state)
    draft_key, accept_key, bonus_key = jax.random.split(key, 3)
    rows = jnp.arange(spec.token_B.shape[0])

    mtp_lengths_B = spec.mtp_cache.lengths
    head_in_B2D, mtp_cache = model.mtp_decode(spec.pend_h_B2D, spec.pend_ids_B2, spec.mtp_cache)
    mtp_cache = mtp_cache.replace(lengths=mtp_lengths_B + spec.pend_count_B)  # the second slot may be junk
    q_BV = probabilities(model.head(head_in_B2D[rows, spec.pend_count_B - 1]), sampling)
    draft_B = sample_from_probs(draft_key, q_BV, sampling.greedy)

    lengths_B = spec.cache.lengths
    final_B2D, cache = model.decode(jnp.stack([spec.token_B, draft_B], axis=1), spec.cache)
    logits_B2V = model.head(final_B2D)
    accepted_B, replacement_B = speculative_accept(accept_key, draft_B, q_BV,
                                                   probabilities(logits_B2V[:, 0], sampling), sampling.greedy)
    bonus_B = sample(bonus_key, logits_B2V[:, 1], sampling)
    second_B = jnp.where(accepted_B, draft_B, replacement_B)  # t_{n+1}
    n_new_B = 1 + accepted_B.astype(jnp.int32)
    emitted_B2 = jnp.stack([second_B, bonus_B], axis=1)
    spec = SpecState(cache=cache.replace(lengths=lengths_B + n_new_B), mtp_cache=mtp_cache,
                     token_B=jnp.where(accepted_B, bonus_B, second_B), pend_h_B2D=final_B2D,
                     pend_ids_B2=emitted_B2, pend_count_B=n_new_B)
    return spec, emitted_B2, n_new_B, accepted_B


def check_request(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new: int, speculative: bool = False,
                  cache_len: int | None = None) -> tuple[int, int]:
    """Validate a request from the config alone (before a model is loaded or anything compiles); returns
    (prefill bucket length, cache slots)."""
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise GenerationError(f"max_new must be an integer >= 1, got {max_new!r}")
    if len(prompts) == 0:
        raise GenerationError("no prompt given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty: generation needs at least one token to start from")
        bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    if cfg.attention != "mla":
        raise GenerationError(f"cached decoding needs MLA; this model uses attention={cfg.attention!r} "
                              "(the MHA ablation baseline has no decode path)")
    if speculative and cfg.mtp_depth < 1:
        raise GenerationError("speculative decoding drafts with the MTP module, and this model has none "
                              "(num_nextn_predict_layers=0)")
    longest = max(len(p) for p in prompts)
    needed = longest + max_new + (1 if speculative else 0)  # the verify step writes one slot past the end
    if cache_len is not None:
        most = cfg.max_position_embeddings + (1 if speculative else 0)
        if not isinstance(cache_len, int) or isinstance(cache_len, bool) or not 1 <= cache_len <= most:
            # a cache sized past the model's positions is memory no position can use (and can exhaust the host)
            raise GenerationError(f"--cache-len must be an integer in [1, {most}] (the model's "
                                  f"max_position_embeddings={cfg.max_position_embeddings}), got {cache_len!r}")
        if longest >= cache_len:
            raise GenerationError(f"prompt of {longest} tokens does not fit the cache of {cache_len} slots")
        if needed > cache_len:
            raise GenerationError(f"prompt of {longest} tokens + max_new {max_new} needs {needed} cache slots, "
                                  f"more than the {cache_len} given")
        capacity = cache_len
    else:
        capacity = bucket(needed, MIN_CACHE_BUCKET)
    if longest + max_new > cfg.max_position_embeddings:
        raise GenerationError(f"prompt of {longest} tokens + max_new {max_new} exceeds the model's "
                              f"max_position_embeddings={cfg.max_position_embeddings}")
    return min(bucket(longest, MIN_PREFILL_BUCKET), capacity), capacity


def with_dispatch(graphdef: nnx.GraphDef, state: nnx.State, moe_dispatch: str) -> nnx.GraphDef:
    """The same model with another MoE dispatch: every module's config gets the new (compute-only) field,
    weights and any injected dot_general are untouched. Dropless dispatches compute the same function."""
    model = nnx.merge(graphdef, state)
    for _, module in nnx.iter_graph(model):
        if isinstance(getattr(module, "cfg", None), ModelConfig):
            module.cfg = module.cfg.replace(moe_dispatch=moe_dispatch).validate()
    return nnx.split(model)[0]


class Generator:
    """Jitted prefill / decode / speculative steps for one model, and the host loop that streams tokens."""

    def __init__(self, model: DeepSeekV3, cache_kind: str = "latent", cache_dtype: str | None = None,
                 decode_dispatch: str | None = "auto"):
        """`decode_dispatch`: the MoE dispatch of decode/verify steps (None: the model's own; prefill always
        uses the model's; "auto": backend_policy.choose's `decode_dispatch`, capacity on CPU and ragged on
        GPU/TPU, since steps see 1-2 tokens per row)."""
        if cache_kind not in CACHE_KINDS:
            raise GenerationError(f"cache kind must be one of {CACHE_KINDS}, got {cache_kind!r}")
        if model.cfg.capacity_factor is not None:
            raise GenerationError("the model's MoE has a capacity limit (capacity_factor="
                                  f"{model.cfg.capacity_factor}): build it from inference_config(cfg) (dropless)")
        self.cfg = model.cfg
        self.cache_kind = cache_kind
        self.cache_dtype = cache_dtype
        graphdef, self.state = nnx.split(model)
        if decode_dispatch == "auto":
            decode_dispatch = implementation(self.cfg).decode_dispatch
        step_graphdef = graphdef if decode_dispatch is None else with_dispatch(graphdef, self.state, decode_dispatch)
        self._prefill = jax.jit(partial(_prefill, graphdef), static_argnames=("sampling",),
                                donate_argnames=("cache", "mtp_cache"))
        self._step = jax.jit(partial(_decode_step, step_graphdef), static_argnames=("sampling",),
                             donate_argnames=("cache",))
        self._spec_step = jax.jit(partial(_speculative_step, step_graphdef), static_argnames=("sampling",),
                                  donate_argnames=("spec",))
        self._executables: dict[tuple, object] = {}

    def check_request(self, prompts: Sequence[Sequence[int]], max_new: int, speculative: bool = False,
                      cache_len: int | None = None) -> tuple[int, int]:
        """`check_request` for this generator's model."""
        return check_request(self.cfg, prompts, max_new, speculative, cache_len)

    def _compiled(self, jitted, sampling: Sampling, carry: tuple, key: jax.Array):
        """The step compiled for these argument shapes (memoised per generator); called without `sampling`."""
        signature = (id(jitted), sampling, *((a.shape, a.dtype) for a in jax.tree.leaves(carry)))
        if signature not in self._executables:
            self._executables[signature] = jitted.lower(self.state, *carry, key, sampling=sampling).compile()
        return self._executables[signature]

    def new_cache(self, batch: int, capacity: int, n_layers: int | None = None) -> KVCache:
        """An empty cache of this generator's kind (main layers unless `n_layers` is given)."""
        return init_cache(self.cfg, self.cfg.num_hidden_layers if n_layers is None else n_layers, batch, capacity,
                          self.cache_kind, self.cache_dtype)

    def generate(self, prompts: Sequence[Sequence[int]], max_new: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), seed: int = 0, speculative: bool = False,
                 cache_len: int | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> GenerationResult:
        """Generate up to `max_new` tokens per prompt; a row stops at its first stop token (not returned).
        `on_tokens(row, ids)` is called as tokens are produced (for streaming)."""
        sampling = sampling.validate()
        prefill_len, capacity = self.check_request(prompts, max_new, speculative, cache_len)
        batch = len(prompts)
        lengths_B = np.array([len(p) for p in prompts], np.int32)
        ids_BP = np.zeros((batch, prefill_len), np.int32)
        for row, prompt in enumerate(prompts):
            ids_BP[row, :len(prompt)] = prompt
        key = jax.random.key(seed)
        stops = {int(s) for s in stop_ids}
        out: list[list[int]] = [[] for _ in range(batch)]
        reasons = [""] * batch

        def emit(new_BK: np.ndarray, count_B: np.ndarray) -> int:
            """Append each live row's new tokens up to a stop token or max_new; the number kept."""
            kept = 0
            for row in range(batch):
                if reasons[row]:
                    continue
                fresh = []
                for tok in new_BK[row, :count_B[row]].tolist():
                    if tok in stops:
                        reasons[row] = "stop"
                        break
                    fresh.append(tok)
                    if len(out[row]) + len(fresh) == max_new:
                        reasons[row] = "length"
                        break
                out[row] += fresh
                kept += len(fresh)
                if fresh and on_tokens is not None:
                    on_tokens(row, fresh)
            return kept

        t0 = time.perf_counter()
        cache = self.new_cache(batch, capacity)
        mtp_cache = self.new_cache(batch, capacity, n_layers=1) if speculative else None
        token_B, last_BD, cache, mtp_cache = self._prefill(self.state, jnp.asarray(ids_BP), jnp.asarray(lengths_B),
                                                           cache, mtp_cache, jax.random.fold_in(key, 0),
                                                           sampling=sampling)
        emit(np.asarray(token_B)[:, None], np.ones(batch, np.int32))
        prefill_s = time.perf_counter() - t0

        if speculative:
            spec = SpecState(cache=cache, mtp_cache=mtp_cache, token_B=token_B,
                             pend_h_B2D=jnp.stack([last_BD, jnp.zeros_like(last_BD)], axis=1),
                             pend_ids_B2=jnp.stack([token_B, jnp.zeros_like(token_B)], axis=1),
                             pend_count_B=jnp.ones((batch,), jnp.int32))
            step_fn, carry = self._spec_step, spec
        else:
            step_fn, carry = self._step, (cache, token_B)
        t0 = time.perf_counter()
        if not all(reasons):  # compile (or fetch) ahead: neither compiling nor tracing is in the decode timing
            step_fn = self._compiled(step_fn, sampling, (carry,) if speculative else carry, key)
        compile_s = time.perf_counter() - t0

        steps = decode_tokens = drafted = accepted = 0
        t0 = time.perf_counter()
        while not all(reasons):
            steps += 1
            step_key = jax.random.fold_in(key, steps)
            if speculative:
                live = np.array([not r for r in reasons])
                carry, emitted_B2, n_new_B, accepted_B = step_fn(self.state, carry, step_key)
                emitted, n_new = np.asarray(emitted_B2), np.asarray(n_new_B)
                drafted += int(live.sum())
                accepted += int(np.asarray(accepted_B)[live].sum())
            else:
                token_B, cache = step_fn(self.state, *carry, step_key)
                carry = (cache, token_B)
                emitted, n_new = np.asarray(token_B)[:, None], np.ones(batch, np.int32)
            decode_tokens += emit(emitted, n_new)
        decode_s = time.perf_counter() - t0
        return GenerationResult(tokens=out, finish_reasons=reasons, prefill_s=prefill_s, compile_s=compile_s,
                                decode_s=decode_s, decode_tokens=decode_tokens, steps=steps, drafted=drafted,
                                accepted=accepted)
