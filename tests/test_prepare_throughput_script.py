"""benchmarks/prepare_throughput.py end to end on a tiny corpus: builds the files, runs `prepare` with 1 and 2
workers, measures the process tree and reports identical shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_prepare_throughput_script_tiny(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prepare_throughput.py"), "--gb", "0.005",
                           "--formats", "parquet", "--workers", "1", "2", "--work-dir", str(tmp_path / "work"),
                           "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result

    assert {"machine", "corpus", "runs", "speedup", "shards_identical", "checks"} <= result.keys()
    assert result["machine"]["cores"] >= 1 and result["machine"]["date"]
    corpus = result["corpus"]
    assert corpus["text_bytes"] >= 5_000_000 and corpus["documents"] > 0
    assert corpus["files"]["parquet"]["file_bytes"] > 0 and (tmp_path / "work" / "corpus.parquet").is_file()

    runs = result["runs"]
    assert [(r["format"], r["workers"]) for r in runs] == [("parquet", 1), ("parquet", 2)]
    for run in runs:
        assert "error" not in run, run
        for key in ("seconds", "wall_seconds", "mb_per_s", "tokens", "tokens_per_s", "shards",
                    "peak_rss_tree_mb", "peak_rss_max_process_mb"):
            assert key in run, key
        assert run["tokens"] > 0 and run["tokens_per_s"] > 0 and run["shards"] >= 2
        assert run["text_bytes"] == corpus["text_bytes"] and run["reused"] is False
        assert run["workers_reported"] == run["workers"]
        # The tree holds the main process and its workers (the corpus has 2 work units, so a pool starts).
        assert run["max_processes"] >= 1 + run["workers"]
        assert run["peak_rss_tree_mb"] >= run["peak_rss_max_process_mb"] > 0
    assert runs[0]["tokens"] == runs[1]["tokens"]
    assert result["shards_identical"] == {"parquet": True}
    assert result["checks"]["shards_identical"] == {"parquet": True}
    assert result["speedup"]["parquet"]["by_seconds"] > 0
    assert isinstance(result["checks"]["speedup_ok"]["parquet"], bool)
    assert not list((tmp_path / "work").glob("cache-*/*"))  # caches deleted without --keep
