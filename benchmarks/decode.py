"""Decode throughput with the absorbed latent cache vs a cache of expanded per-head K/V, cache bytes per token,
and the speedup of MTP speculative decoding.

- Decode: a random-init model of `--preset` (default `small`), one prompt of context - steps - 1 random
  tokens, then `--steps` greedy decode steps through `Generator.generate` (compiled ahead, so tokens/s is
  steady-state decoding, host loop included). The cache holds exactly `context` slots: with static shapes
  every step attends over the whole cache, so its size *is* the context a step pays for (and 4096 stays
  within the small preset's max_position_embeddings). Each (context, cache) case is timed `--repeats` times
  round-robin and the median is reported.
- Cache bytes per token: arithmetic from the config (`dsv3_jax.kv_cache`), also for DeepSeek-V3 671B.
- Speculative: the trained model in `--run-dir` (default runs/small; skipped if absent) on `--prompts` real
  prompts, plain vs `speculative=True`, greedy and temperature 0.8; speedup = speculative / plain tokens/s.

    python benchmarks/decode.py                                  # contexts 256 1024 4096, runs/small
    python benchmarks/decode.py --contexts 256 --steps 16 --repeats 1 --run-dir ''
    python benchmarks/decode.py --set num_attention_heads=16 --run-dir ''   # more heads: K/V outgrow the latent

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.config import get_preset  # noqa: E402
from dsv3_jax.generate import Generator, inference_config  # noqa: E402
from dsv3_jax.kv_cache import (cache_numbers_per_token, expanded_cache_bytes_per_token,  # noqa: E402
                               latent_cache_bytes_per_token)
from dsv3_jax.model import init_model  # noqa: E402
from dsv3_jax.sampling import Sampling  # noqa: E402

PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed any further, hear me speak.\n", "KING HENRY:\n",
           "To be, or not to be", "HAMLET:\nWhat a piece of work is a man!", "JULIET:\nO Romeo, Romeo!"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_figures(cfg, dtype: str) -> dict:
    latent, expanded = latent_cache_bytes_per_token(cfg, dtype), expanded_cache_bytes_per_token(cfg, dtype)
    return {"dtype": dtype, "latent_numbers_per_token_layer": cache_numbers_per_token(cfg, "latent"),
            "expanded_numbers_per_token_layer": cache_numbers_per_token(cfg, "expanded"),
            "latent_bytes_per_token": latent, "expanded_bytes_per_token": expanded,
            "expanded_over_latent": round(expanded / latent, 2)}


def decode_rows(args) -> tuple[dict, list[dict]]:
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    cfg = inference_config(get_preset(args.preset).replace(dtype=args.dtype, param_dtype=args.dtype, **overrides))
    cfg.validate()
    model = init_model(cfg, seed=0)
    generators = {kind: Generator(model, cache_kind=kind) for kind in ("latent", "expanded")}
    rng = np.random.default_rng(0)
    cases = [(c, kind) for c in args.contexts for kind in generators]
    prompts = {c: [rng.integers(1, cfg.vocab_size, c - args.steps - 1).tolist()] for c in args.contexts}
    times: dict[tuple, list[float]] = {case: [] for case in cases}
    compile_s: dict[tuple, float] = {}
    for rep in range(args.repeats + 1):  # round 0 compiles
        for context, kind in cases:
            result = generators[kind].generate(prompts[context], args.steps, cache_len=context)
            if rep == 0:
                compile_s[(context, kind)] = result.prefill_s + result.compile_s
                log(f"compiled context {context} {kind}: {compile_s[(context, kind)]:.1f} s")
            else:
                times[(context, kind)].append(result.decode_s / result.decode_tokens)
    rows = []
    for context, kind in cases:
        per_token = statistics.median(times[(context, kind)])
        bytes_per_token = (latent_cache_bytes_per_token if kind == "latent" else expanded_cache_bytes_per_token)(
            cfg, args.dtype)
        rows.append({"context": context, "cache": kind, "tokens_per_s": round(1 / per_token, 1),
                     "ms_per_token": round(1e3 * per_token, 3),
                     "ms_per_token_all_repeats": [round(1e3 * t, 3) for t in times[(context, kind)]],
                     "cache_mib": round(context * bytes_per_token / 2**20, 3),
                     "compile_s": round(compile_s[(context, kind)], 1)})
        log(f"context {context:5d} {kind:8s}: {1 / per_token:8.1f} tokens/s")
    for context in args.contexts:
        lat, exp = (next(r for r in rows if r["context"] == context and r["cache"] == kind)
                    for kind in ("latent", "expanded"))
        lat["speed_vs_expanded"] = round(lat["tokens_per_s"] / exp["tokens_per_s"], 2)
    config = {"preset": args.preset, "overrides": overrides, "dtype": args.dtype, "steps": args.steps,
              "repeats": args.repeats, "batch": 1, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
              "kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim}
    return {**config, **cache_figures(cfg, args.dtype)}, rows


def speculative_rows(args) -> dict:
    from dsv3_jax.loading import load_run

    loaded = load_run(args.run_dir)
    log(f"speculative: {loaded.source}")
    generator = Generator(loaded.model)
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS[:args.prompts]]
    out = {"run": loaded.source, "prompts": len(prompts), "max_new": args.max_new, "batch": 1, "rows": []}
    for label, sampling in (("greedy", Sampling()), ("temperature 0.8", Sampling(temperature=0.8))):
        stats = {"plain": [], "speculative": []}
        accepted = drafted = 0
        identical = True
        for rep in range(args.repeats + 1):
            for i, prompt in enumerate(prompts):
                runs = {}
                for mode in ("plain", "speculative"):
                    runs[mode] = generator.generate([prompt], args.max_new, sampling, stop_ids=(), seed=i,
                                                    speculative=mode == "speculative")
                    if rep:
                        stats[mode].append((runs[mode].decode_tokens, runs[mode].decode_s, runs[mode].steps))
                if rep:
                    accepted += runs["speculative"].accepted
                    drafted += runs["speculative"].drafted
                    identical &= runs["plain"].tokens == runs["speculative"].tokens
        tps = {mode: sum(n for n, _, _ in v) / sum(s for _, s, _ in v) for mode, v in stats.items()}
        step_ms = {mode: 1e3 * sum(s for _, s, _ in v) / sum(k for _, _, k in v) for mode, v in stats.items()}
        row = {"sampling": label, "plain_tokens_per_s": round(tps["plain"], 1),
               "speculative_tokens_per_s": round(tps["speculative"], 1),
               "speedup": round(tps["speculative"] / tps["plain"], 2),
               "plain_ms_per_step": round(step_ms["plain"], 2),
               "speculative_ms_per_step": round(step_ms["speculative"], 2),
               "acceptance_rate": round(accepted / drafted, 3),
               "tokens_per_verify_step": round(1 + accepted / drafted, 3)}
        if sampling.greedy:
            row["identical_to_plain_greedy"] = identical
        out["rows"].append(row)
        log(f"speculative {label}: {row}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="model config override for the decode rows, e.g. num_attention_heads=16")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-dir", default="runs/small", help="trained run for the speculative rows ('' = skip)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=128)
    args = parser.parse_args()

    t0 = time.perf_counter()
    config, rows = decode_rows(args)
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "config": config, "decode": rows,
              "deepseek_v3_671b": cache_figures(get_preset("deepseek-v3-671b"), "bfloat16")}
    v3 = get_preset("deepseek-v3-671b")
    result["deepseek_v3_671b"]["latent_gib_per_128k_token_sequence"] = round(
        latent_cache_bytes_per_token(v3, "bfloat16") * 128 * 1024 / 2**30, 2)
    if args.run_dir and os.path.isdir(os.path.join(args.run_dir, "checkpoints")):
        result["speculative"] = speculative_rows(args)
    else:
        result["speculative"] = {"skipped": f"no trained run at {args.run_dir!r}"}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
