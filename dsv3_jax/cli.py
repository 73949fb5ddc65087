"""Command line: `python -m dsv3_jax {train,prepare,eval,params,plan,compile,generate} ...`.

Every argument is validated (config overrides included) before data is prepared or anything compiles.
`--distributed` joins a multi-process run first (see `dsv3_jax.distributed`); the mesh comes from `mesh.*`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from dsv3_jax.config import PRESETS, ConfigError, get_preset


def _load_run_config(run_dir: str):
    """The run's saved config, None if `run_dir` holds no run yet; RunDirError if it is not a directory or its
    config.json is unreadable (never silently ignored: that would start the run over)."""
    from dsv3_jax import rundir
    from dsv3_jax.train.config import read_run_config

    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise rundir.RunDirError(f"--run-dir {run_dir!r} exists and is not a directory")
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        return None
    return read_run_config(run_dir)


def _build_config(args: argparse.Namespace):
    """Preset + --corpus + --set overrides; for an existing run dir without --preset/--corpus, its saved config
    (plus any --set, e.g. `--set mesh.expert=8` to resume on another mesh)."""
    from dsv3_jax.train.config import Config, DataConfig, apply_overrides
    from dsv3_jax.train.presets import train_preset

    saved = _load_run_config(args.run_dir) if args.run_dir is not None else None
    init_from = getattr(args, "init_from", None)
    if init_from is not None:
        return _init_from_config(args, saved)
    if saved is not None and args.preset is None and args.corpus is None:
        return apply_overrides(saved, args.set or [])
    preset = args.preset or "small"
    config = Config(model=get_preset(preset), train=train_preset(preset),
                    data=DataConfig(corpus=args.corpus or "shakespeare"))
    return apply_overrides(config, args.set or [])


def _init_from_config(args: argparse.Namespace, saved):
    """A run started from published weights: the model from HF_DIR/config.json (compute fields may be set, its
    shape may not), training/mesh/data from the defaults and --set, the source recorded in train.init_from.
    An existing run started from the same checkpoint resumes with its saved config."""
    from dsv3_jax import hf_config, hf_init
    from dsv3_jax.config import COMPUTE_FIELDS
    from dsv3_jax.train.config import Config, DataConfig, TrainConfig, apply_overrides

    if args.preset is not None:
        raise ConfigError("--preset", "--init-from takes the model from HF_DIR/config.json; drop --preset")
    directory = os.path.abspath(args.init_from)
    if not os.path.isdir(directory):
        raise ConfigError("--init-from", f"{args.init_from!r} is not a directory (an HF checkpoint directory "
                          "holding config.json and *.safetensors)")
    record = hf_init.source_record(directory)
    sets = list(args.set or [])
    for item in sets:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") and key.split(".")[1] not in COMPUTE_FIELDS:
            raise ConfigError(key, f"is part of the published model's shape ({directory}/config.json); with "
                              f"--init-from only how it computes may be set ({', '.join(COMPUTE_FIELDS)})")
    if saved is not None:  # resuming: the run must be the one this checkpoint started
        if saved.train.init_from_sha256 != record["index_sha256"]:
            source = saved.train.init_from or "a random initialisation"
            raise ConfigError("--init-from", f"{args.run_dir} is a run started from {source}, not from "
                              f"{directory}; use a new --run-dir")
        return apply_overrides(saved, sets)
    model = hf_config.from_hf(directory)
    tokenizer = os.path.join(directory, "tokenizer.json")
    config = Config(model=model, train=TrainConfig(init_from=record["path"], init_from_sha256=record["index_sha256"]),
                    data=DataConfig(corpus=args.corpus or "shakespeare",
                                    tokenizer=tokenizer if os.path.isfile(tokenizer) else None))
    config = apply_overrides(config, sets)
    if (config.train.init_from, config.train.init_from_sha256) != (record["path"], record["index_sha256"]):
        raise ConfigError("train.init_from", "is recorded by --init-from; do not set it")
    return config


def _maybe_distributed(args: argparse.Namespace) -> None:
    """Join the cluster first: nothing may touch a device before jax.distributed.initialize."""
    explicit = any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if explicit and not args.distributed:
        raise ConfigError("--distributed", "--coordinator/--num-processes/--process-id need --distributed")
    if args.distributed:
        from dsv3_jax import distributed

        index, count = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        print(f"process {index} of {count} joined the cluster", file=sys.stderr)


def _tokenizer_source(own_tokenizer, config) -> dict:
    """prepare_data's tokenizer arguments: the run's own copy when it has one, else `data.tokenizer` (or None:
    the BPE trained on the corpus)."""
    if own_tokenizer is not None:
        return {"tokenizer_path": own_tokenizer, "tokenizer_origin": "the run's own"}
    return {"tokenizer_path": config.data.tokenizer}


def _prepare_kwargs(config) -> dict:
    """prepare_data's arguments that come from the config alone."""
    return dict(corpus_name=config.data.corpus, vocab_size=config.model.vocab_size, seq_len=config.train.seq_len,
                mtp_depth=config.model.mtp_depth, cache_dir=config.data.cache_dir, text_field=config.data.text_field,
                workers=config.data.workers, token_dtype=config.data.token_dtype)


def _prepare_data_in_turn(config, **kwargs):
    """prepare_data on process 0 first; the others wait for it, then read (or, without a shared cache, rebuild)
    its cache."""
    from dsv3_jax import distributed
    from dsv3_jax.data import prepare_data

    primary = distributed.is_primary()
    return distributed.primary_first(
        lambda: prepare_data(**_prepare_kwargs(config), verbose=primary, **kwargs), "preparing the data",
        log=lambda msg: print(msg, file=sys.stderr, flush=True))


def cmd_train(args: argparse.Namespace) -> int:
    from dsv3_jax import distributed, rundir
    from dsv3_jax.train.profiling import parse_profile
    from dsv3_jax.train.trainer import train

    profile = None
    if args.profile is not None:
        try:
            profile = parse_profile(args.profile)
        except ValueError as err:
            raise ConfigError("--profile", str(err).removeprefix("--profile ")) from None
    config = _build_config(args)  # validated: bad overrides fail here, before data or compilation
    if args.break_lock:
        holder = rundir.break_lock(args.run_dir)
        print(f"removed the lock of {holder}" if holder else f"{args.run_dir} was not locked", file=sys.stderr)
    _maybe_distributed(args)

    def prepare(setup):
        """Called by train() once the run is locked and its checkpoints match `config`: a resumed run reads
        its data with its own tokenizer."""
        own_tokenizer = rundir.run_tokenizer_path(args.run_dir) if rundir.has_checkpoints(args.run_dir) else None
        _, slice_count = setup.plan.process_batch_slice(config.train.batch_size)
        return _prepare_data_in_turn(config, batch_size=config.train.batch_size, process_count=slice_count,
                                     progress_bar=not args.no_progress and distributed.is_primary(),
                                     **_tokenizer_source(own_tokenizer, config))

    init_from = None
    if config.train.init_from is not None and not rundir.has_checkpoints(args.run_dir):
        from dsv3_jax.hf_init import check_checkpoint  # headers only: a bad checkpoint fails before any work

        init_from = check_checkpoint(config.train.init_from, config.model)
    result = train(config, args.run_dir, prepare, show_progress=not args.no_progress, profile=profile,
                   init_from=init_from)
    if result.last_eval is not None:
        print(f"final validation loss {result.last_eval['val_loss']:.4f}, "
              f"MaxVio_global {result.last_eval['maxvio_global']:.3f}")
    if result.plot_path:
        print(f"loss curve: {result.plot_path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run's newest checkpoint as an HF directory, streamed tensor by tensor."""
    from dsv3_jax import distributed
    from dsv3_jax.export import ExportError, export_run

    if args.max_shard_gb is not None and not args.max_shard_gb > 0:
        raise ExportError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    shard = int(args.max_shard_gb * 2 ** 30) if args.max_shard_gb is not None else None
    _maybe_distributed(args)
    result = export_run(args.run_dir, args.out, dtype=args.dtype, fp8=args.fp8,
                        **({"max_shard_bytes": shard} if shard is not None else {}))
    if distributed.is_primary():
        rate = result.bytes / 1e9 / max(result.seconds, 1e-9)
        print(f"exported step {result.step} of {args.run_dir} to {result.directory}: {result.files} file(s), "
              f"{result.bytes / 1e9:.2f} GB in {result.seconds:.1f} s ({rate:.2f} GB/s)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Encode a corpus into the window cache that `train` with the same settings reads (or report the cached
    one); one summary line, or one JSON object with --json."""
    import time

    from dsv3_jax.data import prepare_data

    args.run_dir = None
    config = _build_config(args)
    started, t0 = time.time(), time.perf_counter()
    data = prepare_data(**_prepare_kwargs(config), tokenizer_path=config.data.tokenizer,
                        progress_bar=not args.no_progress, verbose=not args.json)
    seconds = time.perf_counter() - t0
    meta = json.loads((data.directory / "meta.json").read_text())
    splits = meta["splits"]
    summary = {
        "corpus": config.data.corpus, "directory": str(data.directory),
        "documents": meta.get("n_documents"), "bytes": sum(s["n_bytes"] for s in splits.values()),
        "tokens": sum(s["n_tokens"] for s in splits.values()),
        "shards": sum(len(s["shards"]) for s in splits.values()), "seconds": round(seconds, 2),
        "build_seconds": meta.get("build_seconds"), "workers": meta.get("workers"),
        "reused": (data.directory / "meta.json").stat().st_mtime < started,  # written before this command began
        "window": data.window, "vocab_size": data.tokenizer.vocab_size, "tokenizer": str(data.tokenizer.path),
        "content_hash": meta.get("corpus_content_hash"),
        "train": {k: splits["train"][k] for k in ("n_docs", "n_bytes", "n_tokens", "n_windows")},
        "val": {k: splits["val"][k] for k in ("n_docs", "n_bytes", "n_tokens", "n_windows")},
    }
    summary["bytes_per_token"] = round(summary["bytes"] / max(summary["tokens"], 1), 3)
    if args.json:
        print(json.dumps(summary))
    else:
        docs = "?" if summary["documents"] is None else f"{summary['documents']:,}"
        print(f"prepared {summary['corpus']}: {docs} documents, {summary['bytes'] / 1e6:,.1f} MB, "
              f"{summary['tokens']:,} tokens, {summary['bytes_per_token']:.2f} bytes/token, "
              f"{summary['seconds']:.1f} s, {summary['shards']} shards"
              f"{' (prepared before)' if summary['reused'] else ''} -> {summary['directory']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dsv3_jax import rundir
    from dsv3_jax.loading import restore_for_reading
    from dsv3_jax.train.config import apply_overrides
    from dsv3_jax.train.setup import build_training
    from dsv3_jax.train.trainer import evaluate

    if args.max_batches < 0:
        raise ConfigError("--max-batches", f"must be >= 0 (0 = the whole validation split), got {args.max_batches}")
    for item in args.set or []:
        if not item.strip().startswith("mesh."):
            raise ConfigError(item.split("=")[0], "eval only takes mesh.* overrides; the rest is the run's config")
    rundir.require_run_dir(args.run_dir)
    saved = _load_run_config(args.run_dir)
    if not rundir.has_checkpoints(args.run_dir):
        raise rundir.RunDirError(f"{args.run_dir!r} has no checkpoint under checkpoints/: train it first")
    config = apply_overrides(saved, args.set or [])
    _maybe_distributed(args)
    setup = build_training(config)
    restored = restore_for_reading(args.run_dir, config, setup.abstract)
    if restored is None:
        raise rundir.RunDirError(f"no restorable checkpoint in {args.run_dir}/checkpoints")
    own_tokenizer = rundir.run_tokenizer_path(args.run_dir)
    if own_tokenizer is None:
        print(rundir.legacy_tokenizer_note(args.run_dir, config.data.corpus), file=sys.stderr)
    data = _prepare_data_in_turn(config, **_tokenizer_source(own_tokenizer, config))
    change = rundir.corpus_change(rundir.read_data_record(args.run_dir), data.corpus_name, data.corpus_hash)
    if change is not None:
        print(f"note: {change}; evaluating on its current validation split with the run's tokenizer",
              file=sys.stderr)
    index, count = setup.plan.process_batch_slice(config.train.batch_size)
    result = evaluate(setup.eval_step, restored.state.params, restored.state.biases,
                      data.val_batches(config.train.batch_size, index, count), args.max_batches, setup.put_batch)
    out = {"step": restored.step, "val_loss": result["val_loss"], "val_mtp_loss": result["val_mtp_loss"],
           "maxvio_global": result["maxvio_global"], "maxvio_global_layers": result["maxvio_global_layers"],
           "val_batches": result["val_batches"], "corpus_changed": change is not None}
    from dsv3_jax import distributed

    if distributed.is_primary():
        print(json.dumps(out, indent=2))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from dsv3_jax.accounting import count_params
    from dsv3_jax.kv_cache import latent_cache_bytes_per_token
    from dsv3_jax.train.config import Config, apply_overrides

    for item in args.set or []:
        if not item.strip().startswith("model."):
            raise ConfigError(item.split("=")[0], "params only takes model.* overrides (parameter counts do not "
                              "depend on train, data or mesh settings)")
    cfg = apply_overrides(Config(model=get_preset(args.preset)), args.set or []).model
    count = count_params(cfg)
    print(json.dumps({"preset": args.preset, **count.__dict__, "summary": count.summary(),
                      "kv_cache_bytes_per_token_bf16": latent_cache_bytes_per_token(cfg, "bfloat16")}, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-device memory of one train step for a preset + overrides on a mesh, without allocating anything."""
    from dsv3_jax.plan import estimate_memory, format_plan
    from dsv3_jax.train.config import Config, apply_overrides
    from dsv3_jax.train.presets import train_preset

    if args.devices is not None and args.devices < 1:
        raise ConfigError("--devices", f"must be >= 1, got {args.devices}")
    config = apply_overrides(Config(model=get_preset(args.preset), train=train_preset(args.preset)), args.set or [])
    mesh_cfg = config.mesh.validate()
    sizes = mesh_cfg.shape(args.devices)  # mesh.* against --devices, as training checks them against jax.devices()
    plan = estimate_memory(config.model, config.train, sizes, fsdp=mesh_cfg.fsdp, backend=args.backend)
    print(format_plan(plan, as_json=args.json))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """AOT compilation of the train step for an accelerator target (dsv3_jax/aot.py)."""
    from dsv3_jax.aot import compile_train_step, format_report, parse_target
    from dsv3_jax.train.config import Config, apply_overrides
    from dsv3_jax.train.presets import train_preset

    target = parse_target(args.target)  # a bad target fails before any backend starts
    config = apply_overrides(Config(model=get_preset(args.preset), train=train_preset(args.preset)), args.set or [])
    report = compile_train_step(config, target, dump_hlo=args.dump_hlo)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dsv3_jax.generate_cli import run

    return run(args)


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (run the same command on every host)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run (jax.distributed.initialize); without the flags below, "
                            "read the cluster from the environment (Cloud TPU, SLURM, Open MPI)")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=None, help="process 0's address")
    group.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    group.add_argument("--process-id", type=int, default=None, help="this process's index, 0-based")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsv3_jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a run")
    train.add_argument("--run-dir", required=True, help="where checkpoints, metrics and plots go; resumes if present")
    train.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model preset (default: small)")
    train.add_argument("--corpus", default=None, help="shakespeare (default), lit, stdlib, files:GLOB or tokens:DIR")
    train.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                       help="override any config field, e.g. --set train.steps=2000 --set model.n_routed_experts=32")
    train.add_argument("--init-from", metavar="HF_DIR", default=None,
                       help="start from a published HF checkpoint (bf16/fp32 or FP8 safetensors): the model comes "
                            "from HF_DIR/config.json and each device reads only its own slices; with "
                            "--set train.steps=0 the run's step-0 checkpoint is written and nothing trains")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    train.add_argument("--break-lock", action="store_true",
                       help="remove the run directory's lock left by a training process that is dead (e.g. a "
                            "crashed host); refused while a process on this machine still holds it")
    train.add_argument("--profile", metavar="START:COUNT", default=None,
                       help="write a jax.profiler trace of the COUNT steps after step START into RUN_DIR/profile "
                            "(open with TensorBoard's profile plugin or XProf)")
    _add_cluster_flags(train)
    train.set_defaults(func=cmd_train)

    export = sub.add_parser("export", help="a run's newest checkpoint as an HF safetensors directory")
    export.add_argument("--run-dir", required=True, help="the run to export")
    export.add_argument("--out", required=True, help="the HF directory to create (new, or empty)")
    export.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                        help="dtype of the exported tensors (router biases stay float32)")
    export.add_argument("--fp8", action="store_true",
                        help="FP8 128x128 block-quantise the tensors the official checkpoint quantises")
    export.add_argument("--max-shard-gb", type=float, default=None, help="largest safetensors file (default 5 GiB)")
    _add_cluster_flags(export)
    export.set_defaults(func=cmd_export)

    prep = sub.add_parser("prepare", help="tokenize a corpus into the window shards train reads (parallel, "
                          "resumable; train does it implicitly)")
    prep.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="model/train preset deciding vocab_size, seq_len and mtp_depth (default: small)")
    prep.add_argument("--corpus", default=None, help="shakespeare (default), lit, stdlib, files:GLOB or tokens:DIR")
    prep.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                      help="e.g. --set data.workers=8 --set data.tokenizer=tok.json --set model.vocab_size=129280")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.add_argument("--json", action="store_true", help="print one JSON object (and no logs)")
    prep.set_defaults(func=cmd_prepare)

    ev = sub.add_parser("eval", help="validation loss and MaxVio_global of a run's latest checkpoint")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--max-batches", type=int, default=0, help="0 = the whole validation split")
    ev.add_argument("--set", action="append", metavar="mesh.FIELD=VALUE", help="evaluate on another mesh")
    _add_cluster_flags(ev)
    ev.set_defaults(func=cmd_eval)

    params = sub.add_parser("params", help="parameter counts of a preset without allocating it")
    params.add_argument("--preset", choices=sorted(PRESETS), default="deepseek-v3-671b")
    params.add_argument("--set", action="append", metavar="model.FIELD=VALUE")
    params.set_defaults(func=cmd_params)

    from dsv3_jax.generate_cli import add_arguments as add_generate_arguments

    gen = sub.add_parser("generate", help="generate from a run's latest checkpoint or an HF checkpoint "
                         "(latent-cache decoding, sampling, MTP speculative decoding)")
    add_generate_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    plan = sub.add_parser("plan", help="per-device memory of a train step on a mesh, without allocating the model")
    plan.add_argument("--preset", choices=sorted(PRESETS), default="deepseek-v3-671b")
    plan.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                      help="model/train/mesh overrides, e.g. --set mesh.expert=64 --set mesh.tensor=8 "
                           "--set train.batch_size=256 --set mesh.fsdp=true")
    plan.add_argument("--devices", type=int, default=None,
                      help="device count: fills the mesh axis left at -1 (default data=-1 -> 1) and is checked "
                           "against the others")
    plan.add_argument("--backend", choices=("gpu", "tpu", "cpu"), default="gpu",
                      help="the target backend; decides what moe_dispatch=auto becomes (default gpu: ragged)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=cmd_plan)

    aot = sub.add_parser("compile", help="AOT-compile the sharded train step for a TPU slice or GPU nodes on this "
                                         "host (no accelerator needed): memory per device, fit, FLOPs, collectives")
    aot.add_argument("--target", required=True, help="TPU topology, e.g. v5p:2x2x1 (4 chips), v5p:8x8x8, v5e:4x4; "
                                                     "or GPU nodes: h100:8 (one node of 8), h200:8x4 (4 nodes)")
    aot.add_argument("--preset", choices=sorted(PRESETS), default="small")
    aot.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                     help="model/train/mesh overrides, e.g. --set mesh.expert=4 --set model.remat=full")
    aot.add_argument("--json", action="store_true", help="one JSON object")
    aot.add_argument("--dump-hlo", metavar="DIR", default=None, help="write the optimised HLO text to DIR")
    aot.set_defaults(func=cmd_compile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Expected failures (bad configuration, arguments, data, checkpoints, run directories)
    print one `error: ...` line and exit 2; a signal stops training cleanly with 128 + its number. Anything
    else is a bug and keeps its traceback (DSV3_DEBUG=1 shows tracebacks for the expected ones too)."""
    from dsv3_jax.checkpoint import CheckpointReadError, CheckpointSaveError, NoRestorableCheckpoint
    from dsv3_jax.data import DownloadError
    from dsv3_jax.distributed import DistributedError
    from dsv3_jax.train.interrupt import TrainingInterrupted
    from dsv3_jax.train.trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingInterrupted as stop:
        if stop.step is None:
            print(f"{stop}; nothing was changed", file=sys.stderr)
        else:
            print(f"{stop}; resume with: python -m dsv3_jax train --run-dir {stop.run_dir}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConfigError as err:
        if os.environ.get("DSV3_DEBUG"):
            raise
        print(f"error: invalid configuration: {err}", file=sys.stderr)
        return 2
    except (TrainingDiverged, NoRestorableCheckpoint, CheckpointSaveError, CheckpointReadError, DownloadError,
            DistributedError, ValueError, OSError) as err:
        # Bad data, checkpoints, run directories or arguments: one clear line.
        if os.environ.get("DSV3_DEBUG"):
            raise
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
