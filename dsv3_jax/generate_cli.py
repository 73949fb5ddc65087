"""`python -m dsv3_jax generate`: argument checks, loading, streaming output and the throughput report.

Order matters: arguments, the source directory, the tokenizer and the request's lengths are all checked
before the checkpoint is read or anything compiles.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the parser is built on every CLI call: JAX is imported only when generating
    from dsv3_jax.generate import GenerationResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `generate` subcommand's flags."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a training run: its latest checkpoint and its own tokenizer")
    source.add_argument("--hf", metavar="PATH", help="an HF DeepSeek-V3 safetensors directory")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    parser.add_argument("--prompt-ids", action="append", default=[], metavar="1,2,3",
                        help="prompt token ids (repeat for a batch); output is printed as ids without a tokenizer")
    parser.add_argument("--max-new", type=int, default=200, help="new tokens per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speculative", action="store_true", help="draft with the MTP module, verify with the model")
    parser.add_argument("--cache", choices=("latent", "expanded"), default="latent",
                        help="absorbed MLA over the latent cache (default) or a cache of expanded per-head K/V")
    parser.add_argument("--cache-len", type=int, default=None, help="cache slots (default: prompt + max-new, "
                        "rounded up to a power of two)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="--hf only: parameter and compute dtype (default float32); a run generates in its "
                             "own dtypes")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _parse_ids(text: str) -> list[int]:
    from dsv3_jax.generate import GenerationError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GenerationError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Generate for `args`; 0 on success (errors raise and the CLI turns them into `error: ...`, exit 2)."""
    from dsv3_jax.generate import GenerationError, Generator, check_request, inference_config
    from dsv3_jax.loading import (check_hf_dir, hf_config, hf_stop_ids, hf_tokenizer, load_hf, load_run,
                                  run_config, run_tokenizer)
    from dsv3_jax.sampling import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p).validate()
    if args.max_new < 1:
        raise GenerationError(f"--max-new must be >= 1, got {args.max_new}")
    if bool(args.prompt) == bool(args.prompt_ids):
        raise GenerationError("give the prompt(s) as --prompt TEXT or as --prompt-ids 1,2,3 (not both)")
    for text in args.prompt:
        if not text:
            raise GenerationError("empty --prompt: generation needs at least one token to start from")
    id_prompts = [_parse_ids(s) for s in args.prompt_ids]

    if args.run_dir is not None and args.dtype is not None:
        raise GenerationError("--dtype applies to --hf only: a run generates in its own dtypes (model.dtype, "
                              "model.param_dtype)")
    dtype = args.dtype or "float32"
    if args.run_dir is not None:
        config = run_config(args.run_dir)
        cfg = inference_config(config.model)
        tokenizer = run_tokenizer(args.run_dir, config, log=lambda msg: print(msg, file=sys.stderr))
        stop_ids = (tokenizer.eos_id,)
    else:
        path = check_hf_dir(args.hf)
        cfg, tokenizer, stop_ids = hf_config(path, dtype), hf_tokenizer(path), hf_stop_ids(path)
        if args.prompt and tokenizer is None:
            raise GenerationError(f"{args.hf} has no tokenizer.json: pass --prompt-ids 1,2,3 instead of --prompt")
    prompts = [tokenizer.encode(text) for text in args.prompt] if args.prompt else id_prompts
    check_request(cfg, prompts, args.max_new, args.speculative, args.cache_len)  # before loading anything big

    if args.run_dir is not None:
        loaded = load_run(args.run_dir, with_tokenizer=False)
    else:
        loaded = load_hf(args.hf, dtype, with_tokenizer=False)
    print(f"loaded {loaded.source}", file=sys.stderr)
    generator = Generator(loaded.model, cache_kind=args.cache)
    as_text = tokenizer is not None and not args.json
    stream = _Stream(prompts[0], tokenizer) if as_text and len(prompts) == 1 else None
    result = generator.generate(prompts, args.max_new, sampling, () if args.ignore_eos else stop_ids, args.seed,
                                args.speculative, args.cache_len, on_tokens=stream)
    if stream is not None:
        stream.finish()
    elif args.json:
        texts = [tokenizer.decode(t) for t in result.tokens] if tokenizer is not None else None
        print(json.dumps({"tokens": result.tokens, "texts": texts, **_summary(result, args.speculative)}))
    else:
        for i, (prompt, tokens) in enumerate(zip(prompts, result.tokens)):
            body = tokenizer.decode(prompt + tokens) if tokenizer is not None else ",".join(map(str, tokens))
            print(f"--- {i} ---\n{body}" if len(prompts) > 1 else body)
    print(_report(result, args.speculative), file=sys.stderr)
    return 0


class _Stream:
    """Print the prompt, then the continuation as it grows. Decodes the whole continuation each time and
    holds back a trailing U+FFFD, which is a multi-byte character whose bytes have not all arrived yet."""

    def __init__(self, prompt: Sequence[int], tokenizer):
        self.tokenizer, self.prompt, self.ids, self.shown = tokenizer, list(prompt), [], ""
        sys.stdout.write(tokenizer.decode(self.prompt))
        sys.stdout.flush()

    def __call__(self, row: int, ids: list[int]) -> None:
        self.ids += ids
        text = self.tokenizer.decode(self.prompt + self.ids)[len(self.tokenizer.decode(self.prompt)):]
        if not text.endswith("\ufffd") and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self) -> None:
        text = self.tokenizer.decode(self.prompt + self.ids)[len(self.tokenizer.decode(self.prompt)):]
        sys.stdout.write(text[len(self.shown):] + "\n")
        sys.stdout.flush()


def _summary(result: "GenerationResult", speculative: bool) -> dict:
    finite = lambda x: x if x == x else None  # noqa: E731 - NaN (nothing decoded/drafted) is not JSON
    out = {"new_tokens": sum(len(t) for t in result.tokens), "finish_reasons": result.finish_reasons,
           "decode_tokens_per_s": finite(result.tokens_per_s), "decode_s": result.decode_s, "steps": result.steps,
           "prefill_s": result.prefill_s, "compile_s": result.compile_s}
    if speculative:
        out.update(acceptance_rate=finite(result.acceptance_rate), drafted=result.drafted, accepted=result.accepted)
    return out


def _report(result: "GenerationResult", speculative: bool) -> str:
    line = (f"{sum(len(t) for t in result.tokens)} new tokens; decode {result.decode_tokens} tokens in "
            f"{result.decode_s:.2f} s = {result.tokens_per_s:.1f} tokens/s ({result.steps} steps; prefill "
            f"{result.prefill_s:.2f} s and step compile {result.compile_s:.2f} s not included)")
    if speculative:
        line += (f"\nspeculative: acceptance rate {result.acceptance_rate:.1%} ({result.accepted}/{result.drafted} "
                 f"MTP drafts), {result.decode_tokens / max(result.steps, 1):.2f} tokens per step")
    return line
