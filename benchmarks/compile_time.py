"""Compile time of the jitted train step against depth, scanned and unrolled.

A narrow model (the tiny preset's widths, blocked dispatch, MTP depth 1) at 4 and 32 layers (1 dense + the rest
MoE). With `model.scan_layers=true` the traced program holds one body per stack whatever the depth, so the
32-layer step should compile in about the 4-layer time; unrolled, both tracing and XLA compilation grow with
the layers. Each case runs in a fresh subprocess (no cache shared between cases).

    python benchmarks/compile_time.py                  # layers 4 32, scanned and unrolled
    python benchmarks/compile_time.py --layers 4 16 64 --layouts scanned

Prints one JSON object: {"config": ..., "rows": [{"layout", "layers", "trace_s", "compile_s", "total_s"}],
"ratio_32_vs_4": {"scanned": ..., "unrolled": ...}} (ratios of total_s between the largest and smallest depth).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_case(layout: str, layers: int, batch: int, seq: int, remat: str) -> dict:
    from benchmarks._step import compile_step
    from dsv3_jax.config import get_preset
    from dsv3_jax.train.config import TrainConfig

    model_cfg = get_preset("tiny").replace(num_hidden_layers=layers, first_k_dense_replace=1,
                                           moe_dispatch="blocked", scan_layers=layout == "scanned", remat=remat)
    _, times, _ = compile_step(model_cfg, TrainConfig(batch_size=batch, seq_len=seq))
    return {"layout": layout, "layers": layers, "remat": remat, **{k: round(v, 3) for k, v in times.items()},
            "total_s": round(sum(times.values()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--layouts", nargs="+", default=["scanned", "unrolled"], choices=["scanned", "unrolled"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--case", nargs=2, metavar=("LAYOUT", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case[0], int(args.case[1]), args.batch, args.seq, args.remat)))
        return
    rows = []
    for layout in args.layouts:
        for layers in args.layers:
            out = subprocess.run([sys.executable, __file__, "--case", layout, str(layers), "--batch", str(args.batch),
                                  "--seq", str(args.seq), "--remat", args.remat],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    lo, hi = min(args.layers), max(args.layers)
    total = {(r["layout"], r["layers"]): r["total_s"] for r in rows}
    ratios = {layout: round(total[(layout, hi)] / total[(layout, lo)], 3) for layout in args.layouts}
    print(json.dumps({"config": {"preset": "tiny", "batch": args.batch, "seq": args.seq, "remat": args.remat,
                                 "dispatch": "blocked", "devices": str(__import__("jax").devices()[0])},
                      "rows": rows, f"ratio_{hi}_vs_{lo}": ratios}, indent=2))


if __name__ == "__main__":
    main()
