"""`train --init-from HF_DIR` end to end: a conversion (steps=0) writes the published weights as the run's step-0
checkpoint and records their source; `eval` and `generate` read that run; fine-tuning from the checkpoint
lowers the loss on its training text; bad arguments get one line and write nothing."""

import json
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from cli_support import checkpoint_steps, metrics, run_cli, stdlib_corpus
from dsv3_jax.config import get_preset
from dsv3_jax.convert import from_hf, to_hf
from dsv3_jax.model import DeepSeekV3

SMALL_RUN = ["--set", "train.seq_len=32", "--set", "train.batch_size=8", "--no-progress"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    model = DeepSeekV3(get_preset("tiny"), nnx.Rngs(params=0))
    to_hf(model, root / "hf", max_shard_bytes=300_000)
    corpus = stdlib_corpus(root / "docs", ("argparse.py", "inspect.py", "typing.py"))
    return root, root / "hf", f"files:{corpus}/*.txt"


def test_conversion_then_eval_and_generate(published):
    root, hf, corpus = published
    run = root / "converted"
    done = run_cli(["train", "--init-from", str(hf), "--run-dir", str(run), "--corpus", corpus,
                    "--set", "train.steps=0", *SMALL_RUN], root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert checkpoint_steps(run) == [0]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["init_from"] == str(hf.resolve()) and len(saved["train"]["init_from_sha256"]) == 64
    # the step-0 checkpoint holds from_hf's parameters
    from dsv3_jax.loading import load_run
    model = load_run(run, with_tokenizer=False).model
    _, reference = from_hf(hf)
    want = jax.tree.leaves(nnx.state(reference, nnx.Param))
    got = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    evaluated = run_cli(["eval", "--run-dir", str(run)], root)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    generated = run_cli(["generate", "--run-dir", str(run), "--prompt", "def ", "--max-new", "4"], root)
    assert generated.returncode == 0, generated.stderr[-2000:]


def test_fine_tuning_lowers_the_loss(published):
    root, hf, corpus = published
    run = root / "tuned"
    done = run_cli(["train", "--init-from", str(hf), "--run-dir", str(run), "--corpus", corpus,
                    "--set", "train.steps=10", "--set", "train.warmup_frac=0", "--set", "train.eval_every=10",
                    *SMALL_RUN], root)
    assert done.returncode == 0, done.stderr[-2000:]
    losses = [r["loss"] for r in metrics(run) if r.get("kind") == "train"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("extra, message", [
    (["--preset", "tiny"], "--preset: --init-from takes the model from HF_DIR/config.json"),
    (["--set", "model.hidden_size=64"], "model.hidden_size: is part of the published model's shape"),
    (["--set", "train.steps=-1"], "train.steps: must be an integer >= 0"),
])
def test_bad_arguments_write_nothing(published, extra, message):
    root, hf, corpus = published
    run = root / "refused"
    done = run_cli(["train", "--init-from", str(hf), "--run-dir", str(run), "--corpus", corpus, *SMALL_RUN,
                    *extra], root)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not run.exists()


def test_missing_directory_and_foreign_resume(published, tmp_path):
    root, hf, corpus = published
    done = run_cli(["train", "--init-from", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r"),
                    *SMALL_RUN], root)
    assert done.returncode != 0 and "--init-from: " in done.stderr and "is not a directory" in done.stderr
    # a run started from random weights is not resumed as one started from the checkpoint
    scratch = tmp_path / "scratch"
    first = run_cli(["train", "--preset", "tiny", "--run-dir", str(scratch), "--corpus", corpus,
                     "--set", "train.steps=1", *SMALL_RUN], root)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(["train", "--init-from", str(hf), "--run-dir", str(scratch), *SMALL_RUN], root)
    assert again.returncode != 0 and "is a run started from a random initialisation" in again.stderr


def _same_tensors(a_dir, b_dir, exact: bool = True):
    from dsv3_jax.safetensors_io import SafetensorsDir
    a, b = SafetensorsDir(a_dir), SafetensorsDir(b_dir)
    assert set(a.entries) == set(b.entries), sorted(set(a.entries) ^ set(b.entries))[:5]
    for name in a.entries:
        if exact:
            assert a.entries[name].dtype == b.entries[name].dtype, name
            np.testing.assert_array_equal(a.read(name).view(np.uint8), b.read(name).view(np.uint8), err_msg=name)
        else:
            np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)


def test_round_trip_is_bitwise_and_the_export_loads(published):
    """HF (bf16) -> --init-from with steps=0 -> export: every tensor bitwise the input's; the export is an HF
    directory `generate --hf` reads; an FP8 export of the same run dequantises to what an FP8 to_hf writes."""
    root, hf, corpus = published
    run = root / "round_trip"
    done = run_cli(["train", "--init-from", str(hf), "--run-dir", str(run), "--corpus", corpus,
                    "--set", "train.steps=0", *SMALL_RUN], root)
    assert done.returncode == 0, done.stderr[-2000:]
    out = root / "exported"
    exported = run_cli(["export", "--run-dir", str(run), "--out", str(out), "--max-shard-gb", "0.0001"], root)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "exported step 0" in exported.stdout
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "tokenizer.json").is_file()
    _same_tensors(hf, out)
    generated = run_cli(["generate", "--hf", str(out), "--prompt", "def ", "--max-new", "4"], root)
    assert generated.returncode == 0, generated.stderr[-2000:]
    fp8_out = root / "exported_fp8"
    assert run_cli(["export", "--run-dir", str(run), "--out", str(fp8_out), "--fp8"], root).returncode == 0
    reference = root / "reference_fp8"
    _, model = from_hf(hf)
    to_hf(model, reference, fp8=True)
    _same_tensors(reference, fp8_out, exact=False)


def test_export_refusals_write_nothing(published, tmp_path):
    root, hf, corpus = published
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep me")
    refused = run_cli(["export", "--run-dir", str(tmp_path / "no_run"), "--out", str(tmp_path / "o")], root)
    assert refused.returncode == 2 and "error:" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "o").exists()
    run = root / "converted"  # from test_conversion_then_eval_and_generate, or made here
    if not run.exists():
        assert run_cli(["train", "--init-from", str(hf), "--run-dir", str(run), "--corpus", corpus,
                        "--set", "train.steps=0", *SMALL_RUN], root).returncode == 0
    refused = run_cli(["export", "--run-dir", str(run), "--out", str(occupied)], root)
    assert refused.returncode == 2 and "is not an empty directory" in refused.stderr
    assert [p.name for p in occupied.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("damage, message", [("truncated", "truncated"), ("dtype", "unsupported dtype")])
def test_damaged_checkpoint_is_one_line_and_nothing_is_written(published, tmp_path, damage, message):
    root, hf, corpus = published
    broken = tmp_path / "hf"
    import shutil
    shutil.copytree(hf, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        data = data[:-100]
    else:  # one tensor's dtype renamed in the header, offsets unchanged
        at = data.find(b'"BF16"')
        data[at:at + 6] = b'"I16 "'
    shard.write_bytes(bytes(data))
    run = tmp_path / "run"
    done = run_cli(["train", "--init-from", str(broken), "--run-dir", str(run), "--corpus", corpus, *SMALL_RUN],
                   root)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not run.exists()


def test_a_conversion_trains_on_with_a_fresh_optimizer(published, tmp_path):
    """The step-0 checkpoint of a conversion holds weights only; `train --run-dir` continues from it (steps
    raised with --set) with a fresh optimizer state, and the run's loss starts where the weights put it."""
    root, hf, corpus = published
    run = tmp_path / "converted"
    assert run_cli(["train", "--init-from", str(hf), "--run-dir", str(run), "--corpus", corpus,
                    "--set", "train.steps=0", *SMALL_RUN], root).returncode == 0
    assert not (run / "checkpoints" / "0" / "state" / "_METADATA").read_text().count("opt_state")
    more = run_cli(["train", "--run-dir", str(run), "--set", "train.steps=2", "--no-progress"], root)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "from step 0" in more.stderr and checkpoint_steps(run)[-1] == 2


def test_two_processes_export_their_shares(published, tmp_path):
    """`export` as a 2-process job: each process writes every other shard file, process 0 the config and
    index; the directory equals a one-process export of the same run, tensor for tensor."""
    import socket

    from cli_support import cli_env, run_together

    root, hf, corpus = published
    run = tmp_path / "converted"
    assert run_cli(["train", "--init-from", str(hf), "--run-dir", str(run), "--corpus", corpus,
                    "--set", "train.steps=0", *SMALL_RUN], root).returncode == 0
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    env = cli_env(root)
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if "device_count" not in f)
    results = run_together([[sys.executable, "-m", "dsv3_jax", "export", "--run-dir", str(run), "--out", str(out),
                             "--max-shard-gb", "0.0001", "--distributed", "--coordinator", f"localhost:{port}",
                             "--num-processes", "2", "--process-id", str(i)] for i in range(2)], env)
    for code, _, err in results:
        assert code == 0, err[-2000:]
    assert "exported step 0" in results[0][1] and "exported" not in results[1][1]
    assert "process 1 wrote 1 of the 2 shard files" in results[1][2]
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2  # one at least from each process
    one = tmp_path / "one"
    assert run_cli(["export", "--run-dir", str(run), "--out", str(one), "--max-shard-gb", "0.0001"],
                   root).returncode == 0
    _same_tensors(one, out)
    assert json.loads((one / "model.safetensors.index.json").read_text()) == json.loads(
        (out / "model.safetensors.index.json").read_text())
