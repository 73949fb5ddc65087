"""Does the suite still catch real bugs? Five deliberate, silent breaks of the model and the trainer, each applied
to a scratch copy of the repository, each followed by the test files that guard that code. Every break must turn
at least one test red; the script prints one JSON record per break (the failing tests) and exits 1 if a break
went unnoticed. Run it after changing how the suite is organised (merged tests, shared fixtures, parallelism):

    .venv/bin/python tests/deliberate_breaks.py [--only NAME] [--workers 2]

It reuses the repository's compilation cache (.cache/jax), so the unbroken programs are not compiled again."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from compile_cache import cache_dir  # noqa: E402 - the suite's own cache folder


@dataclass(frozen=True)
class Break:
    name: str
    path: str  # file of the package to break
    original: str  # must occur exactly once
    broken: str
    guards: tuple[str, ...]  # test files expected to catch it
    what: str


BREAKS = (
    Break("mla_attention", "dsv3_jax/mla.py",
          "causal_TS = jnp.tril(jnp.ones((seq_len, seq_len), bool))",
          "causal_TS = jnp.tril(jnp.ones((seq_len, seq_len), bool), k=1)",
          ("tests/test_mla.py", "tests/test_parity_hf.py"),
          "the causal mask lets every query see one future key"),
    Break("moe_routing", "dsv3_jax/moe.py",
          "_, topk_idx_NK = jax.lax.top_k(biased_NE, cfg.num_experts_per_tok)",
          "_, topk_idx_NK = jax.lax.top_k(jnp.where(jnp.isfinite(biased_NE), scores_NE, -jnp.inf), "
          "cfg.num_experts_per_tok)",
          ("tests/test_moe.py", "tests/test_parity_hf.py"),
          "top-k selection ignores the balance bias (the group limit still applies)"),
    Break("balance_bias_update", "dsv3_jax/train/balance.py",
          "jnp.sign(mean - counts_E)", "jnp.sign(counts_E - mean)",
          ("tests/test_train_step.py",),
          "the bias update's sign is flipped: overloaded experts become more attractive"),
    Break("checkpoint_resume", "dsv3_jax/train/trainer.py",
          "        train_iter.set_state(data_state)\n", "        pass  # data iterator state dropped\n",
          ("tests/test_train_e2e.py",),
          "a resumed run restarts the data iterator instead of restoring its saved position"),
    Break("hf_import", "dsv3_jax/convert.py",
          "for j, tensor in enumerate(_expanded(name, kind, cfg)):\n            out[j] = ckpt.read(tensor, block).T",
          "for j, tensor in enumerate(reversed(_expanded(name, kind, cfg))):\n            out[j] = ckpt.read(tensor, "
          "block).T",
          ("tests/test_convert.py", "tests/test_parity_hf.py"),
          "routed experts are imported in reverse order (every shape still matches)"),
)


def scratch_copy(destination: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the repository, as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def apply(root: Path, brk: Break) -> None:
    path = root / brk.path
    text = path.read_text()
    if text.count(brk.original) != 1:
        raise SystemExit(f"error: {brk.name}: the line to break occurs {text.count(brk.original)} times in "
                         f"{brk.path} (expected once); update tests/deliberate_breaks.py")
    path.write_text(text.replace(brk.original, brk.broken))


def run_guards(root: Path, brk: Break, workers: int) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir()))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers),
                           "--dist", "loadfile", "-rf", *brk.guards], cwd=root, env=env, capture_output=True,
                          text=True)
    failed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return {"break": brk.name, "what": brk.what, "file": brk.path, "guards": list(brk.guards),
            "caught": proc.returncode == 1 and bool(failed), "failed_tests": failed, "summary": summary,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=[b.name for b in BREAKS], help="one break instead of all five")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    args = parser.parse_args()
    missed = 0
    for brk in BREAKS:
        if args.only and brk.name != args.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"break_{brk.name}_") as tmp:
            root = Path(tmp)
            scratch_copy(root)
            apply(root, brk)
            record = run_guards(root, brk, args.workers)
        missed += not record["caught"]
        print(json.dumps(record), flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
