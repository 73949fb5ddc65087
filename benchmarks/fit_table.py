"""The README's fit table: which preset fits which TPU slice or GPU nodes, measured by XLA, row by row.

Each row is one `python -m dsv3_jax compile --target ... --json` run (the real sharded train step compiled
for the target on this host; see dsv3_jax/aot.py) with the mesh, remat policy, microbatching and dispatch
that make it fit. TPU rows run under the interpreter that has libtpu (`requirements-tpu.txt`), GPU rows under
the one with the CUDA plugin (`requirements-gpu.txt`). Results are merged into
`benchmarks/results/fit_table.json` (one entry per row, with its command and date), and `--markdown` prints
the table the README shows. When a row is first re-measured with another command, the previous measurement's
memory is kept under `before` (the table shows both) and stays there through later re-measurements, so what a
change bought against that baseline stays on record.

    python benchmarks/fit_table.py --list
    python benchmarks/fit_table.py --row moe-1b/v5p-8 --row moe-1b/h100x8
    python benchmarks/fit_table.py --markdown

The 671B rows compile for 9+ minutes at up to ~8 GiB of host memory each on 2 cores; the others in 1-5.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "fit_table.json")

# What the larger rows share: weights split everywhere, layers recomputed; the 671B also bounds its expert
# exchange to 1.25x a shard's fair share. Attention, grouped GEMMs and the loss are the backend's kernels (auto).
# dsv2-lite takes the `blocks` grouped GEMM: under its dropless expert parallelism the kernel compiles to
# more temporaries (H100, 2 sequences per device: 63.7 GiB in all with the kernel, 55.8 with blocks).
DSV2_LITE_FIT = ("mesh.fsdp=true", "model.remat=full", "model.grouped_gemm=blocks")
V3_FIT = ("mesh.fsdp=true", "model.remat=full", "model.capacity_factor=1.25")

# name -> (preset, target, overrides). Batches are the presets' global batches; grad_accum sets the microbatch,
# the largest that fits (half of it per device does not; the 671B rows take one sequence per device). Slice names count TensorCores (v5p-8 = 4 chips = v5p:2x2x1);
# GPU rows are nodes x 8 GPUs.
ROWS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "moe-1b/v5p-8": ("moe-1b", "v5p:2x2x1", ("mesh.expert=4", "mesh.fsdp=true", "model.remat=minimal",
                                             "train.grad_accum=8")),
    "moe-1b/h100x8": ("moe-1b", "h100:8", ("mesh.expert=8", "model.remat=minimal", "train.grad_accum=4")),
    "moe-1b/h200x8": ("moe-1b", "h200:8", ("mesh.expert=8", "model.remat=minimal", "train.grad_accum=2")),
    "dsv2-lite/v5p-16": ("dsv2-lite", "v5p:2x2x2", ("mesh.expert=8", *DSV2_LITE_FIT, "train.grad_accum=64")),
    "dsv2-lite/v5p-32": ("dsv2-lite", "v5p:2x2x4", ("mesh.data=2", "mesh.expert=8", *DSV2_LITE_FIT,
                                                    "train.grad_accum=16")),
    "dsv2-lite/h100x8": ("dsv2-lite", "h100:8", ("mesh.expert=8", *DSV2_LITE_FIT, "train.grad_accum=32")),
    "dsv2-lite/h200x8": ("dsv2-lite", "h200:8", ("mesh.expert=8", *DSV2_LITE_FIT, "train.grad_accum=16")),
    "deepseek-v3-671b/v5p-1024": ("deepseek-v3-671b", "v5p:8x8x8", ("mesh.data=8", "mesh.expert=64", *V3_FIT,
                                                                     "train.batch_size=512")),
    "deepseek-v3-671b/v5p-1024-seq8k": ("deepseek-v3-671b", "v5p:8x8x8", ("mesh.data=8", "mesh.expert=64", *V3_FIT,
                                                                           "train.batch_size=512",
                                                                           "train.seq_len=8192")),
    "deepseek-v3-671b/v5p-512": ("deepseek-v3-671b", "v5p:8x8x4", ("mesh.data=4", "mesh.expert=64", *V3_FIT,
                                                                   "train.batch_size=256")),
    "deepseek-v3-671b/h100x8x32": ("deepseek-v3-671b", "h100:8x32", ("mesh.data=4", "mesh.expert=64", *V3_FIT,
                                                                     "train.batch_size=256")),
    "deepseek-v3-671b/h200x8x16": ("deepseek-v3-671b", "h200:8x16", ("mesh.data=2", "mesh.expert=64", *V3_FIT,
                                                                     "train.batch_size=128")),
}


def command(name: str, python: str) -> list[str]:
    preset, target, sets = ROWS[name]
    args = [python, "-m", "dsv3_jax", "compile", "--target", target, "--preset", preset, "--json"]
    for item in sets:
        args += ["--set", item]
    return args


def run_row(name: str, args: argparse.Namespace) -> dict:
    target = ROWS[name][1]
    python = args.python_gpu if target.startswith(("h100", "h200")) else args.python_tpu
    cmd = command(name, python)
    print(f"[{name}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        noise = ("For simplicity, JAX has removed", "-----")
        lines = [line for line in done.stderr.strip().splitlines() if line.strip() and not line.startswith(noise)]
        raise SystemExit(f"[{name}] failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")
    report = json.loads(done.stdout)
    report["command"] = shlex.join(["python", *cmd[1:]])
    report["date"] = datetime.date.today().isoformat()
    return report


def load() -> dict:
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            return json.load(f)
    return {}


def _microbatch(report: dict) -> int:
    c, mesh = report["config"], report["mesh"]
    return c["batch_size"] // c["grad_accum"] // (mesh["data"] * mesh["expert"])


def _extras(config: dict) -> str:
    extras = [f"cf {config['capacity_factor']}" if config.get("capacity_factor") else "",
              f"attention chunk {config['attention_chunk']}" if config.get("attention_chunk") else ""]
    return ", ".join(e for e in extras if e) or "dropless"


def before_of(old: dict) -> dict:
    """What `before` keeps of a replaced measurement (its own `before` is dropped: one step of history)."""
    return {"hbm_gib": old["hbm_gib"], "fits": old["fits"], "microbatch": _microbatch(old),
            "seq_len": old["config"]["seq_len"], "extras": _extras(old["config"]), "command": old["command"],
            "date": old["date"], "flops_over_model": old.get("flops_over_model")}


def markdown(results: dict) -> str:
    lines = ["| preset | target | mesh | remat | microbatch / device | per-device memory (XLA) | before | plan | "
             "compile | host peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = results.get(name)
        if r is None:
            continue
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) + (" fsdp" if r["fsdp"] else "")
        c = r["config"]
        hbm = r["hbm_gib"]
        memory = (f"{hbm['total']:.1f} of {hbm['capacity']:g} GiB" if r["fits"] else
                  f"does not fit: {hbm.get('temporaries', 0):.1f} GiB temporaries > {hbm.get('available', 0):g}")
        b = r.get("before")
        before = (f"{b['hbm_gib']['total']:.1f} GiB at {b['microbatch']} x {b['seq_len']} ({b['extras']}, "
                  f"{b['date']})" if b else "-")
        preset, label = name.split("/")
        lines.append(f"| {preset} | {label} (`{r['target']}`, {r['devices']} x {r['device_kind']}) | {mesh} | "
                     f"{c['remat']} | {_microbatch(r)} x {c['seq_len']} ({_extras(c)}) | "
                     f"{memory} | {before} | {r['plan_gib']['total']:.1f} GiB | {r['compile_s']:.0f} s | "
                     f"{r.get('host_peak_rss_gib', float('nan')):.1f} GiB |")
    lines.append("")
    lines += [f"- `{name}`: `{results[name]['command']}` ({results[name]['date']})" for name in ROWS if name in results]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", action="append", choices=sorted(ROWS), help="row(s) to (re)measure")
    p.add_argument("--list", action="store_true", help="print the rows and their commands")
    p.add_argument("--markdown", action="store_true", help="print the table from the saved results")
    p.add_argument("--python-tpu", default=os.path.join(ROOT, ".venv-tpu", "bin", "python"))
    p.add_argument("--python-gpu", default=os.path.join(ROOT, ".venv-gpu", "bin", "python"))
    args = p.parse_args(argv)
    if args.list:
        for name in ROWS:
            print(name, shlex.join(command(name, "python")[1:]))
        return 0
    if args.row:
        for name in args.row:
            report = run_row(name, args)
            results = load()  # re-read: rows may be measured by several invocations
            old = results.get(name)
            if old is not None:
                # the baseline is kept through later re-measurements (the table's "before" column)
                report["before"] = old.get("before") or (None if old["command"] == report["command"]
                                                         else before_of(old))
            results[name] = report
            os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
            with open(RESULTS, "w") as f:
                json.dump(results, f, indent=1, sort_keys=True)
            print(json.dumps({name: {k: report[k] for k in ("fits", "hbm_gib", "compile_s")}}), flush=True)
    if args.markdown:
        print(markdown(load()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
