"""`python -m dsv3_jax generate` end to end: on a tiny run trained through the CLI, and on an HF fixture;
bad arguments fail with one `error:` line (exit 2) before any checkpoint is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import REPO, run_cli, stdlib_corpus

from dsv3_jax import cli

FIXTURE = REPO / "tests" / "fixtures" / "hf" / "qlora_groups"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(root, run dir): the tiny preset trained for a few steps on a few stdlib modules, through the CLI."""
    root = tmp_path_factory.mktemp("generate_e2e")
    corpus = stdlib_corpus(root / "corpus", ("argparse.py", "textwrap.py", "string.py", "fractions.py"))
    run_dir = root / "run"
    proc = run_cli(["train", "--preset", "tiny", "--run-dir", str(run_dir), "--corpus", f"files:{corpus}/*.txt",
                 "--no-progress", "--set", "model.vocab_size=512", "--set", "train.steps=6",
                 "--set", "train.checkpoint_every=3", "--set", "train.eval_every=6",
                 "--set", f"data.cache_dir={root / 'data_cache'}"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run_dir


def test_generate_streams_text_from_a_trained_run(tiny_run):
    root, run_dir = tiny_run
    proc = run_cli(["generate", "--run-dir", str(run_dir), "--prompt", "def parse(self", "--max-new", "12",
                 "--ignore-eos"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("def parse(self") and len(proc.stdout) > len("def parse(self\n")
    assert "tokens/s" in proc.stderr and "step 6" in proc.stderr


def test_speculative_cli_matches_plain_greedy_and_reports_acceptance(tiny_run):
    root, run_dir = tiny_run
    common = ["generate", "--run-dir", str(run_dir), "--prompt", "import os\n", "--prompt", "x = ",
              "--max-new", "10", "--ignore-eos", "--json"]
    plain = run_cli(common, root)
    spec = run_cli([*common, "--speculative"], root)
    assert plain.returncode == 0 and spec.returncode == 0, (plain.stderr[-2000:], spec.stderr[-2000:])
    plain_out, spec_out = json.loads(plain.stdout), json.loads(spec.stdout)
    assert spec_out["tokens"] == plain_out["tokens"] and all(len(t) == 10 for t in plain_out["tokens"])
    assert spec_out["texts"] == plain_out["texts"]
    assert 0 <= spec_out["acceptance_rate"] <= 1 and spec_out["drafted"] > 0
    assert "acceptance rate" in spec.stderr


def test_generate_from_hf_fixture_prints_ids(tmp_path):
    proc = run_cli(["generate", "--hf", str(FIXTURE), "--prompt-ids", "1,2,3", "--max-new", "6", "--ignore-eos"],
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


def test_generate_uses_the_runs_own_tokenizer_after_the_corpus_changes(tiny_run, capsys):
    """A file added to the run's `files:` glob after training must not change how generate encodes (it used to
    retrain the tokenizer on the new corpus: 204 of 512 ids decoded differently)."""
    from dsv3_jax.loading import run_config, run_tokenizer

    root, run_dir = tiny_run
    before = sorted((root / "data_cache" / "tokenizers").iterdir())
    extra = root / "corpus" / "extra.txt"
    extra.write_text("a brand new document that would change a retrained tokenizer\n" * 200)
    try:
        tokenizer = run_tokenizer(run_dir, run_config(run_dir))
        assert tokenizer.path == run_dir / "tokenizer.json"
        assert tokenizer.hash == json.loads((run_dir / "data.json").read_text())["tokenizer_hash"]
        assert cli.main(["generate", "--run-dir", str(run_dir), "--prompt-ids", "1,2", "--max-new", "1",
                         "--cache-len", "2"]) == 2  # fails on the cache, after the tokenizer was loaded
        assert "rebuilding the tokenizer" not in capsys.readouterr().err
    finally:
        extra.unlink()
    assert sorted((root / "data_cache" / "tokenizers").iterdir()) == before  # nothing was retrained
