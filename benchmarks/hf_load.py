"""Published weights onto a mesh and back, at a size that matters: time, GB/s and peak host memory.

Writes a synthetic HF checkpoint of DeepSeek-V2-Lite's dims cut in depth (`--layers`, default 5: one dense
and four MoE layers, no MTP; ~4.6 GB in 1 GiB shards, bf16 with the routed experts of every other MoE layer
FP8 128x128 block-quantised), with a word-level tokenizer.json of its vocabulary. Then, each phase in a fresh
process so that its peak RSS is its own, on 8 fake CPU devices with `mesh.fsdp=true` and `mesh.expert=4`:

* `load`: `hf_init.check_checkpoint` + `load_sharded` of every parameter and router bias into the run's
  shardings (what `train --init-from` does), parameters in bf16: seconds, GB/s of checkpoint bytes read, peak
  RSS against the model's own bytes in its parameter dtype (target: <= model + 1.5 GB; no second copy);
* `convert`: the whole `train --init-from HF --set train.steps=0` (the step-0 run checkpoint, which also holds
  the fresh AdamW moments);
* `export`: `python -m dsv3_jax export` of that run back to an HF directory: seconds, GB/s, peak RSS;
* `compare`: every exported tensor against the input: bf16 ones bitwise, FP8 ones against their dequantised
  values in bf16 (the parameters' dtype), bitwise.

    python benchmarks/hf_load.py --workdir /tmp/hf_load      # ~15 GB of disk at the default size

Prints one JSON object: {"checkpoint_gb", "model_gb", phases {seconds, gb_per_s, peak_rss_gb}, "targets"}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MESH = ["--set", "mesh.fsdp=true", "--set", "mesh.expert=4", "--set", "mesh.data=2"]
COMPUTE = ["--set", "model.param_dtype=bfloat16", "--set", "model.dtype=bfloat16"]
RSS_SLACK_GB = 1.5
MIN_GB_PER_S = 0.3


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


PRESET = os.environ.get("HF_LOAD_PRESET", "dsv2-lite")  # tests run the same phases on `tiny`


def _config(layers: int):
    from dsv3_jax.config import get_preset

    return get_preset(PRESET).replace(num_hidden_layers=layers, num_nextn_predict_layers=0)


def phase_write(workdir: Path, layers: int) -> dict:
    """The synthetic checkpoint, tensor by tensor (a whole model never exists), plus tokenizer and tokens."""
    import ml_dtypes
    import numpy as np
    from flax import nnx
    from tokenizers import Tokenizer, models

    from dsv3_jax.convert import to_hf
    from dsv3_jax.model import DeepSeekV3

    cfg = _config(layers)
    model = nnx.eval_shape(lambda: DeepSeekV3(cfg, nnx.Rngs(0)))

    def read(path: str, index: tuple[int, ...]):
        shape = _shape(model, path)[len(index):]
        seed = zlib.crc32(f"{path}{index}".encode())  # the same values in every process
        values = np.random.default_rng(seed).standard_normal(shape, np.float32) * 0.02
        return values.astype(ml_dtypes.bfloat16)

    def fp8(name: str) -> bool:  # the routed experts of every other MoE layer
        parts = name.split(".")
        return ".mlp.experts." in name and int(parts[2]) % 2 == 0

    hf = workdir / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    t0 = time.perf_counter()
    to_hf(model, hf, dtype="bfloat16", fp8=fp8, max_shard_bytes=2 ** 30, read=read)
    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, cfg.vocab_size)}}
    Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>")).save(str(hf / "tokenizer.json"))
    tokens = workdir / "tokens"
    tokens.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(tokens / "train.npy", rng.integers(0, cfg.vocab_size, 200_000).astype(np.uint32))
    np.save(tokens / "val.npy", rng.integers(0, cfg.vocab_size, 20_000).astype(np.uint32))
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    return {"seconds": round(time.perf_counter() - t0, 1), "checkpoint_gb": round(size / 1e9, 6)}


_SHAPES: dict = {}


def _shape(model, path: str) -> tuple[int, ...]:
    if not _SHAPES:
        from dsv3_jax.layout import leaves

        _SHAPES.update({name: tuple(var.get_value().shape) for name, var in leaves(model)})
    return _SHAPES[path]


def _run_config(workdir: Path, layers: int):
    from dsv3_jax.train.config import Config, DataConfig, MeshConfig, TrainConfig

    cfg = _config(layers).replace(param_dtype="bfloat16", dtype="bfloat16")
    return Config(model=cfg, train=TrainConfig(batch_size=8, seq_len=64),
                  data=DataConfig(corpus=f"tokens:{workdir / 'tokens'}", tokenizer=str(workdir / "hf")),
                  mesh=MeshConfig(data=2, expert=4, fsdp=True))


def phase_load(workdir: Path, layers: int) -> dict:
    import jax

    from dsv3_jax import hf_init
    from dsv3_jax.train.setup import build_training

    config = _run_config(workdir, layers)
    setup = build_training(config)
    t0 = time.perf_counter()
    ckpt = hf_init.check_checkpoint(workdir / "hf", config.model)
    params = hf_init.load_sharded(ckpt, config.model, setup.abstract.params)
    biases = hf_init.load_sharded(ckpt, config.model, setup.abstract.biases)
    jax.block_until_ready((params, biases))
    seconds = time.perf_counter() - t0
    model_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves((params, biases)))
    return {"seconds": round(seconds, 1), "bytes_read_gb": round(ckpt.bytes_read / 1e9, 6),
            "gb_per_s": round(ckpt.bytes_read / 1e9 / seconds, 3), "model_gb": round(model_bytes / 1e9, 6),
            "peak_rss_gb": round(_peak_rss_gb(), 3)}


def _cli(args: list[str]) -> float:
    from dsv3_jax.cli import main

    t0 = time.perf_counter()
    code = main(args)
    if code != 0:
        raise SystemExit(f"python -m dsv3_jax {' '.join(args)} exited {code}")
    return time.perf_counter() - t0


def phase_convert(workdir: Path, layers: int) -> dict:
    run = workdir / "run"
    shutil.rmtree(run, ignore_errors=True)
    seconds = _cli(["train", "--init-from", str(workdir / "hf"), "--run-dir", str(run), "--corpus",
                    f"tokens:{workdir / 'tokens'}", "--set", "train.steps=0", "--set", "train.seq_len=64",
                    "--set", "train.batch_size=8", "--no-progress", *MESH, *COMPUTE])
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(_peak_rss_gb(), 3)}


def phase_export(workdir: Path, layers: int) -> dict:
    out = workdir / "exported"
    shutil.rmtree(out, ignore_errors=True)
    seconds = _cli(["export", "--run-dir", str(workdir / "run"), "--out", str(out)])
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"seconds": round(seconds, 1), "gb_per_s": round(size / 1e9 / seconds, 3), "written_gb": round(size / 1e9, 3),
            "peak_rss_gb": round(_peak_rss_gb(), 3)}


def phase_compare(workdir: Path, layers: int) -> dict:
    """Bitwise: bf16 tensors as stored; FP8 ones as their dequantised values rounded to bf16."""
    import ml_dtypes
    import numpy as np

    from dsv3_jax.safetensors_io import FP8_DTYPES, SafetensorsDir

    source, exported = SafetensorsDir(workdir / "hf"), SafetensorsDir(workdir / "exported")
    weights = sorted(n for n in source.entries if not n.endswith("_scale_inv"))
    assert set(weights) == set(exported.entries), sorted(set(weights) ^ set(exported.entries))[:5]
    differ, fp8 = [], 0
    for name in weights:
        want = source.read(name)
        if source.entries[name].dtype in FP8_DTYPES:
            fp8 += 1
            want = want.astype(ml_dtypes.bfloat16)
        got = exported.read(name)
        if want.dtype != got.dtype or not np.array_equal(want.view(np.uint8), got.view(np.uint8)):
            differ.append(name)
    return {"tensors": len(weights), "fp8_tensors": fp8, "differ": differ[:5], "bitwise": not differ}


PHASES = {"write": phase_write, "load": phase_load, "convert": phase_convert, "export": phase_export,
          "compare": phase_compare}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--layers", type=int, default=5, help="main layers of the cut-down DeepSeek-V2-Lite")
    p.add_argument("--phase", choices=sorted(PHASES), default=None, help="(internal) run one phase here")
    p.add_argument("--preset", default=None, help="another model's dims (e.g. tiny: a quick check of the phases)")
    args = p.parse_args(argv)
    if args.preset is not None:
        os.environ["HF_LOAD_PRESET"] = args.preset
    if args.phase is not None:
        print(json.dumps(PHASES[args.phase](args.workdir, args.layers)))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()}
    report = {}
    for phase in PHASES:
        done = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--layers", str(args.layers),
                               "--phase", phase], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"phase {phase} failed: {done.stderr.strip().splitlines()[-3:]}")
        report[phase] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{phase}: {report[phase]}", file=sys.stderr, flush=True)
    load, export = report["load"], report["export"]
    report["targets"] = {
        "load_rss_le_model_plus_1_5gb": load["peak_rss_gb"] <= load["model_gb"] + RSS_SLACK_GB,
        "load_gb_per_s_ge_0_3": load["gb_per_s"] >= MIN_GB_PER_S,
        "export_gb_per_s_ge_0_3": export["gb_per_s"] >= MIN_GB_PER_S,
        "export_bitwise": report["compare"]["bitwise"]}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
