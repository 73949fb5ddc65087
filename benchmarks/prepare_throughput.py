"""Throughput and memory of `python -m dsv3_jax prepare` on a large `files:` corpus, per file format and worker count.

The corpus: the built-in `lit` documents (Shakespeare, King James Bible, Wikipedia leads; ~14 MB) repeated in
order until at least --gb x 1e9 bytes of UTF-8 text, written once into --work-dir as `corpus.jsonl.zst` (one
`{"text": ...}` per line, zstandard level 3, streamed) and `corpus.parquet` (one `text` column, a row group
per ~64 MB of text, pyarrow's default compression), both in bounded memory. A later invocation with the same
--gb reuses the files (the `corpus.json` beside them records what they hold). The tokenizer is the lit BPE
with 8192 ids (trained once into the repository's data_cache, then loaded), or --tokenizer, so the runs
measure encoding, not BPE training.

Each format x --workers count runs `python -m dsv3_jax prepare --corpus files:FILE --json --no-progress
--set data.workers=N` as a subprocess with a fresh data.cache_dir (nothing reused). Measured: its wall time,
the `seconds` it reports itself (prepare_data alone, without interpreter start-up), and the resident memory
of its whole process tree (the main process plus the spawned encoding workers and anything else it
started, found through the ppid fields of /proc/*/stat), summed at each sample every --interval seconds
(0.2): `peak_rss_tree_mb` is the largest sum, `peak_rss_max_process_mb` the largest single process,
`peak_pss_tree_mb` the largest sum of proportional set sizes (shared pages split between their processes, so
pages the workers share, e.g. the libraries, are not counted twice). From the kernel's accounting (wait4,
exact, no sampling): `max_rss_single_process_exact_mb` (the largest peak of any one process of the tree) and
`cpu_seconds_tree`; `cpu_seconds_main` is the main process's share (its last sample, up to --interval
early). MB = 1e6 bytes throughout (memory too).
MB/s and tokens/s divide by the command's own `seconds`; `speedup` (per format) is the throughput at 2
workers over 1, also given from wall times. The shards of every run of a format are compared by sha256:
`prepare` promises byte-identical shards for any number of workers. Each run's cache is deleted after it
unless --keep.

    python benchmarks/prepare_throughput.py --gb 1 --out benchmarks/results/prepare_throughput.json
    python benchmarks/prepare_throughput.py --gb 0.03 --formats parquet --workers 1 2 4

Prints one JSON object (and writes it to --out): machine, corpus (text bytes, documents, file sizes, build
time), runs (one per format x workers), speedup (per format), shards_identical (per format) and checks
(speedup >= 1.7, every run's peak tree RSS < 1500 MB, shards identical). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FORMATS = ("jsonl.zst", "parquet")
ROW_GROUP_TEXT_BYTES = 64 * 10 ** 6  # text per Parquet row group
ZSTD_LEVEL = 3
MB = 1e6
PAGE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SPEEDUP_TARGET = 1.7
RSS_TARGET_MB = 1500.0
CORPUS_FORMAT_VERSION = 1  # bump when the files' layout changes, so old ones are rebuilt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the corpus ---------------------------------------------------------------------------------------------

def lit_texts() -> list[str]:
    from dsv3_jax.data.corpus import prepare_corpus

    return [d.text for d in prepare_corpus("lit", None).iter_documents()]


def repeated(texts: list[str], target_bytes: int):
    """(text, its UTF-8 size) of `texts` cycled in order until at least `target_bytes` bytes were given."""
    sizes = [len(t.encode("utf-8")) for t in texts]
    total = 0
    while total < target_bytes:
        for text, size in zip(texts, sizes):
            yield text, size
            total += size
            if total >= target_bytes:
                return


def write_jsonl_zst(path: Path, texts: list[str], target_bytes: int) -> dict:
    import zstandard

    tmp = path.with_name(path.name + ".tmp")
    docs = nbytes = 0
    buffer: list[str] = []
    buffered = 0
    with open(tmp, "wb") as f, zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(f, closefd=False) as out:
        for text, size in repeated(texts, target_bytes):
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            buffer.append(line)
            buffered += len(line)
            docs, nbytes = docs + 1, nbytes + size
            if buffered >= 4 * 2 ** 20:
                out.write("".join(buffer).encode("utf-8"))
                buffer, buffered = [], 0
        if buffer:
            out.write("".join(buffer).encode("utf-8"))
    os.replace(tmp, path)
    return {"documents": docs, "text_bytes": nbytes}


def write_parquet(path: Path, texts: list[str], target_bytes: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    schema = pa.schema([("text", pa.string())])
    docs = nbytes = groups = 0
    batch: list[str] = []
    batch_bytes = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        def flush() -> None:
            nonlocal batch, batch_bytes, groups
            table = pa.table({"text": pa.array(batch, pa.string())}, schema=schema)
            writer.write_table(table, row_group_size=len(batch))  # the whole batch is one row group
            batch, batch_bytes, groups = [], 0, groups + 1

        for text, size in repeated(texts, target_bytes):
            batch.append(text)
            batch_bytes += size
            docs, nbytes = docs + 1, nbytes + size
            if batch_bytes >= ROW_GROUP_TEXT_BYTES:
                flush()
        if batch:
            flush()
    os.replace(tmp, path)
    return {"documents": docs, "text_bytes": nbytes, "row_groups": groups,
            "compression": "snappy (pyarrow default)"}


def build_corpus(work_dir: Path, gb: float, formats: list[str]) -> dict:
    """The corpus files for `formats` in `work_dir`, built unless `corpus.json` says they already hold the same
    corpus (same --gb; files of the recorded sizes)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    record_path = work_dir / "corpus.json"
    target = int(round(gb * 1e9))
    record = {}
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = {}
    if record.get("target_bytes") != target or record.get("version") != CORPUS_FORMAT_VERSION:
        record = {"version": CORPUS_FORMAT_VERSION, "gb": gb, "target_bytes": target, "source": "lit, repeated",
                  "files": {}}
    texts = None
    for fmt in formats:
        path = work_dir / f"corpus.{fmt}"
        entry = record["files"].get(fmt)
        if entry is not None and path.is_file() and path.stat().st_size == entry["file_bytes"]:
            log(f"reusing {path} ({entry['file_bytes'] / MB:,.1f} MB)")
            entry["reused"] = True
            continue
        if texts is None:
            texts = lit_texts()
        log(f"writing {path} (>= {target / MB:,.1f} MB of text) ...")
        t0 = time.perf_counter()
        info = (write_jsonl_zst if fmt == "jsonl.zst" else write_parquet)(path, texts, target)
        info.update(file_bytes=path.stat().st_size, build_seconds=round(time.perf_counter() - t0, 2), reused=False)
        record["files"][fmt] = info
        record_path.write_text(json.dumps(record, indent=2) + "\n")  # after each file: a crash loses no finished one
        log(f"  {info['documents']:,} documents, {info['text_bytes'] / MB:,.1f} MB of text, "
            f"{info['file_bytes'] / MB:,.1f} MB on disk, {info['build_seconds']} s")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    first = record["files"][formats[0]]
    return {"source": record["source"], "target_bytes": target, "text_bytes": first["text_bytes"],
            "documents": first["documents"], "directory": str(work_dir),
            "files": {fmt: dict(record["files"][fmt], path=str(work_dir / f"corpus.{fmt}")) for fmt in formats}}


# ---- memory of a process tree -------------------------------------------------------------------------------

def _ppids() -> dict[int, int]:
    """pid -> ppid of every process visible in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # the command name (in parentheses) may hold spaces
        out[int(name)] = int(fields[1])
    return out


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


class TreeSampler(threading.Thread):
    """Samples the resident memory of `root` and its descendants every `interval` seconds until stopped."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop_event = threading.Event()
        self.samples = 0
        self.peak_tree = self.peak_process = self.peak_root = self.peak_pss = 0
        self.max_processes = 0
        self.pids_seen: set[int] = set()
        self.root_cpu_seconds = 0.0  # CPU time of the root process at the last sample

    def _root_cpu(self) -> None:
        try:
            with open(f"/proc/{self.root}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields and fields[0] != b"Z":  # a zombie's times may already be gone
            self.root_cpu_seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def sample(self) -> None:
        pids = tree_pids(self.root)
        rss = {pid: r for pid in pids if (r := _rss(pid)) is not None}
        if not rss:
            return
        pss = [p for pid in rss if (p := _pss(pid)) is not None]
        self._root_cpu()
        self.samples += 1
        self.pids_seen.update(rss)
        self.max_processes = max(self.max_processes, len(rss))
        self.peak_tree = max(self.peak_tree, sum(rss.values()))
        self.peak_process = max(self.peak_process, max(rss.values()))
        self.peak_root = max(self.peak_root, rss.get(self.root, 0))
        self.peak_pss = max(self.peak_pss, sum(pss))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


# ---- one prepare run ----------------------------------------------------------------------------------------

def shard_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file of a prepared cache directory except meta.json (which holds timings and workers)."""
    out = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != "meta.json":
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(8 * 2 ** 20):
                    h.update(chunk)
            out[path.name] = h.hexdigest()
    return out


def run_prepare(args, fmt: str, workers: int, corpus_file: str, tokenizer: str, vocab_size: int) -> dict:
    cache = Path(args.work_dir) / f"cache-{fmt}-w{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    cmd = [sys.executable, "-m", "dsv3_jax", "prepare", "--corpus", f"files:{corpus_file}", "--json",
           "--no-progress", "--set", f"data.cache_dir={cache}", "--set", f"data.tokenizer={tokenizer}",
           "--set", f"data.workers={workers}", "--set", f"model.vocab_size={vocab_size}"]
    for item in args.set or []:
        cmd += ["--set", item]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    row: dict = {"format": fmt, "workers": workers}
    log(f"prepare {fmt} with {workers} worker(s) ...")
    load_before = os.getloadavg()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        sampler = TreeSampler(proc.pid, args.interval)
        sampler.start()
        # wait4 (not proc.wait) for the exact resource usage of the process and its reaped descendants (the
        # workers): CPU time of the whole tree, and the largest peak RSS any one of them reached.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        rc = proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    row["wall_seconds"] = round(wall, 2)
    row.update(peak_rss_tree_mb=round(sampler.peak_tree / MB, 1),
               peak_rss_max_process_mb=round(sampler.peak_process / MB, 1),
               peak_rss_main_mb=round(sampler.peak_root / MB, 1),
               peak_pss_tree_mb=round(sampler.peak_pss / MB, 1),
               max_processes=sampler.max_processes, processes_seen=len(sampler.pids_seen),
               memory_samples=sampler.samples,
               max_rss_single_process_exact_mb=round(usage.ru_maxrss * 1024 / MB, 1),
               cpu_seconds_tree=round(usage.ru_utime + usage.ru_stime, 2),
               cpu_seconds_main=round(sampler.root_cpu_seconds, 2),
               cpu_utilization=round((usage.ru_utime + usage.ru_stime) / wall, 2),
               loadavg_1min_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)])
    if rc != 0:
        row["error"] = f"exit status {rc}: {stderr.strip()[-2000:]}"
        log(f"  FAILED ({row['error']})")
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
        return row
    summary = json.loads(stdout.strip().splitlines()[-1])
    seconds = summary["seconds"]
    row.update(seconds=seconds, build_seconds=summary["build_seconds"], documents=summary["documents"],
               text_bytes=summary["bytes"], tokens=summary["tokens"], bytes_per_token=summary["bytes_per_token"],
               shards=summary["shards"], workers_reported=summary["workers"], reused=summary["reused"],
               mb_per_s=round(summary["bytes"] / MB / seconds, 2),
               mb_per_s_wall=round(summary["bytes"] / MB / wall, 2),
               tokens_per_s=round(summary["tokens"] / seconds),
               content_hash=summary["content_hash"])
    hashes = shard_hashes(Path(summary["directory"]))
    row["shard_files"] = len(hashes)
    row["shard_bytes"] = sum((Path(summary["directory"]) / n).stat().st_size for n in hashes)
    # One digest of every file's name and sha256: equal digests mean byte-identical shards, file for file.
    row["shards_sha256"] = hashlib.sha256("".join(f"{n}\t{h}\n" for n, h in hashes.items()).encode()).hexdigest()
    if stderr.strip():
        row["stderr_tail"] = stderr.strip()[-1000:]
    log(f"  {seconds:.1f} s ({wall:.1f} s wall), {row['mb_per_s']:.2f} MB/s, {row['tokens_per_s']:,} tokens/s, "
        f"peak RSS tree {row['peak_rss_tree_mb']:,.0f} MB (largest process {row['peak_rss_max_process_mb']:,.0f} MB, "
        f"PSS tree {row['peak_pss_tree_mb']:,.0f} MB), {row['shards']} shards")
    if args.keep:
        row["cache_dir"] = str(cache)
    else:
        shutil.rmtree(cache, ignore_errors=True)
    return row


# ---- report -------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = round(int(line.split()[1]) * 1024 / MB)
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": model, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_mb": mem_total, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "git_commit": commit,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def summarize(runs: list[dict], formats: list[str]) -> tuple[dict, dict, dict]:
    speedup, identical = {}, {}
    for fmt in formats:
        ok = {r["workers"]: r for r in runs if r["format"] == fmt and "error" not in r}
        if 1 in ok and 2 in ok:
            speedup[fmt] = {"by_seconds": round(ok[2]["mb_per_s"] / ok[1]["mb_per_s"], 3),
                            "by_wall": round(ok[2]["mb_per_s_wall"] / ok[1]["mb_per_s_wall"], 3)}
        else:
            speedup[fmt] = None
        rows = [r for r in runs if r["format"] == fmt]
        if len(rows) < 2 or len(ok) < len(rows):
            identical[fmt] = None  # nothing to compare (one run, or a run failed)
        else:
            first = rows[0]
            identical[fmt] = all(r["shards_sha256"] == first["shards_sha256"] and r["content_hash"] ==
                                 first["content_hash"] and r["tokens"] == first["tokens"] for r in rows[1:])
    checks = {
        "speedup_2_over_1_at_least": SPEEDUP_TARGET,
        "speedup_ok": {fmt: (None if s is None else s["by_seconds"] >= SPEEDUP_TARGET) for fmt, s in speedup.items()},
        "peak_rss_tree_below_mb": RSS_TARGET_MB,
        "peak_rss_tree_ok": {f"{r['format']} w{r['workers']}": ("error" not in r and r["peak_rss_tree_mb"] < RSS_TARGET_MB)
                             for r in runs},
        "shards_identical": identical,
    }
    values = [v for v in (*checks["speedup_ok"].values(), *checks["peak_rss_tree_ok"].values(), *identical.values())]
    checks["all_ok"] = all(v is True for v in values)
    return speedup, identical, checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="corpus size: GB (1e9 bytes) of UTF-8 text (default 1)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="data.workers values (default 1 2)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "dsv3_prepare_throughput"),
                   help="corpus files (reused across invocations with the same --gb) and the runs' caches")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or a directory with one); default: the lit "
                   "BPE with 8192 ids from the repository's data_cache (trained there once if missing)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="more overrides for prepare")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--keep", action="store_true", help="keep each run's cache directory")
    args = p.parse_args()
    if args.gb <= 0:
        p.error("--gb must be > 0")
    if any(w < 1 for w in args.workers):
        p.error("--workers must be >= 1 each")
    formats = list(dict.fromkeys(args.formats))
    workers = list(dict.fromkeys(args.workers))

    from dsv3_jax.data.tokenizer import load_tokenizer

    if args.tokenizer is None:
        from dsv3_jax.data.corpus import prepare_corpus
        from dsv3_jax.data.tokenizer import get_tokenizer

        tok = get_tokenizer(prepare_corpus("lit", None), 8192, None)
    else:
        tok = load_tokenizer(args.tokenizer)
    tokenizer_path = str(tok.path)

    machine = machine_info()
    corpus = build_corpus(Path(args.work_dir), args.gb, formats)
    runs = [run_prepare(args, fmt, n, corpus["files"][fmt]["path"], tokenizer_path, tok.vocab_size)
            for fmt in formats for n in workers]
    speedup, identical, checks = summarize(runs, formats)
    result = {"benchmark": "prepare_throughput", "machine": machine, "corpus": corpus,
              "tokenizer": {"path": tokenizer_path, "vocab_size": tok.vocab_size},
              "settings": {"gb": args.gb, "formats": formats, "workers": workers, "interval_s": args.interval,
                           "set": args.set or [], "mb": "1e6 bytes"},
              "runs": runs, "speedup": speedup, "shards_identical": identical, "checks": checks}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
