"""Hostile inputs, as a careless operator gives them: each row is (what is set up, the command, the expected
class of outcome). `error` rows must exit 2 with one `error:` line containing the text given and no
traceback, and leave every file that was there untouched. Later issues extend the table (issue 33's sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_support import run_cli, tree_snapshot
from dsv3_jax.config import get_preset
from dsv3_jax.train.config import Config

TRAIN = ["train", "--preset", "tiny", "--no-progress", "--set", "train.steps=2"]


def _foreign_folder(root: Path) -> Path:
    """A user's own folder: a tokenizer and a metrics file that are not a run's."""
    folder = root / "mine"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"mine": true}')
    (folder / "metrics.jsonl").write_text('{"my": "record"}\n')
    return folder


def _checkpoints_is_a_file(root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(Config(model=get_preset("tiny")).to_json())
    (run / "checkpoints").write_text("not a directory")
    return run


def _checkpoints_deleted(root: Path) -> Path:
    """A run that trained to step 4 whose checkpoints directory was deleted."""
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(Config(model=get_preset("tiny")).to_json())
    (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 5.0}) + "\n"
                                               for s in range(1, 5)))
    return run


def _a_file(root: Path) -> Path:
    path = root / "file.txt"
    path.write_text("text")
    return path


def _run_config_file(root: Path) -> Path:
    path = root / "config.json"
    path.write_text("{}")
    return path


def _docs(root: Path) -> Path:
    docs = root / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text("words the word-level tokenizer has never seen, " * 200)
    return docs


def _no_unk_tokenizer(root: Path) -> Path:
    """A word-level tokenizer.json of the tiny model's 304 ids with no unknown token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 304)}}
    tokenizer = Tokenizer(models.WordLevel(words))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    _docs(root)
    tokenizer.save(str(root / "wl.json"))
    return root


CASES = [
    # (id, setup -> path, command given the path, expected error text)
    ("foreign folder as run dir", _foreign_folder, lambda p: [*TRAIN, "--run-dir", str(p)],
     "is not a dsv3_jax run directory"),
    ("checkpoints deleted, history kept", _checkpoints_deleted,
     lambda p: ["train", "--run-dir", str(p), "--no-progress"], "holds a run that trained to step 4"),
    ("run dir is a file", _a_file, lambda p: [*TRAIN, "--run-dir", str(p)], "exists and is not a directory"),
    ("empty run dir argument", lambda root: root, lambda p: [*TRAIN, "--run-dir", ""], "--run-dir is empty"),
    ("checkpoints is a file", _checkpoints_is_a_file, lambda p: ["train", "--run-dir", str(p), "--no-progress"],
     "checkpoints' is not a directory"),
    ("cache longer than the model's positions", lambda root: root,
     lambda p: ["generate", "--hf", str(Path(__file__).parent / "fixtures" / "hf" / "qlora_groups"), "--prompt-ids", "1,2",
                "--cache-len", "100000000"], "--cache-len must be an integer in [1,"),
    ("--dtype with a run", lambda root: root,
     lambda p: ["generate", "--run-dir", str(p / "run"), "--prompt-ids", "1", "--dtype", "bfloat16"],
     "--dtype applies to --hf only"),
    ("--hf names a file", _run_config_file, lambda p: ["generate", "--hf", str(p), "--prompt-ids", "1"],
     "is a file: give the checkpoint directory"),
    ("word-level tokenizer without an unknown token", _no_unk_tokenizer,
     lambda p: ["prepare", "--preset", "tiny", "--corpus", f"files:{p}/docs/*.txt", "--no-progress",
                "--set", f"data.tokenizer={p}/wl.json", "--set", f"data.cache_dir={p}/cache"],
     "this tokenizer cannot encode the text"),
]


@pytest.mark.parametrize("setup, command, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_changes_nothing(tmp_path, setup, command, expected):
    path = setup(tmp_path)
    before = tree_snapshot(tmp_path)
    done = run_cli(command(path), tmp_path, timeout=300)
    after = tree_snapshot(tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")], done.stderr[-2000:]
    # nothing that was there changed (the CLI's compile cache and the data cache are ignored here)
    assert {k: v for k, v in after.items() if not k.startswith(("jax_cache", "cache"))} == before
    if (tmp_path / "mine").exists():
        assert json.loads((tmp_path / "mine" / "tokenizer.json").read_text()) == {"mine": True}


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_metrics_file_lost_mid_run_stops_at_the_next_write(tmp_path, how):
    """`rm RUN/metrics.jsonl` during a run used to send every later record into the unlinked file; now the next
    write stops the run with one line (RunDirError), and a replaced file is never written into either."""
    from dsv3_jax.rundir import RunDirError
    from dsv3_jax.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path)
    writer.write({"kind": "train", "step": 1, "loss": 1.0})
    (tmp_path / "metrics.jsonl").unlink()
    if how == "replaced":
        (tmp_path / "metrics.jsonl").write_text('{"someone": "else"}\n')
    with pytest.raises(RunDirError, match="metrics.jsonl was deleted or replaced"):
        writer.write({"kind": "train", "step": 2, "loss": 0.9})
    writer.close()
    if how == "replaced":
        assert (tmp_path / "metrics.jsonl").read_text() == '{"someone": "else"}\n'


def test_more_workers_than_cores_are_capped_with_a_note(tmp_path):
    docs = _docs(tmp_path)
    done = run_cli(["prepare", "--preset", "tiny", "--corpus", f"files:{docs}/*.txt", "--no-progress",
                    "--set", "data.workers=1000", "--set", f"data.cache_dir={tmp_path}/cache"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data.workers=1000 is more than this machine's" in done.stderr

