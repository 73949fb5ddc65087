"""Where a train step's time goes: a `jax.profiler` trace of the real jitted step, summed per phase.

Compiles the train step exactly as the trainer does (mesh plan, shardings, donation), runs --warmup steps, then
traces --steps steps with `jax.profiler.trace(..., create_perfetto_trace=True)`. Every op event in the trace is
an HLO instruction of the compiled step; its `op_name` metadata in the optimised HLO carries the model's named
scopes (`mla_attention`, `moe_router`, `moe_routed_experts`, `mtp_1`, `optimizer`, ...) and, for the backward
pass, a `transpose(` wrapper. Each instruction's time is assigned to the first phase whose scope it carries,
split into forward and backward, and reported per step (ms and share of the traced op time).

    python benchmarks/profile_step.py                                 # small preset, batch 8 x 256, MTP off
    python benchmarks/profile_step.py --set model.num_nextn_predict_layers=1 --top 25
    python benchmarks/profile_step.py --set model.moe_dispatch=capacity --keep-trace /tmp/trace

Prints one JSON object: config, step_ms (untraced median), traced_ms_per_step (sum of op events / steps; on a
multi-threaded CPU runtime this can exceed wall time), phases {name: {ms, share, forward_ms, backward_ms}} and
the --top most expensive instructions with their phase and op_name.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from benchmarks._step import trainer_step  # noqa: E402
from dsv3_jax.config import get_preset  # noqa: E402
from dsv3_jax.train.config import Config, DataConfig, apply_overrides  # noqa: E402
from dsv3_jax.train.presets import train_preset  # noqa: E402

# (phase, scope substrings): the first phase whose scope an instruction's op_name holds wins, so the more
# specific scopes come first (MTP's own attention and experts count as MTP).
PHASES = (
    ("mtp", ("mtp_",)),
    ("optimizer", ("optimizer",)),
    ("bias_update", ("bias_update",)),
    ("attention: projections", ("mla_projections", "mla_out_proj")),
    ("attention: scores/softmax/values", ("mla_attention",)),
    ("moe: router + balance", ("moe_router",)),
    ("moe: routed experts (dispatch, GEMMs, combine)", ("moe_routed_experts",)),
    ("moe: shared experts", ("moe_shared_experts",)),
)
_OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name="([^"]*)"')


def build_config(args: argparse.Namespace) -> Config:
    config = Config(model=get_preset(args.preset), train=train_preset(args.preset), data=DataConfig())
    sets = [f"train.batch_size={args.batch}", f"train.seq_len={args.seq}"]
    return apply_overrides(config, sets + (args.set or []))


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the JAX source scope), from optimised HLO text."""
    names = {}
    for line in hlo_text.splitlines():
        m = _OP_NAME.match(line)
        if m:
            names[m.group(1)] = m.group(2)
    return names


def phase_of(op_name: str) -> str:
    for phase, scopes in PHASES:
        if any(s in op_name for s in scopes):
            return phase
    if "logsumexp" in op_name or "log_softmax" in op_name or "cross_entropy" in op_name or "loss" in op_name:
        return "loss + lm head"
    if "embed" in op_name.lower():
        return "embedding"
    if "norm" in op_name.lower() or "rsqrt" in op_name:
        return "norms"
    return "other (lm head, residuals, layer plumbing)"


def trace_events(trace_dir: str) -> list[dict]:
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"no perfetto trace under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--steps", type=int, default=5, help="traced steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed", type=int, default=10, help="untraced steps timed for step_ms")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--keep-trace", default=None, help="write the trace here instead of a temporary dir")
    args = parser.parse_args()

    config = build_config(args)
    mc, tc = config.model, config.train
    trainer = trainer_step(config)
    names = op_names(trainer.compiled.as_text())
    step_s, _ = trainer.median_s(args.timed, args.warmup)

    trace_dir = args.keep_trace or tempfile.mkdtemp(prefix="dsv3_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        trainer.run(args.steps)
    events = trace_events(trace_dir)

    per_phase = collections.defaultdict(lambda: {"fwd": 0.0, "bwd": 0.0})
    per_op = collections.Counter()
    matched = 0
    for e in events:
        name = e["name"]
        op_name = names.get(name)
        if op_name is None:
            continue
        matched += 1
        us = float(e["dur"])
        direction = "bwd" if "transpose(" in op_name else "fwd"
        per_phase[phase_of(op_name)][direction] += us
        per_op[(name, op_name)] += us
    total_us = sum(v["fwd"] + v["bwd"] for v in per_phase.values())
    if not matched:
        raise SystemExit("no trace event matched an HLO instruction: the trace format changed?")
    ms = lambda us: round(us / 1e3 / args.steps, 2)  # noqa: E731
    phases = {p: {"ms": ms(v["fwd"] + v["bwd"]), "share": round((v["fwd"] + v["bwd"]) / total_us, 3),
                  "forward_ms": ms(v["fwd"]), "backward_ms": ms(v["bwd"])}
              for p, v in sorted(per_phase.items(), key=lambda kv: -(kv[1]["fwd"] + kv[1]["bwd"]))}
    top = [{"instruction": n, "ms": ms(us), "phase": phase_of(o), "op_name": o[-160:]}
           for (n, o), us in per_op.most_common(args.top)]
    out = {"config": {"preset": args.preset, "batch": tc.batch_size, "seq": tc.seq_len, "mtp_depth": mc.mtp_depth,
                      "moe_dispatch": mc.moe_dispatch, "scan_layers": mc.scan_layers, "set": args.set or []},
           "backend": jax.default_backend(), "compile_s": round(trainer.compile_s, 2),
           "step_ms": round(1e3 * step_s, 2), "tokens_per_s": round(tc.batch_size * tc.seq_len / step_s, 1),
           "traced_ms_per_step": ms(total_us), "events_matched": matched, "phases": phases, "top": top}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
