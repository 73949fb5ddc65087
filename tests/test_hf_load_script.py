"""benchmarks/hf_load.py's phases (write, load onto 8 fake devices, convert, export, compare) on the tiny model's
dims: the plumbing the README's measurement relies on, and the round trip bitwise with FP8 tensors in it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_phases_run_and_the_round_trip_is_bitwise(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hf_load.py"), "--workdir", str(tmp_path),
                           "--preset", "tiny", "--layers", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report) == {"write", "load", "convert", "export", "compare", "targets"}
    assert report["compare"]["bitwise"] and report["compare"]["fp8_tensors"] > 0
    assert report["targets"]["load_rss_le_model_plus_1_5gb"] and report["targets"]["export_bitwise"]
    assert 0 < report["load"]["bytes_read_gb"] and report["load"]["model_gb"] > 0
