"""`data.tokenizer`: training, resuming and generating with a tokenizer the user brings (any HF tokenizer.json),
here one the test builds itself: a byte-level BPE whose end-of-text token is `</s>`, named in a
tokenizer_config.json beside it as HF hub checkpoints do. The corpus is a Parquet file (text in a `content`
column, several row groups), the case a researcher with their own data has: a run on it is SIGKILLed, resumes
exactly, and generate decodes with the run's tokenizer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from cli_support import REPO, checkpoint_steps, cli_env, metrics, run_cli, stdlib_corpus
from dsv3_jax.data.tokenizer import Tokenizer

CORPUS_FILES = ("argparse.py", "textwrap.py", "string.py")


def build_tokenizer(directory: Path, texts: list[str], vocab_size: int) -> Path:
    """A tokenizer.json with <s>, </s> and <pad> specials (ids 0-2) and a tokenizer_config.json naming </s>."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tok.to_str())
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    return directory


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("given_tokenizer")
    texts = [p.read_text() for p in sorted(stdlib_corpus(root / "modules", CORPUS_FILES).iterdir())]
    # One row per paragraph-ish block, three row groups: the reader's row-group path and row keys are exercised.
    rows = [block for text in texts for block in text.split("\n\n") if block.strip()]
    (root / "corpus").mkdir()
    pq.write_table(pa.table({"id": list(range(len(rows))), "content": rows}), root / "corpus" / "part-0.parquet",
                   row_group_size=len(rows) // 3 + 1)
    build_tokenizer(root / "tok", texts, vocab_size=400)
    return root


def _train_args(workdir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--run-dir", str(run_dir), "--corpus",
            f"files:{workdir}/corpus/*.parquet", "--no-progress", "--set", "train.steps=6",
            "--set", "train.checkpoint_every=2", "--set", "train.eval_every=2",
            "--set", f"data.cache_dir={workdir / 'data_cache'}", "--set", "data.text_field=content",
            "--set", f"data.tokenizer={workdir / 'tok'}", *extra]


def _train(workdir: Path, run_dir: Path, *extra: str):
    return run_cli(_train_args(workdir, run_dir, *extra), workdir)


def test_the_end_of_text_token_comes_from_the_tokenizer_config(workdir, tmp_path):
    tok = Tokenizer(workdir / "tok" / "tokenizer.json")
    assert (tok.eos_token, tok.eos_id, tok.vocab_size) == ("</s>", 1, 400)
    bare = tmp_path / "bare"  # no config: </s> is still found among the common names
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((workdir / "tok" / "tokenizer.json").read_bytes())
    assert Tokenizer(bare / "tokenizer.json").eos_token == "</s>"
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="eos_token '<|nope|>' is not a token of"):
        Tokenizer(bare / "tokenizer.json")


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused_before_anything(workdir):
    run_dir, cache = workdir / "too_small", workdir / "too_small_cache"
    proc = _train(workdir, run_dir, "--set", f"data.cache_dir={cache}")  # tiny has 304 ids, the tokenizer 400
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "has 400 ids but model.vocab_size is 304: set --set model.vocab_size=400" in proc.stderr
    assert not checkpoint_steps(run_dir)
    assert not (cache / "tokens").exists() and not (cache / "tokenizers").exists()  # nothing encoded or trained


def test_missing_tokenizer_path_is_a_config_error(workdir):
    proc = _train(workdir, workdir / "missing", "--set", f"data.tokenizer={workdir / 'nowhere'}")
    assert proc.returncode == 2
    assert f"data.tokenizer: no tokenizer.json at {workdir / 'nowhere'}" in proc.stderr


def test_train_resume_and_generate_with_the_given_tokenizer(workdir):
    run_dir = workdir / "run"
    proc = _train(workdir, run_dir, "--set", "model.vocab_size=400")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "end of text '</s>' = id 1, given" in proc.stderr
    record = json.loads((run_dir / "data.json").read_text())
    assert record["eos_id"] == 1 and record["tokenizer_vocab_size"] == 400
    assert (run_dir / "tokenizer.json").read_bytes() == (workdir / "tok" / "tokenizer.json").read_bytes()
    assert json.loads((run_dir / "tokenizer_config.json").read_text()) == {"eos_token": "</s>"}
    # the finished run reopens with its own copy (same hash as the data record) and has nothing left to do
    proc = _train(workdir, run_dir, "--set", "model.vocab_size=400")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # generate decodes with the run's copy
    proc = run_cli(["generate", "--run-dir", str(run_dir), "--prompt", "def parse(self", "--max-new", "8",
                    "--json"], workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    tok = Tokenizer(run_dir / "tokenizer.json")
    assert all(i < 400 for i in out["tokens"][0]) and out["texts"][0] == tok.decode(out["tokens"][0])


def test_a_sigkilled_run_on_parquet_resumes_to_the_uninterrupted_metrics(workdir):
    reference = workdir / "run"
    if not (reference / "metrics.jsonl").exists():
        assert _train(workdir, reference, "--set", "model.vocab_size=400").returncode == 0
    run_dir = workdir / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dsv3_jax", *_train_args(workdir, run_dir, "--set",
                                                                           "model.vocab_size=400")],
                            cwd=REPO, env=cli_env(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = run_dir / "metrics.jsonl", time.time() + 300
    try:
        while time.time() < deadline:  # past the step-2 checkpoint, before the end
            if log.exists() and sum(1 for _ in log.open()) >= 4 and (run_dir / "checkpoints" / "2").exists():
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert checkpoint_steps(run_dir)[-1] < 6
    resumed = _train(workdir, run_dir, "--set", "model.vocab_size=400")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "the run's own" in resumed.stderr
    assert metrics(run_dir) == metrics(reference)
