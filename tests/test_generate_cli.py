"""`python -m dsv3_jax generate` end to end: on a tiny run trained through the CLI, and on an HF fixture;
bad arguments fail with one `error:` line (exit 2) before any checkpoint is read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dsv3_jax import cli

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "hf" / "qlora_groups"


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return env


def _run(args: list[str], root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3_jax", *args], cwd=REPO, env=_env(root), capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(root, run dir): the tiny preset trained for a few steps on a few stdlib modules, through the CLI."""
    root = tmp_path_factory.mktemp("generate_e2e")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "textwrap.py", "string.py", "fractions.py"):
        shutil.copy(stdlib / name, corpus / (name + ".txt"))
    run_dir = root / "run"
    proc = _run(["train", "--preset", "tiny", "--run-dir", str(run_dir), "--corpus", f"files:{corpus}/*.txt",
                 "--no-progress", "--set", "model.vocab_size=512", "--set", "train.steps=6",
                 "--set", "train.checkpoint_every=3", "--set", "train.eval_every=6",
                 "--set", f"data.cache_dir={root / 'data_cache'}"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run_dir


def test_generate_streams_text_from_a_trained_run(tiny_run):
    root, run_dir = tiny_run
    proc = _run(["generate", "--run-dir", str(run_dir), "--prompt", "def parse(self", "--max-new", "12",
                 "--ignore-eos"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("def parse(self") and len(proc.stdout) > len("def parse(self\n")
    assert "tokens/s" in proc.stderr and "step 6" in proc.stderr


def test_speculative_cli_matches_plain_greedy_and_reports_acceptance(tiny_run):
    root, run_dir = tiny_run
    common = ["generate", "--run-dir", str(run_dir), "--prompt", "import os\n", "--prompt", "x = ",
              "--max-new", "10", "--ignore-eos", "--json"]
    plain = _run(common, root)
    spec = _run([*common, "--speculative"], root)
    assert plain.returncode == 0 and spec.returncode == 0, (plain.stderr[-2000:], spec.stderr[-2000:])
    plain_out, spec_out = json.loads(plain.stdout), json.loads(spec.stdout)
    assert spec_out["tokens"] == plain_out["tokens"] and all(len(t) == 10 for t in plain_out["tokens"])
    assert spec_out["texts"] == plain_out["texts"]
    assert 0 <= spec_out["acceptance_rate"] <= 1 and spec_out["drafted"] > 0
    assert "acceptance rate" in spec.stderr


def test_generate_from_hf_fixture_prints_ids(tmp_path):
    proc = _run(["generate", "--hf", str(FIXTURE), "--prompt-ids", "1,2,3", "--max-new", "6", "--ignore-eos"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = [int(t) for t in proc.stdout.strip().split(",")]
    assert len(ids) == 6 and all(0 <= t < 256 for t in ids)


@pytest.mark.parametrize("args,message", [
    (["--run-dir", "/nonexistent/run", "--prompt", "hi"], "does not exist"),
    (["--hf", str(FIXTURE), "--prompt-ids", "1,2", "--max-new", "0"], "--max-new must be >= 1"),
    (["--hf", str(FIXTURE), "--prompt", ""], "empty --prompt"),
    (["--hf", str(FIXTURE), "--prompt", "hello"], "no tokenizer.json"),
    (["--hf", str(FIXTURE), "--prompt-ids", "1,x"], "comma-separated integers"),
    (["--hf", str(FIXTURE), "--prompt-ids", "1,2,3,4,5,6,7,8,9", "--cache-len", "8"], "does not fit the cache"),
    (["--hf", str(FIXTURE), "--prompt-ids", "1,2", "--top-p", "0"], "top_p"),
])
def test_bad_arguments_fail_fast(args, message, capsys):
    assert cli.main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_long_prompt_and_checkpointless_run_dir_fail_fast(tiny_run, tmp_path, capsys):
    _, run_dir = tiny_run
    assert cli.main(["generate", "--run-dir", str(run_dir), "--prompt", "a" * 100, "--max-new", "10",
                     "--cache-len", "64"]) == 2
    assert "does not fit the cache" in capsys.readouterr().err
    (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
    assert cli.main(["generate", "--run-dir", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
