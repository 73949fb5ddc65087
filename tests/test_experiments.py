"""The experiment runner: config files parse, every variant is a valid run config, collection and plots work on
a small fake run (seconds; nothing trains)."""

import json
from pathlib import Path

import pytest

from dsv3_jax.config import get_preset
from dsv3_jax.train.config import Config, DataConfig, apply_overrides
from dsv3_jax.train.presets import train_preset
from experiments import collect, run, spec

EXPERIMENTS = spec.available()


def _config(preset: str, corpus: str, overrides: list[str]) -> Config:
    return apply_overrides(Config(model=get_preset(preset), train=train_preset(preset),
                                  data=DataConfig(corpus=corpus)), overrides)


def test_the_issue_experiments_exist():
    assert {"baseline", "balance", "shared_expert", "mtp"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("scale", sorted(spec.SCALES))
def test_every_variant_is_a_valid_config(name, scale):
    exp = spec.load(name)
    assert exp.name == name
    for variant in exp.variants:
        for seed in (*variant.seeds_for(scale), 3):
            preset, corpus, overrides = spec.overrides_for(exp, variant, scale, seed)
            config = _config(preset, corpus, overrides)  # raises ConfigError on a bad override
            assert config.train.seed == seed


def test_same_as_points_at_a_real_variant_with_identical_settings():
    for name in EXPERIMENTS:
        exp = spec.load(name)
        for variant in exp.variants:
            if variant.same_as:
                src_exp, src_var = variant.source(name)
                source = spec.load(src_exp).variant(src_var)
                assert spec.overrides_for(exp, variant, "cpu", 0) == spec.overrides_for(
                    spec.load(src_exp), source, "cpu", 0)


def test_shared_expert_ablation_keeps_active_experts_equal():
    exp = spec.load("shared_expert")
    with_shared = _config(*spec.overrides_for(exp, exp.variant("shared"), "cpu", 0)).model
    without = _config(*spec.overrides_for(exp, exp.variant("no_shared"), "cpu", 0)).model
    assert without.n_shared_experts == 0
    assert (with_shared.n_shared_experts + with_shared.num_experts_per_tok
            == without.num_experts_per_tok)
    assert with_shared.moe_intermediate_size == without.moe_intermediate_size


def test_planned_experiments_are_named_not_unknown():
    for name in spec.PLANNED:
        if name in EXPERIMENTS:
            continue
        with pytest.raises(spec.SpecError, match="no config file yet"):
            spec.load(name)
    with pytest.raises(spec.SpecError, match="unknown experiment"):
        spec.load("no_such_experiment")


@pytest.mark.parametrize("raw, field", [
    ({"variants": []}, "name"),
    ({"name": "x", "variants": [{"label": "no name"}]}, "variants[0].name"),
    ({"name": "x", "variants": [{"name": "a", "set": ["train.steps"]}]}, "set"),
    ({"name": "x", "variants": [{"name": "a", "same_as": "baseline"}]}, "same_as"),
    ({"name": "x", "variants": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"name": "x", "variants": [{"name": "gpu"}]}, "scale name"),
    ({"name": "x", "variants": [{"name": "a"}], "plots": ["nope"]}, "plots"),
    ({"name": "x", "variants": [{"name": "a", "seeds": [0, -1]}]}, "variants[0].seeds"),
    ({"name": "x", "variants": [{"name": "a", "seeds": {"huge": [0]}}]}, "unknown scales ['huge']"),
    ({"name": "x", "variants": [{"name": "a", "seeds": {"long": [True]}}]}, "variants[0].seeds.long"),
])
def test_malformed_specs_name_the_field(raw, field):
    with pytest.raises(spec.SpecError, match=field.replace("[", r"\[").replace("]", r"\]")):
        spec.parse(raw)


def test_seeds_per_scale():
    listed, per_scale, absent = spec.parse({"name": "x", "variants": [
        {"name": "a", "seeds": [0, 2]}, {"name": "b", "seeds": {"cpu": [], "long": [0, 1]}}, {"name": "c"}]}).variants
    assert [listed.seeds_for(s) for s in ("cpu", "long")] == [(0, 2), (0, 2)]
    assert [per_scale.seeds_for(s) for s in ("cpu", "long", "gpu")] == [(), (0, 1), spec.DEFAULT_SEEDS]
    assert absent.seeds_for("long") == spec.DEFAULT_SEEDS


def test_long_scale_answers_the_balance_and_mtp_questions():
    """The long scale is the small model ten times longer, evaluated on the whole validation split at >= 10
    points and checkpointed often enough to resume; the arms the comparison needs run 2 seeds there."""
    from dsv3_jax.config import get_preset
    from dsv3_jax.train.config import Config, apply_overrides
    from dsv3_jax.train.presets import train_preset

    preset, corpus, overrides = spec.overrides_for(spec.load("baseline"), spec.load("baseline").variant("default"),
                                                   "long", 0)
    cfg = apply_overrides(Config(model=get_preset(preset), train=train_preset(preset)), overrides).train
    assert cfg.steps >= 3000 and cfg.steps * cfg.batch_size * cfg.seq_len >= 6_000_000
    assert cfg.eval_batches == 0 and cfg.steps // cfg.eval_every >= 10 and cfg.steps % cfg.eval_every == 0
    assert cfg.checkpoint_every <= 100
    balance, mtp = spec.load("balance"), spec.load("mtp")
    for exp, name in ((balance, "aux_free"), (balance, "aux_loss_seq"), (mtp, "mtp_d1"), (mtp, "no_mtp")):
        assert exp.variant(name).seeds_for("long") == (0, 1), name
    assert spec.load("baseline").variant("default").seeds_for("long") == (0, 1)  # what aux_free / mtp_d1 reuse
    for name in ("aux_free_g0.01", "aux_loss_batch", "none", "aux_free_g0.0001"):
        assert balance.variant(name).seeds_for("long") == (0,), name
    assert balance.variant("aux_free_g0.0001").seeds_for("cpu") == ()  # the sensitivity point runs long only


def test_run_keys_and_commands():
    assert spec.run_key("balance", "none", "cpu", 1) == Path("balance/none/seed1")
    assert spec.run_key("balance", "none", "gpu", 0) == Path("balance/gpu/none/seed0")
    cmd = run.train_command("small", "lit", Path("runs/x"), ["train.balance=none", "train.seed=0"])
    line = run.shell_line(cmd)
    assert line.startswith("python -m dsv3_jax train --preset small --corpus lit --run-dir runs/x")
    assert "--set train.balance=none --set train.seed=0" in line
    assert run.eval_command(Path("runs/x"))[1:] == ["-m", "experiments.full_eval", "--run-dir", "runs/x"]
    assert run._last_json_object('data: x\n{\n  "val_loss": 1.5\n}\nwarning after\n') == {"val_loss": 1.5}
    assert run._last_json_object('{"a": 1}') == {"a": 1}


def test_dry_run_prints_the_cli_commands(capsys):
    assert run.main(["balance", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == sum(len(v.seeds_for("cpu")) for v in spec.load("balance").variants) == 5
    assert any("--run-dir runs/experiments/baseline/default/seed0" in line for line in lines)  # same_as
    assert any("--set train.balance=none" in line for line in lines)
    assert not any("bias_update_rate=0.0001" in line for line in lines)  # a long-scale-only arm
    assert run.main(["balance", "--scale", "long", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and all("--set train.steps=3000" in line for line in lines)
    assert sum("runs/experiments/balance/long/aux_loss_seq/seed" in line for line in lines) == 2


def _fake_run(dest: Path, steps: int = 20, loss0: float = 9.0, vio: float = 1.0,
              final_loads: list[list[float]] | None = None) -> None:
    """A metrics.jsonl/config.json/final_eval.json/run.json set shaped like the trainer's and runner's output."""
    dest.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        records.append({"kind": "train", "step": step, "loss": loss0 - 0.1 * step, "mtp_loss": loss0 - 0.05 * step,
                        "maxvio_batch": vio / step, "tokens_per_s": 1000.0, "skipped_total": 0,
                        "dropped_fraction": 0.0})
        if step % 10 == 0:
            records.append({"kind": "eval", "step": step, "val_loss": loss0 - 0.09 * step,
                            "val_mtp_loss": loss0 - 0.04 * step, "maxvio_global": vio / step,
                            "expert_load": [[1.0, 2.0, 3.0, 2.0], [2.0, 2.0, 2.0, 2.0]], "val_batches": 2})
    (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"train": {"batch_size": 2, "seq_len": 5, "mtp_lambda": 0.3}, "model": {"num_nextn_predict_layers": 1}}
    (dest / "config.json").write_text(json.dumps(config))
    final = {"step": steps, "val_loss": loss0 - 2.0, "val_mtp_loss": loss0 - 1.0, "maxvio_global": vio / 10,
             "maxvio_global_layers": [vio / 10], "val_batches": 7}
    if final_loads is not None:
        final["expert_load"] = final_loads
    (dest / "final_eval.json").write_text(json.dumps(final))
    (dest / "run.json").write_text(json.dumps({"command": "python -m dsv3_jax train ...", "wall_s": 12.0}))


def test_summary_and_plots_from_fake_results(tmp_path):
    _fake_run(tmp_path / "baseline/default/seed0")
    _fake_run(tmp_path / "baseline/default/seed1", loss0=9.2)
    _fake_run(tmp_path / "balance/none/seed0", vio=3.0, loss0=9.5,
              final_loads=[[0.1, 0.1, 3.9, 3.9], [0.1, 1.0, 1.0, 5.9]])  # fair load 2.0: 2 and 1 starved
    exp = spec.load("balance")
    written = run.draw(exp, "cpu", results_dir=tmp_path)
    names = {p.name for p in written}
    assert {"summary.json", "summary.md", "loss.png", "maxvio.png", "expert_load.png"} <= names
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)

    summary = json.loads((tmp_path / "balance/summary.json").read_text())
    aux_free = summary["variants"]["aux_free"]  # same_as baseline/default: both seeds
    assert sorted(aux_free["seeds"]) == ["0", "1"]
    assert aux_free["aggregate"]["val_loss"]["mean"] == pytest.approx(7.1)
    assert aux_free["aggregate"]["val_loss"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert summary["variants"]["none"]["aggregate"]["maxvio_global"]["mean"] == pytest.approx(0.3)
    assert summary["variants"]["aux_loss_seq"]["seeds"] == {}
    # paired by seed: `none` has seed 0 only, so its difference is to the reference's seed 0 alone
    none_diff = summary["variants"]["none"]["aggregate"]["val_loss_diff_vs_reference"]
    ref0 = aux_free["seeds"]["0"]["val_loss"]
    assert ref0 == pytest.approx(7.0) and none_diff["n"] == 1 and none_diff["mean"] == pytest.approx(0.5)
    assert "val_loss_diff_vs_reference" not in aux_free["aggregate"]
    seed0 = aux_free["seeds"]["0"]
    assert seed0["train_loss_last10"] == pytest.approx(9.0 - 0.1 * 15.5)
    assert seed0["train_seconds"] == pytest.approx(20 * 10 / 1000.0)
    table = (tmp_path / "balance/summary.md").read_text()
    assert "`aux_loss_seq` | not run" in table and "7.1000 ± 0.1414 (n=2)" in table
    assert "| `none` | 0 | 7.5000 | +0.5000 |" in table
    assert summary["variants"]["none"]["seeds"]["0"]["starved_experts_per_layer"] == [2, 1]
    assert summary["variants"]["none"]["aggregate"]["starved_experts"]["mean"] == pytest.approx(1.5)
    assert "starved experts per layer" in table and "| 1.50 |" in table
    assert "| `aux_free` | maxvio_global | 0.04 | LFB Table 2" in table  # the paper's numbers sit beside ours
    # every row says how to train it again (aux_free is the baseline run; _fake_run records no commit)
    assert "`python -m experiments.run baseline --variant default --seed 0 --seed 1` |" in table
    assert "`python -m experiments.run balance --variant none --seed 0` |" in table

    mtp_written = run.draw(spec.load("mtp"), "cpu", results_dir=tmp_path)
    assert (tmp_path / "mtp/mtp.png") in mtp_written


def test_heatmap_prefers_the_whole_split_loads(tmp_path):
    from experiments import plots

    _fake_run(tmp_path / "r")
    final_path = tmp_path / "r/final_eval.json"
    config = {"train": {"eval_batches": 16}}
    run_tuple = (0, collect.read_jsonl(tmp_path / "r/metrics.jsonl"), json.loads(final_path.read_text()), config)
    assert plots.final_loads(run_tuple)[3] == "first 16 validation batches"
    final = {**json.loads(final_path.read_text()), "expert_load": [[4.0, 4.0, 4.0, 4.0], [1.0, 7.0, 4.0, 4.0]]}
    loads, step, _, where = plots.final_loads((0, run_tuple[1], final, {}))
    assert where == "whole validation split" and step == 20 and loads[1, 1] == 7.0
    assert not run._has_loads(tmp_path / "r")
    final_path.write_text(json.dumps(final))
    assert run._has_loads(tmp_path / "r")


def test_recollecting_keeps_the_training_wall_time(tmp_path):
    previous = {"wall_s": 1803.6, "wall_s_source": "runner", "finished_at": "then", "eval_wall_s": 5.0}
    assert run._earlier_train_info(previous, tmp_path) == {"wall_s": 1803.6, "wall_s_source": "runner",
                                                            "finished_at": "then"}


def test_finished_needs_the_last_step_and_its_eval(tmp_path):
    _fake_run(tmp_path / "r", steps=20)
    assert collect.finished(tmp_path / "r/metrics.jsonl", 20)
    assert not collect.finished(tmp_path / "r/metrics.jsonl", 30)
    assert not collect.finished(tmp_path / "missing.jsonl", 20)


def test_speculative_command_decodes_every_prompt_with_mtp_drafts():
    from experiments import speculative

    cmd = speculative.generate_command(Path("runs/x"), 1.0, 64, 0)
    assert cmd[1:4] == ["-m", "dsv3_jax", "generate"] and "--speculative" in cmd and "--json" in cmd
    assert cmd.count("--prompt") == len(speculative.PROMPTS)
    assert cmd[cmd.index("--temperature") + 1] == "1.0"


def test_regenerate_command_groups_seeds_by_commit():
    exp = spec.load("mla")
    per_seed = {"1": {"commit": "f7e9d713915659c9"}, "0": {"commit": "f7e9d713915659c9"}, "2": {"commit": "abcdef0123"}}
    cmd = collect.regenerate_command(exp, exp.variant("mha"), "cpu", per_seed)
    assert cmd == ("python -m experiments.run mla --variant mha --seed 0 --seed 1 --code f7e9d71; "
                   "python -m experiments.run mla --variant mha --seed 2 --code abcdef0")
    args = run.build_parser().parse_args(cmd.split("; ")[0].split()[3:])
    assert args.name == "mla" and args.variant == ["mha"] and args.seed == [0, 1] and args.code == "f7e9d71"
    same_as = collect.regenerate_command(exp, exp.variant("mla"), "gpu", {})
    assert same_as == "python -m experiments.run baseline --variant default --seed 0 --scale gpu"


def test_fp8_compare_pairs_runs_of_one_seed(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "experiments" / "fp8_compare.py"
    module_spec = importlib.util.spec_from_file_location("fp8_compare", path)
    fp8_compare = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(fp8_compare)

    for seed, loss0 in ((0, 9.0), (1, 8.0)):
        _fake_run(tmp_path / f"fp8/bf16/seed{seed}", loss0=loss0)
        _fake_run(tmp_path / f"fp8/deepseek/seed{seed}", loss0=loss0 * 1.01)
    for run_dir in tmp_path.glob("fp8/*/seed*"):  # the trainer's warm-up fraction, which the comparison reads
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg["train"].update(warmup_frac=0.1, steps=20)
        (run_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    result = fp8_compare.compare(spec.load("fp8"), "bf16", out, seed=1, results_dir=tmp_path)
    assert result["seed"] == 1 and set(result["variants"]) == {"deepseek"}  # fp32 and per_tensor: no runs
    deepseek = result["variants"]["deepseek"]
    # deepseek's fake curve starts 1% above bf16's, so it breaks the 0.25% bound; final losses are loss0 - 2
    assert deepseek["final_val_loss"] == pytest.approx(8.08 - 2.0) and deepseek["final_val_loss_ref"] == pytest.approx(6.0)
    assert deepseek["rel_error_ema_max_after_warmup"] > 0.0025 and not deepseek["below_paper_bound_after_warmup"]
    assert {p.name for p in out.iterdir()} == {f"relative_error_vs_bf16_seed1.{ext}" for ext in ("json", "jsonl", "png")}
    with pytest.raises(SystemExit, match="no collected run for seed 2"):
        fp8_compare.compare(spec.load("fp8"), "bf16", out, seed=2, results_dir=tmp_path)


def test_draw_rewrites_the_readme_table_between_markers(tmp_path):
    _fake_run(tmp_path / "results/baseline/default/seed0")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- summary:baseline -->\nold table\n<!-- /summary:baseline -->\nprose after\n"
                      "<!-- summary:balance -->\nuntouched\n<!-- /summary:balance -->\n")
    run.draw(spec.load("baseline"), "cpu", results_dir=tmp_path / "results", readme=readme)
    text = readme.read_text()
    assert "old table" not in text and "| `default` | 0 | 7.0000 |" in text
    assert text.startswith("intro\n<!-- summary:baseline -->\n| variant |") and "prose after" in text
    assert "untouched" in text  # other experiments' blocks are left alone
    assert collect.replace_marked_block("no markers", "summary:x", "t") == "no markers"


def test_starved_experts_counts_experts_under_a_quarter_of_the_fair_load():
    # fair loads 2.0 and 4.0: 0.49 < 0.5 is starved, 0.5 is not; 0.0 (a dead expert) is
    assert collect.starved_experts([[0.49, 0.5, 3.0, 4.01], [0.0, 8.0, 4.0, 4.0]]) == [1, 1]
    assert collect.starved_experts([[1.0, 1.0, 1.0, 1.0]]) == [0]
    assert collect.starved_experts([[0.0, 0.0, 0.0, 12.0]], share=0.25) == [3]


def test_speculative_refuses_unfinished_runs_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from experiments import speculative

    monkeypatch.setattr(spec, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(spec, "RESULTS_DIR", tmp_path / "results")
    _fake_run(tmp_path / "runs/baseline/long/default/seed0", steps=20)  # stopped at 20 of the spec's 3000 steps
    (tmp_path / "runs/baseline/long/default/seed0/checkpoints").mkdir()
    assert speculative.main(["--scale", "long", "--seed", "0"]) == 2
    out = capsys.readouterr()
    assert "mtp_d1: no finished run" in out.out and "nothing written" in out.err
    assert not (tmp_path / "results").exists()


def test_runs_are_finished_at_the_specs_step_count_and_found_under_one_directory_rule():
    baseline, mtp = spec.load("baseline"), spec.load("mtp")
    default, d1 = baseline.variant("default"), mtp.variant("mtp_d1")  # d1 is the same run as baseline/default
    assert spec.planned_steps(baseline, default, "long", 0) == spec.planned_steps(mtp, d1, "long", 1) == 3000
    assert spec.planned_steps(baseline, default, "cpu", 0) == 300
    assert spec.run_key("mtp", "no_mtp", "cpu", 1) == Path("mtp/no_mtp/seed1")
    assert spec.run_key("mtp", "no_mtp", "long", 1) == spec.experiment_dir("mtp", "long") / "no_mtp/seed1"
    assert spec.experiment_dir("mtp", "long") == Path("mtp/long") and spec.experiment_dir("mtp", "cpu") == Path("mtp")


def test_plots_say_what_the_in_training_evaluations_covered():
    from experiments.plots import eval_batches_text, eval_marks_text

    def cfg(n):
        return {"train": {"eval_batches": n}}

    assert eval_batches_text([cfg(0), cfg(0)]) == "whole validation split"
    assert eval_batches_text([cfg(16)]) == "first 16 validation batches"
    assert eval_batches_text([cfg(16), cfg(0)]) == eval_batches_text([{}]) == "in-training evaluations"
    # The panel legend names the final star separately only when the dots are a different kind of number.
    assert eval_marks_text([cfg(0)]) == "whole split at every evaluation; star: final"
    assert eval_marks_text([cfg(16)]) == "dots: first 16 validation batches; star: whole split"


def test_paired_eval_differences_pair_each_seed_with_the_reference(tmp_path):
    import numpy as np

    from experiments.plots import load_series, paired_eval_differences

    def run(losses, final):
        records = [{"kind": "train", "step": 1, "loss": 9.0}]
        records += [{"kind": "eval", "step": step, "val_loss": v} for step, v in losses.items()]
        return records, (None if final is None else {"step": 300, "val_loss": final})

    runs = {  # label -> seed -> (records, final eval)
        "ref": {0: run({100: 5.0, 200: 4.5}, 4.4), 1: run({100: 5.2, 200: 4.6}, 4.5)},
        "arm": {0: run({100: 5.1, 200: 4.4, 250: 4.3}, 4.2), 2: run({100: 5.0}, 4.9)},  # seed 2: no reference
        "other": {1: run({200: 4.7}, None)},
    }
    series = {label: {"colour": "k", "reference": label == "ref",
                      "runs": [(seed, records, final, {}) for seed, (records, final) in by_seed.items()]}
              for label, by_seed in runs.items()}
    diffs = paired_eval_differences(series)
    assert set(diffs) == {"arm", "other"} and set(diffs["arm"]) == {0} and set(diffs["other"]) == {1}
    steps, values, final = diffs["arm"][0]
    assert steps == [100, 200]  # step 250 has no reference evaluation to pair with
    np.testing.assert_allclose(values, [0.1, -0.1], rtol=1e-12, atol=1e-12)
    assert final[0] == 300 and abs(final[1] - (-0.2)) < 1e-12
    steps, values, final = diffs["other"][1]
    assert steps == [200] and final is None  # no final evaluation to compare
    np.testing.assert_allclose(values, [0.1], rtol=1e-12, atol=1e-12)
    # Without the reference's runs there is nothing to pair with.
    assert paired_eval_differences({k: v for k, v in series.items() if k != "ref"}) == {}

    # load_series marks the experiment's first variant as the reference, and no other, even when it has no runs.
    for name in ("ref", "arm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs[name][0][0]))
    loaded = load_series({"ref": [(0, tmp_path / "ref")], "arm": [(0, tmp_path / "arm")]}, {"arm": "Arm"})
    assert [(k, v["reference"]) for k, v in loaded.items()] == [("ref", True), ("Arm", False)]
    assert [v["reference"] for v in load_series({"ref": [], "arm": [(0, tmp_path / "arm")]}, {}).values()] == [False]


def test_parsed_variants_are_hashable_values():
    variants = spec.load("balance").variants
    assert len(set(variants)) == len(variants) and variants == spec.load("balance").variants


_STAND_IN = """
import signal, sys, time
stopping = []
signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
print("step 1", flush=True)
for _ in range(400):
    if stopping:
        time.sleep(1.0)  # the stop checkpoint being written
        print("stop checkpoint written", flush=True)
        sys.exit(130)
    time.sleep(0.05)
print("finished", flush=True)
"""

_RUNNER = """
import sys
from pathlib import Path
from experiments import run
code = run.Code(None)
try:
    run._run_logged([sys.executable, "-c", sys.argv[1]], Path(sys.argv[2]), code)
except run.RunnerInterrupted as stop:
    print(f"{stop}; run the same command again to resume", file=sys.stderr)
    sys.exit(130)
"""


def test_ctrl_c_waits_for_the_trainers_stop_checkpoint(tmp_path):
    """Ctrl-C (SIGINT to the whole process group) while the runner streams a trainer: the runner keeps reading
    until the trainer has written its stop checkpoint and exited, then says so in one line and exits 130 (it
    used to die with a traceback, closing the pipe under the trainer mid-save)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    log = tmp_path / "train.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, _STAND_IN, str(log)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    # the log starts with the command line (which quotes the script): wait for the child's own output line
    while time.time() < deadline and not (log.exists() and "\nstep 1\n" in log.read_text()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted; the command exited 130" in err
    assert "stop checkpoint written" in log.read_text()
