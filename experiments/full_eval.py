"""`python -m dsv3_jax eval` over the whole validation split, printing the per-expert loads as well.

    python -m experiments.full_eval --run-dir runs/experiments/NAME/VARIANT/seedS

The CLI's eval computes the expert-load matrix [MoE layers, experts] but prints only MaxVio. This runs the very
same CLI code path (checkpoint restore, data, jitted eval step) and keeps the loads its `evaluate` returned,
so the heatmaps show the whole split rather than the first 16 batches logged during training (on `lit` those
are all Shakespeare: one domain, and a different routing pattern from the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from typing import Any, Sequence


def evaluate_with_loads(run_dir: str) -> dict[str, Any]:
    """The CLI eval's JSON for `run_dir` (whole validation split) plus `expert_load` as nested lists."""
    from dsv3_jax import cli
    from dsv3_jax.train import trainer

    captured: dict[str, Any] = {}
    original = trainer.evaluate

    def keep_result(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.update(result)
        return result

    trainer.evaluate = keep_result  # cmd_eval imports it at call time, so it picks this one up
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = cli.main(["eval", "--run-dir", run_dir, "--max-batches", "0"])
    finally:
        trainer.evaluate = original
    if rc != 0 or "expert_load" not in captured:
        raise SystemExit(f"eval failed (exit {rc}): {out.getvalue()}")
    result = json.loads(out.getvalue())
    result["expert_load"] = [[float(c) for c in layer] for layer in captured["expert_load"]]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.full_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_with_loads(args.run_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
