"""Hostile input to every command gives one `error: ...` line naming the field, file or argument, exit 2, before
anything expensive starts and without writing anything (in-process `cli.main`, no training)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from dsv3_jax import cli

REPO = Path(__file__).resolve().parents[1]
HF_FIXTURE = REPO / "tests" / "fixtures" / "hf" / "qlora_groups"
TRAIN = ["train", "--preset", "tiny", "--no-progress"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("override,names", [
    ("train.peak_lr=Infinity", "train.peak_lr"),  # JSON's Infinity: would train NaN parameters
    ("train.peak_lr=NaN", "train.peak_lr"),
    ("train.grad_clip=-Infinity", "train.grad_clip"),
    ("model.rope_scaling={\"factor\": 4,}", "model.rope_scaling"),  # invalid JSON for a section
    ("model.rope_scaling={\"fator\": 4}", "fator"),
    ("train.peak_lr=1e-3,", "train.peak_lr"),  # a stray comma: not a number
    ("train.warmup_frac=abc", "train.warmup_frac"),
    ("train.steps=true", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("model.dtype=7", "model.dtype"),
    ("train.stepz=3", "stepz"),
    ("steps=3", "steps"),
])
def test_bad_overrides_name_the_field_before_anything_runs(tmp_path, capsys, override, names):
    run_dir = tmp_path / "run"
    assert cli.main([*TRAIN, "--run-dir", str(run_dir), "--set", override]) == 2
    assert names in _one_error_line(capsys)
    assert not run_dir.exists()


def _hf_copy(tmp_path: Path, **files: str) -> Path:
    target = tmp_path / "hf"
    shutil.copytree(HF_FIXTURE, target)
    for name, text in files.items():
        (target / name.replace("_json", ".json")).write_text(text)
    return target


@pytest.mark.parametrize("files,needle", [
    ({"config_json": "[1, 2, 3]"}, "config.json"),
    ({"config_json": '{"hidden_size": 64,'}, "config.json"),
    ({"config_json": '{"hidden_size": "wide"}'}, "hidden_size"),
    ({"generation_config_json": "[0]"}, "generation_config.json"),
    ({"tokenizer_json": '{"model": '}, "tokenizer.json"),
])
def test_broken_hf_directory_files_are_named(tmp_path, capsys, files, needle):
    hf = _hf_copy(tmp_path, **files)
    prompt = ["--prompt", "hi"] if "tokenizer_json" in files else ["--prompt-ids", "1,2"]
    assert cli.main(["generate", "--hf", str(hf), *prompt, "--max-new", "2"]) == 2
    assert needle in _one_error_line(capsys)


def _fake_run_dir(tmp_path: Path) -> Path:
    """A run directory with a valid config.json and no checkpoint."""
    from dsv3_jax.train.config import Config
    from dsv3_jax.config import get_preset

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(Config(model=get_preset("tiny")).to_json())
    return run_dir


def test_eval_argument_and_run_dir_errors(tmp_path, capsys):
    run_dir = _fake_run_dir(tmp_path)
    assert cli.main(["eval", "--run-dir", str(run_dir), "--max-batches", "-1"]) == 2
    assert "--max-batches: must be >= 0" in _one_error_line(capsys)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["eval", "--run-dir", str(a_file)]) == 2
    assert "is not a directory" in _one_error_line(capsys)
    assert cli.main(["eval", "--run-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert cli.main(["eval", "--run-dir", str(run_dir)]) == 2
    assert "no checkpoint" in _one_error_line(capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]  # eval created nothing
    (run_dir / "config.json").write_text('{"train": ')
    assert cli.main(["eval", "--run-dir", str(run_dir)]) == 2
    assert f"{run_dir / 'config.json'}: invalid JSON" in _one_error_line(capsys)


def test_train_on_a_file_or_a_corrupt_config_is_refused(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["train", "--run-dir", str(a_file), "--no-progress"]) == 2
    assert "is not a directory" in _one_error_line(capsys)
    run_dir = _fake_run_dir(tmp_path)
    (run_dir / "config.json").write_text('{"model": {"hidden_size": -1}}')
    assert cli.main(["train", "--run-dir", str(run_dir), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "config.json" in line and "hidden_size" in line
    assert (run_dir / "config.json").read_text() == '{"model": {"hidden_size": -1}}'


def test_plan_and_params_argument_errors(capsys):
    assert cli.main(["plan", "--preset", "tiny", "--devices", "0"]) == 2
    assert "--devices: must be >= 1" in _one_error_line(capsys)
    assert cli.main(["params", "--preset", "tiny", "--set", "mesh.expert=8"]) == 2
    assert "params only takes model.* overrides" in _one_error_line(capsys)
    assert cli.main(["params", "--preset", "tiny", "--set", "model.hidden_size=0"]) == 2
    assert "hidden_size" in _one_error_line(capsys)


def test_generate_sampling_errors(capsys):
    assert cli.main(["generate", "--hf", str(HF_FIXTURE), "--prompt-ids", "1,2", "--temperature", "inf"]) == 2
    assert "temperature must be a finite number" in _one_error_line(capsys)


def test_params_and_plan_of_a_million_layers_answer_quickly(capsys):
    t0 = time.perf_counter()
    assert cli.main(["params", "--preset", "small", "--set", "model.num_hidden_layers=1000000"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert cli.main(["plan", "--preset", "small", "--set", "model.num_hidden_layers=1000000", "--json"]) == 0
    capsys.readouterr()
    assert time.perf_counter() - t0 < 60  # was ~quadratic in depth: 200 layers took 103 s
    assert counts["total"] > 1000 * get_small_moe_layer_params()


def get_small_moe_layer_params() -> int:
    """Parameters of one MoE layer of the small preset (a lower bound for a million-layer model's count)."""
    from dsv3_jax.accounting import count_params
    from dsv3_jax.config import get_preset

    small = get_preset("small")
    two = count_params(small.replace(num_hidden_layers=small.first_k_dense_replace + 2)).total
    one = count_params(small.replace(num_hidden_layers=small.first_k_dense_replace + 1)).total
    return two - one


def test_sizes_beyond_int32_are_refused_by_name(capsys):
    assert cli.main(["plan", "--preset", "small", "--set", "model.vocab_size=10000000000000000000"]) == 2
    assert "model.vocab_size: must be at most 2**31 - 1" in _one_error_line(capsys)


@pytest.mark.parametrize("setup, args, needle", [
    (None, ["--set", "data.workers=-1"], "data.workers"),
    (None, ["--set", "data.workers=true"], "data.workers"),
    (None, ["--set", "data.token_dtype=float32"], "data.token_dtype"),
    (None, ["--corpus", "tokens:/no/such/dir"], "tokens:/no/such/dir: no such directory of token shards"),
    ("shards", ["--corpus", "tokens:{p}/shards"], "data.tokenizer: tokens:"),
    (None, ["--corpus", "files:{p}/nothing*.jsonl"], "matches no file"),
    ("corrupt", ["--corpus", "files:{p}/bad.jsonl.gz"], "bad.jsonl.gz: cannot be read past line 0"),
    ("notext", ["--corpus", "files:{p}/x.parquet"], "x.parquet has no column 'text'"),
])
def test_prepare_refuses_bad_input_with_one_line(tmp_path, capsys, setup, args, needle):
    if setup == "shards":
        (tmp_path / "shards").mkdir()
        (tmp_path / "shards" / "a.bin").write_bytes(b"\x01\x00")
    elif setup == "corrupt":
        (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    elif setup == "notext":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "x.parquet")
    cache = tmp_path / "cache"
    argv = ["prepare", "--preset", "tiny", "--no-progress", "--set", f"data.cache_dir={cache}",
            *[a.replace("{p}", str(tmp_path)) for a in args]]
    assert cli.main(argv) == 2
    assert needle in _one_error_line(capsys)
    assert not (cache / "tokens").exists()  # nothing encoded
