"""Runs on 8 fake CPU devices (started by tests/test_sharding.py in a subprocess): sharded train/eval steps vs
one device, dispatch strategies, expert placement, global expert counts, checkpoints across meshes, and mesh
errors. Writes one JSON report; the tests assert on it. Usage: python tests/_mesh_equivalence.py OUT.json TMPDIR
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax import sharding  # noqa: E402
from dsv3_jax.checkpoint import RunCheckpointer  # noqa: E402
from dsv3_jax.config import ConfigError, get_preset  # noqa: E402
from dsv3_jax.train.config import Config, MeshConfig, TrainConfig  # noqa: E402
from dsv3_jax.train.step import abstract_train_state, init_train_state, jit_eval_step, jit_train_step  # noqa: E402

# tiny with 4 heads (so tensor=4 divides), float32, one dense + one MoE layer and no MTP block: compile time
# grows by ~5 s per MoE block on this CPU (MTP under sharding is covered by tests/test_multihost.py).
MODEL = get_preset("tiny").replace(num_attention_heads=4, num_hidden_layers=2, num_nextn_predict_layers=0,
                                   init_std=0.02)
TRAIN = TrainConfig(steps=10, batch_size=8, seq_len=16, peak_lr=1e-3, warmup_frac=0.0, bias_update_rate=0.01)
MESHES = {"2x2x2_fsdp": (2, 2, 2, True), "1x8x1": (1, 8, 1, False), "8x1x1": (8, 1, 1, False),
          "1x2x4": (1, 2, 4, False)}
WINDOWS = [np.asarray(jax.random.randint(jax.random.key(i), (TRAIN.batch_size, TRAIN.seq_len + 1 + MODEL.mtp_depth), 0,
                                         MODEL.vocab_size)) for i in range(3)]
METRIC_KEYS = ("loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio_batch")


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def steps(step_fn, plan, state, windows):
    history = []
    for window in windows:
        state, metrics = step_fn(state, plan.put_batch(window))
        history.append({k: float(metrics[k]) for k in METRIC_KEYS})
    return state, history


def main(out_path: str, tmp: str) -> None:
    report: dict = {"timings": {}}
    t0 = time.perf_counter()

    def lap(name):
        nonlocal t0
        report["timings"][name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {report['timings'][name]} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()

    # ---- one-device reference ------------------------------------------------------------------
    one = sharding.plan_for(1, 1, 1, devices=jax.devices()[:1])
    _, abstract = abstract_train_state(MODEL, TRAIN)
    one_sh = one.shardings(abstract)
    graphdef, state0 = init_train_state(MODEL, TRAIN, one, one_sh)
    init_host = host(state0)
    ref_step = jit_train_step(graphdef, MODEL, TRAIN, one, one_sh)
    ref_state, ref_hist = steps(ref_step, one, state0, WINDOWS[:2])
    ref_final = host(ref_state)
    ref_eval = host(jit_eval_step(graphdef, MODEL, TRAIN, one, one_sh)(ref_final.params, ref_final.biases,
                                                                      one.put_batch(WINDOWS[2])))
    lap("reference_1dev")

    # ---- every mesh: same start, two steps ------------------------------------------------------
    report["meshes"] = {}
    step_fns, plans = {}, {}
    for name, (d, e, t, fsdp) in MESHES.items():
        plan = sharding.plan_for(d, e, t, fsdp)
        sharding.check_model_fits(plan, MODEL, TRAIN.batch_size)
        shardings = plan.shardings(abstract)
        start = jax.device_put(init_host, shardings)
        # compile once, explicitly, so the HLO can be inspected without a second compilation
        compiled = jit_train_step(graphdef, MODEL, TRAIN, plan, shardings).lower(start, plan.put_batch(WINDOWS[0]))
        compiled = compiled.compile()
        fn = sharding.MeshFunction(compiled, plan)
        final, hist = steps(fn, plan, start, WINDOWS[:2])
        final_host = host(final)
        experts = final.params["moe_layers"]["mlp"]["experts"]["gate_proj"][...]  # [L_moe, E, D, F]
        entry = {
            "param_diff": max_diff(final_host.params, ref_final.params),
            "bias_diff": max_diff(final_host.biases, ref_final.biases),
            "opt_diff": max_diff(final_host.opt_state, ref_final.opt_state),  # Adam moments: the gradients
            "metric_diff": max(abs(a[k] - b[k]) for a, b in zip(hist, ref_hist) for k in METRIC_KEYS),
            # per layer: the stack's leading layer axis must never be split
            "layer_axis_whole": all(s.data.shape[0] == experts.shape[0] for s in experts.addressable_shards),
            "expert_shard_shape": list(experts.sharding.shard_shape(experts.shape))[1:],
            "expert_addressable_shapes": sorted({tuple(s.data.shape)[1:] for s in experts.addressable_shards}),
            "experts_shape": list(experts.shape)[1:],
            "embedding_spec": str(final.params["embed_tokens"]["embedding"].sharding.spec),
        }
        if e > 1:
            hlo = compiled.as_text()
            entry["hlo_all_to_all"] = "all-to-all" in hlo
            entry["hlo_collectives"] = sorted({op for op in ("all-to-all", "all-gather", "all-reduce",
                                                             "reduce-scatter", "collective-permute") if op in hlo})
        report["meshes"][name] = entry
        step_fns[name], plans[name] = (fn, shardings), plan
        lap(f"mesh_{name}")

    # ---- sharded init (jit with out_shardings) equals the one-device init -----------------------
    plan = plans["2x2x2_fsdp"]
    _, sharded0 = init_train_state(MODEL, TRAIN, plan, step_fns["2x2x2_fsdp"][1])
    report["sharded_init_diff"] = max_diff(host(sharded0), init_host)
    report["sharded_init_specs_match"] = all(
        a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(jax.tree.leaves(sharded0),
                                                               jax.tree.leaves(step_fns["2x2x2_fsdp"][1])))
    lap("sharded_init")

    # ---- dispatch strategies on an expert- and tensor-sharded mesh (forward: loss and expert loads) --
    report["dispatch"] = {}
    sh = step_fns["2x2x2_fsdp"][1]
    for dispatch in ("capacity", "dense", "blocked", "ragged"):
        cfg = MODEL.replace(moe_dispatch=dispatch)
        out = host(jit_eval_step(graphdef, cfg, TRAIN, plan, sh)(
            jax.device_put(ref_final.params, sh.params), jax.device_put(ref_final.biases, sh.biases),
            plan.put_batch(WINDOWS[2])))
        report["dispatch"][dispatch] = {
            "loss_diff": abs(float(out["loss"]) - float(ref_eval["loss"])),
            "counts_diff": float(np.abs(out["expert_counts"] - ref_eval["expert_counts"]).max())}
        lap(f"dispatch_{dispatch}")

    # ---- ragged dispatch trains like the one-device run (shard_map EP: all-to-all, local experts only) ---
    report["ragged_train"] = {}
    ragged_cfg = MODEL.replace(moe_dispatch="ragged")
    for name in ("2x2x2_fsdp", "1x8x1"):
        plan, (_, shardings) = plans[name], step_fns[name]
        start = jax.device_put(init_host, shardings)
        compiled = jit_train_step(graphdef, ragged_cfg, TRAIN, plan, shardings).lower(
            start, plan.put_batch(WINDOWS[0])).compile()
        final, hist = steps(sharding.MeshFunction(compiled, plan), plan, start, WINDOWS[:2])
        final_host = host(final)
        hlo = compiled.as_text()
        report["ragged_train"][name] = {
            "param_diff": max_diff(final_host.params, ref_final.params),
            "bias_diff": max_diff(final_host.biases, ref_final.biases),
            "metric_diff": max(abs(a[k] - b[k]) for a, b in zip(hist, ref_hist) for k in METRIC_KEYS),
            "hlo_all_to_all": "all-to-all" in hlo}
        lap(f"ragged_train_{name}")

    # ---- gradient accumulation on a mesh: two microbatches per step equal the one-device whole batch ---
    accum_train = dataclasses.replace(TRAIN, grad_accum=2)  # microbatch 4 = data*expert on 2x2x2
    plan, (_, shardings) = plans["2x2x2_fsdp"], step_fns["2x2x2_fsdp"]
    sharding.check_model_fits(plan, MODEL, accum_train.batch_size, grad_accum=accum_train.grad_accum)
    start = jax.device_put(init_host, shardings)
    final, hist = steps(jit_train_step(graphdef, MODEL, accum_train, plan, shardings), plan, start, WINDOWS[:2])
    final_host = host(final)
    report["grad_accum"] = {"param_diff": max_diff(final_host.params, ref_final.params),
                            "bias_diff": max_diff(final_host.biases, ref_final.biases),
                            "metric_diff": max(abs(a[k] - b[k]) for a, b in zip(hist, ref_hist) for k in METRIC_KEYS)}
    lap("grad_accum_2x2x2_fsdp")

    # ---- expert counts are global under jit + GSPMD (eval step on the data-sharded mesh) ----------
    plan8 = plans["8x1x1"]
    out = host(jit_eval_step(graphdef, MODEL, TRAIN, plan8, step_fns["8x1x1"][1])(
        jax.device_put(ref_final.params, step_fns["8x1x1"][1].params),
        jax.device_put(ref_final.biases, step_fns["8x1x1"][1].biases), plan8.put_batch(WINDOWS[2])))
    n_tokens = TRAIN.batch_size * (TRAIN.seq_len + MODEL.mtp_depth)
    report["counts"] = {"sharded_sum": out["expert_counts"].sum(-1).tolist(),
                        "expected_sum": n_tokens * MODEL.num_experts_per_tok,
                        "diff_vs_1dev": float(np.abs(out["expert_counts"] - ref_eval["expert_counts"]).max()),
                        "loss_diff_vs_1dev": abs(float(out["loss"]) - float(ref_eval["loss"]))}
    lap("global_counts")

    # ---- checkpoint on 8x1x1, restore on 1x8x1 and on one device --------------------------------
    fn8, sh8 = step_fns["8x1x1"]
    state, _ = steps(fn8, plan8, jax.device_put(init_host, sh8), WINDOWS[:1])
    ckpt = RunCheckpointer(os.path.join(tmp, "ckpt_run"), keep=2)
    data_state = {"grain": {"next_index": 1}, "note": "round trip"}
    ckpt.save(1, state, data_state, {"mesh": {"data": 8}})
    ckpt.close()
    _, cont_hist = steps(fn8, plan8, state, WINDOWS[1:])
    report["checkpoint"] = {"continued": cont_hist, "restored": {}}
    for name, (target_plan, target_fn) in {"1x8x1": (plans["1x8x1"], step_fns["1x8x1"]),
                                           "1dev": (one, (ref_step, None))}.items():
        _, target_abstract = abstract_train_state(MODEL, TRAIN, target_plan)
        reader = RunCheckpointer(os.path.join(tmp, "ckpt_run"), keep=2, writable=False)
        latest = reader.restore_latest(target_abstract)
        reader.close()
        step_no, restored, restored_data = latest.step, latest.state, latest.data_state
        leaf = restored.params["moe_layers"]["mlp"]["experts"]["gate_proj"][...]
        _, hist = steps(target_fn[0], target_plan, restored, WINDOWS[1:])
        report["checkpoint"]["restored"][name] = {
            "step": step_no, "data_state_ok": restored_data == data_state, "history": hist,
            "expert_sharding_matches": leaf.sharding.is_equivalent_to(target_abstract.params["moe_layers"]["mlp"][
                "experts"]["gate_proj"].get_value().sharding, leaf.ndim),
            "max_metric_diff": max(abs(a[k] - b[k]) for a, b in zip(hist, cont_hist) for k in METRIC_KEYS)}
    lap("checkpoint")

    # ---- impossible meshes fail with a named ConfigError before anything compiles ---------------
    bad = {
        "product": (MeshConfig(data=3), MODEL, TRAIN),
        "fill": (MeshConfig(data=-1, expert=3), MODEL, TRAIN),
        "heads": (MeshConfig(data=1, expert=2, tensor=4), MODEL.replace(num_attention_heads=2), TRAIN),
        "experts": (MeshConfig(data=1, expert=8), MODEL.replace(n_routed_experts=12, n_group=4), TRAIN),
        "vocab": (MeshConfig(data=2, expert=1, tensor=4), MODEL.replace(vocab_size=130), TRAIN),
        "batch": (MeshConfig(data=8), MODEL, dataclasses.replace(TRAIN, batch_size=4)),
        "fsdp": (MeshConfig(data=8, fsdp=True), MODEL.replace(hidden_size=36), TRAIN),
    }
    report["errors"] = {}
    for name, (mesh_cfg, model_cfg, train_cfg) in bad.items():
        try:
            sharding.plan_from_config(Config(model=model_cfg, train=train_cfg, mesh=mesh_cfg))
            report["errors"][name] = None
        except ConfigError as err:
            report["errors"][name] = str(err)
    lap("errors")

    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
