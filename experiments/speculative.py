"""MTP speculative-decoding acceptance of the trained `mtp` experiment arms.

    python -m experiments.speculative [--scale cpu|long] [--seed 0] [--max-new 128] [--code REF]

For each arm of experiments/configs/mtp.json it calls the real CLI on the arm's final checkpoint,
    python -m dsv3_jax generate --run-dir runs/experiments/.../seedS --speculative --json --prompt ... --max-new N
greedily and with temperature 1, over a fixed batch of prompts (one per source of the `lit` corpus and a few
more), and writes the drafted/accepted counts to experiments/results/mtp/speculative_seedS.json (for a scale other
than `cpu`: experiments/results/mtp/SCALE/speculative_seedS.json).
The arm trained without the MTP loss keeps an untrained MTP module: its acceptance is the floor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from experiments import collect, spec
from experiments.run import Code, _last_json_object, _run_logged, shell_line

# Openings in the styles of lit's three sources (Shakespeare, King James Bible, Wikipedia leads).
PROMPTS = (
    "KING HENRY. Now, lords, the French",
    "ROMEO. But soft, what light",
    "1:1 In the beginning God created",
    "3:16 For God so loved the world",
    "The river Thames flows through",
    "Mathematics is the study of",
    "The Roman Empire was",
    "In 1905, Albert Einstein published",
)
TEMPERATURES = (0.0, 1.0)


def generate_command(run_dir: Path, temperature: float, max_new: int, seed: int) -> list[str]:
    """The CLI call that decodes PROMPTS as one batch with MTP drafts."""
    cmd = [sys.executable, "-m", "dsv3_jax", "generate", "--run-dir", str(run_dir), "--speculative", "--json",
           "--max-new", str(max_new), "--temperature", str(temperature), "--seed", str(seed), "--ignore-eos"]
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    return cmd


def measure(run_dir: Path, temperature: float, max_new: int, seed: int, code: Code) -> dict:
    """Acceptance of one arm at one temperature; the sample texts are kept so loops are visible."""
    cmd = generate_command(run_dir, temperature, max_new, seed)
    rc, seconds, out = _run_logged(cmd, run_dir / "generate.log", code)
    if rc != 0:
        raise SystemExit(f"generate failed (exit {rc}) for {run_dir}; see {run_dir / 'generate.log'}")
    result = _last_json_object(out)
    return {"temperature": temperature, "command": shell_line(cmd), "acceptance_rate": result["acceptance_rate"],
            "drafted": result["drafted"], "accepted": result["accepted"], "new_tokens": result["new_tokens"],
            "steps": result["steps"], "wall_s": round(seconds, 1), "texts": result["texts"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.speculative", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(spec.SCALES), default="cpu", help="which scale's trained arms")
    parser.add_argument("--seed", type=int, default=0, help="which trained seed of the mtp arms")
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--code", metavar="REF", default=None, help="library as committed at this git ref")
    args = parser.parse_args(argv)
    exp, code = spec.load("mtp"), Code(args.code)
    out = {"prompts": list(PROMPTS), "max_new": args.max_new, "scale": args.scale, "seed": args.seed, "arms": {},
           "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **code.provenance()}
    for variant in exp.variants:
        run_dir = spec.RUNS_DIR / spec.run_key(*variant.source(exp.name), args.scale, args.seed)
        if not collect.finished(run_dir / "metrics.jsonl", spec.planned_steps(exp, variant, args.scale, args.seed)):
            print(f"{variant.name}: no finished run in {run_dir}; run "
                  f"`python -m experiments.run mtp --scale {args.scale}` first")
            continue
        out["arms"][variant.name] = {"label": variant.label, "run_dir": str(run_dir), "results": [
            measure(run_dir, t, args.max_new, args.seed, code) for t in TEMPERATURES]}
    if not out["arms"]:
        print("error: no finished mtp arm to decode with; nothing written", file=sys.stderr)
        return 2
    path = spec.RESULTS_DIR / spec.experiment_dir(exp.name, args.scale) / f"speculative_seed{args.seed}.json"
    collect.write_json(path, out)
    for name, arm in out["arms"].items():
        for r in arm["results"]:
            print(f"{name} T={r['temperature']}: acceptance {r['acceptance_rate']:.1%} "
                  f"({r['accepted']}/{r['drafted']} drafts), {r['new_tokens']} tokens in {r['steps']} steps")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
