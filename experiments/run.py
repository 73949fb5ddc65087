"""Run an experiment: `python -m experiments.run NAME [--scale cpu|long|gpu] [--variant V] [--seed S]`.

For every selected variant and seed it calls the real CLI,
    python -m dsv3_jax train --preset P --corpus C --run-dir runs/experiments/NAME/VARIANT/seedS --set ...
then evaluates the final checkpoint on the whole validation split (`python -m experiments.full_eval`: the CLI's
eval, keeping the per-expert loads), copies
metrics.jsonl / config.json / loss.png / final_eval.json / run.json into experiments/results/NAME/VARIANT/seedS/
and redraws the experiment's comparison plots and summary (results/NAME/summary.{json,md}, *.png).
A finished run is not trained again (`--force` does); a variant with `same_as` reuses the other run.
`--code REF` runs the library as committed at git REF (extracted to runs/experiments/_code/SHA) instead of the
working tree, so results stay tied to a commit while the tree is being edited. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from dsv3_jax.rundir import RunDirLocked, RunLock, has_checkpoints
from experiments import collect, spec
from experiments.plots import PLOTTERS, load_series


def train_command(preset: str, corpus: str, run_dir: Path, overrides: list[str]) -> list[str]:
    """The CLI call that trains (or resumes) one run."""
    cmd = [sys.executable, "-m", "dsv3_jax", "train", "--preset", preset, "--corpus", corpus,
           "--run-dir", str(run_dir), "--no-progress"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def eval_command(run_dir: Path) -> list[str]:
    """The CLI's eval of a run's latest checkpoint on the whole validation split, keeping the expert loads."""
    return [sys.executable, "-m", "experiments.full_eval", "--run-dir", str(run_dir)]


def shell_line(cmd: list[str]) -> str:
    """A command as one would type it (python -m ..., overrides quoted only where a shell needs it)."""
    import shlex

    return " ".join(["python", *[shlex.quote(c) for c in cmd[1:]]])


class Code:
    """Where the library comes from: the working tree (None) or a commit extracted with `git archive`."""

    def __init__(self, ref: str | None = None):
        self.commit, self.path = None, None
        if ref is not None:
            self.commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
            if not self.commit:
                raise SystemExit(f"error: --code {ref!r} is not a git commit")
            self.path = spec.RUNS_DIR / "_code" / self.commit
            if not (self.path / "dsv3_jax").is_dir():
                self.path.mkdir(parents=True, exist_ok=True)
                archive = subprocess.run(["git", "archive", self.commit, "dsv3_jax"], capture_output=True, check=True)
                subprocess.run(["tar", "-x", "-C", str(self.path)], input=archive.stdout, check=True)
            sys.path.insert(0, str(self.path.resolve()))  # this process reads configs with the same code

    def command(self, cmd: list[str]) -> list[str]:
        # -P: do not put the working directory first on sys.path, so PYTHONPATH's snapshot wins over ./dsv3_jax
        return cmd if self.path is None else [cmd[0], "-P", *cmd[1:]]

    def env(self) -> dict[str, str] | None:
        # The snapshot first (its dsv3_jax wins), then the repository root for the experiments package.
        return None if self.path is None else {
            **os.environ, "PYTHONPATH": os.pathsep.join([str(self.path.resolve()), str(Path.cwd().resolve())])}

    def provenance(self) -> dict:
        """Commit and, for the working tree, the library files that differ from it (others edit the tree)."""
        if self.commit is not None:
            return {"commit": self.commit, "code": "git archive of the commit", "dsv3_jax_uncommitted": []}
        dirty = [line[3:] for line in _git("status", "--porcelain", "--", "dsv3_jax").splitlines()]
        return {"commit": _git("rev-parse", "HEAD"), "code": "working tree", "dsv3_jax_uncommitted": dirty}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _run_logged(cmd: list[str], log_path: Path, code: Code) -> tuple[int, float, str]:
    """Run `cmd`, echoing its output to the console and appending it to `log_path`; (rc, seconds, output)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {shell_line(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(code.command(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=code.env())
        out_lines = []
        interrupted = False
        while True:
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    out_lines.append(line)
                    print(line, end="", flush=True)
                rc = proc.wait()
                break
            except KeyboardInterrupt:
                # Ctrl-C reaches the trainer too (same process group), which stops after its step with a
                # checkpoint: keep reading its output until it exits (leaving now would close its pipe and kill
                # it mid-save). A SIGINT sent to the runner alone is passed on; the trainer ignores a repeat.
                interrupted = True
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
    if interrupted:
        raise RunnerInterrupted(rc, log_path)
    return rc, time.perf_counter() - start, "".join(out_lines)


class RunnerInterrupted(Exception):
    """Ctrl-C while a command ran; the command has exited (`returncode`), its output is in `log_path`."""

    def __init__(self, returncode: int, log_path: Path):
        super().__init__(f"interrupted; the command exited {returncode} (its output: {log_path})")
        self.returncode, self.log_path = returncode, log_path


def _last_json_object(text: str) -> dict:
    """The eval command prints data-preparation lines, then one JSON object: take the object."""
    start = text.rfind("\n{") + 1  # 0 when the object opens the text
    obj, _ = json.JSONDecoder().raw_decode(text[start:])  # raw_decode: log lines after the object are fine
    return obj


TRAIN_FIELDS = ("wall_s", "wall_s_source", "load_average_1m_at_end", "finished_at")  # kept when re-collecting
RESUMED_WALL = "runner, last invocation only (a resumed run: summary.json's train_seconds counts every step)"


def run_variant(exp: spec.Experiment, variant: spec.Variant, scale: str, seed: int, code: Code,
                force: bool = False, train: bool = True) -> Path | None:
    """Train (unless `train` is False) + evaluate + collect one (variant, seed); returns its results directory."""
    if variant.same_as is not None:  # run (or find) the source run under its own experiment's name
        src_exp_name, src_var_name = variant.source(exp.name)
        src_exp = spec.load(src_exp_name)
        return run_variant(src_exp, src_exp.variant(src_var_name), scale, seed, code, force, train)
    preset, corpus, overrides = spec.overrides_for(exp, variant, scale, seed)
    key = spec.run_key(exp.name, variant.name, scale, seed)
    run_dir, dest = spec.RUNS_DIR / key, spec.RESULTS_DIR / key
    train_cmd = train_command(preset, corpus, run_dir, overrides)
    previous = _previous_info(dest, overrides)
    if not force and previous is not None and _has_loads(dest):
        print(f"{key}: already collected in {dest} (use --force to run it again)")
        return dest
    if force and run_dir.exists():
        with RunLock(run_dir):  # RunDirLocked while a trainer is still writing it: never delete a live run
            shutil.rmtree(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if collect.finished(metrics_path, spec.planned_steps(exp, variant, scale, seed)):
        train_info = _earlier_train_info(previous, run_dir)
    elif not train:
        print(f"{key}: no finished run in {run_dir}; skipped (training is off)")
        return None
    else:
        resumed = has_checkpoints(run_dir)  # the trainer resumes from one; without one it starts at step 0
        rc, wall_s, _ = _run_logged(train_cmd, run_dir / "train.log", code)
        if rc != 0:
            raise SystemExit(f"{key}: training failed (exit {rc}); see {run_dir / 'train.log'}")
        train_info = {"wall_s": round(wall_s, 1), "wall_s_source": RESUMED_WALL if resumed else "runner",
                      "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                      "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    rc, eval_s, out = _run_logged(eval_command(run_dir), run_dir / "eval.log", code)
    if rc != 0:
        raise SystemExit(f"{key}: evaluation failed (exit {rc}); see {run_dir / 'eval.log'}")
    final_eval = _last_json_object(out)
    info = {"experiment": exp.name, "variant": variant.name, "scale": scale, "seed": seed, "preset": preset,
            "corpus": corpus, "overrides": overrides, "command": shell_line(train_cmd), **train_info,
            "eval_command": shell_line(eval_command(run_dir)), "eval_wall_s": round(eval_s, 1),
            "cpu_count": os.cpu_count(), "collected_at": time.strftime("%Y-%m-%d %H:%M:%S"), **code.provenance()}
    collect.collect_run(run_dir, dest, info, final_eval)
    print(f"{key}: collected in {dest} (val loss {final_eval['val_loss']:.4f}, "
          f"MaxVio_global {final_eval['maxvio_global']:.3f})")
    return dest


def _previous_info(dest: Path, overrides: list[str]) -> dict | None:
    """The run.json already collected for these exact overrides, if any."""
    path = dest / "run.json"
    if not path.is_file():
        return None
    info = collect.read_json(path)
    return info if info.get("overrides") == overrides else None


def _has_loads(dest: Path) -> bool:
    """Collected with the whole-split expert loads (older collections lack them and are re-evaluated)."""
    path = dest / "final_eval.json"
    return path.is_file() and "expert_load" in collect.read_json(path)


def _earlier_train_info(previous: dict | None, run_dir: Path) -> dict:
    """Training facts of a run finished before this invocation: from its earlier run.json, else file times."""
    if previous is not None and previous.get("wall_s") is not None:
        return {k: previous[k] for k in TRAIN_FIELDS if k in previous}
    wall_s = (run_dir / "metrics.jsonl").stat().st_mtime - (run_dir / "config.json").stat().st_mtime
    return {"wall_s": round(wall_s, 1), "wall_s_source": "file times (config.json written at start -> last metrics line)"}


def draw(exp: spec.Experiment, scale: str = "cpu", results_dir: Path | None = None,
         readme: Path | None = None) -> list[Path]:
    """Summary (json + md) and every comparison plot of the experiment from whatever results exist.

    The table is also written into `readme` (default: experiments/README.md when drawing the committed
    results) between its `<!-- summary:NAME[:SCALE] -->` markers, so the README never shows stale numbers."""
    if readme is None and results_dir is None:
        readme = spec.EXPERIMENTS_DIR / "README.md"
    results_dir = spec.RESULTS_DIR if results_dir is None else results_dir
    out_dir = results_dir / spec.experiment_dir(exp.name, scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = collect.summarize_experiment(exp, scale, results_dir)
    collect.write_json(out_dir / "summary.json", summary)
    table = collect.markdown_table(summary)
    (out_dir / "summary.md").write_text(f"# {exp.title} ({scale} scale)\n\n" + table)
    if readme is not None and readme.is_file():
        marker = exp.name if scale == "cpu" else f"{exp.name}:{scale}"
        text = readme.read_text()
        updated = collect.replace_marked_block(text, f"summary:{marker}", table)
        if updated != text:
            readme.write_text(updated)
    runs = collect.variant_runs(exp, scale, results_dir)
    series = load_series(runs, {v.name: v.label for v in exp.variants})
    written = [out_dir / "summary.json", out_dir / "summary.md"]
    if series:
        for kind in exp.plots:
            written.append(PLOTTERS[kind](series, out_dir / f"{kind}.png", exp.title))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"experiments: {', '.join(spec.available())}; planned (no config yet): {', '.join(sorted(spec.PLANNED))}")
    parser.add_argument("name", help="experiment name (a file in experiments/configs/)")
    parser.add_argument("--scale", choices=sorted(spec.SCALES), default="cpu")
    parser.add_argument("--variant", action="append", help="only this variant (repeatable; default: all)")
    parser.add_argument("--seed", action="append", type=int, help="these seeds (repeatable; default: the variant's)")
    parser.add_argument("--force", action="store_true", help="train again even if results exist")
    parser.add_argument("--code", metavar="REF", default=None,
                        help="run the library as committed at this git ref (default: the working tree)")
    parser.add_argument("--plots-only", action="store_true", help="only redraw plots and summary from results")
    parser.add_argument("--collect-only", action="store_true",
                        help="train nothing: evaluate and collect the runs already finished under runs/experiments")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        exp = spec.load(args.name)
        variants = [exp.variant(v) for v in args.variant] if args.variant else list(exp.variants)
    except spec.SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.plots_only:
        code = Code(None if args.dry_run else args.code)
        for variant in variants:
            for seed in args.seed or variant.seeds_for(args.scale):
                if args.dry_run:
                    preset, corpus, overrides = spec.overrides_for(exp, variant, args.scale, seed)
                    src = spec.run_key(*variant.source(exp.name), args.scale, seed)
                    print(shell_line(train_command(preset, corpus, spec.RUNS_DIR / src, overrides)))
                    continue
                try:
                    run_variant(exp, variant, args.scale, seed, code, args.force, train=not args.collect_only)
                except RunDirLocked as err:  # --force on a run another process is training
                    print(f"error: {err}", file=sys.stderr)
                    return 2
                except RunnerInterrupted as stop:
                    print(f"{stop}; run the same command again to resume", file=sys.stderr)
                    return 130
    if not args.dry_run:
        for path in draw(exp, args.scale):
            print(f"wrote {path}")
    return 0


def _main_cli() -> int:
    """`main` with Ctrl-C outside a running command (between runs, while collecting or plotting) as one line."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_main_cli())
