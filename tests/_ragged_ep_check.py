"""Multi-device checks for dsv3_jax.moe_ragged, run by tests/test_moe_ragged.py in a fresh process.

It needs 8 host devices, so XLA_FLAGS must hold --xla_force_host_platform_device_count=8 before JAX starts
(the caller sets it). Prints one JSON object of measurements on the last line; the test judges them.
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from dsv3_jax.moe_ragged import (_padded_ragged_all_to_all, exchange_capacity, ragged_experts,  # noqa: E402
                                 ragged_experts_ep)

N, D, F, E, K = 64, 16, 8, 16, 4
MESHES = [(2, 2, 2), (1, 8, 1), (4, 2, 1)]
AXES = ("data", "expert", "tensor")


def make_inputs(routing: str, ep: int, seed: int = 0):
    """Random tokens/weights; 'random' leaves experts 13-15 empty, 'skewed' fills expert shard 0 to its bound."""
    rng = np.random.default_rng(seed)
    local = E // ep
    rows = []
    for _ in range(N):
        if routing == "random":
            rows.append(rng.choice(E - 3, K, replace=False))
        else:  # every token picks all it can of shard 0's experts: the dropless worst case for shard 0
            first = np.arange(min(K, local))
            rest = rng.choice(np.arange(local, E), K - len(first), replace=False)
            rows.append(rng.permutation(np.concatenate([first, rest])))
    idx = jnp.asarray(np.stack(rows), jnp.int32)
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    w = jnp.asarray(rng.random((N, K)) + 0.1, jnp.float32)
    gate, up = (jnp.asarray(rng.standard_normal((E, D, F)) * 0.3, jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((E, F, D)) * 0.3, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    return x, idx, w, gate, up, down, ct


def loss_and_grads(fn, x, idx, w, gate, up, down, ct):
    """(out, grads wrt x, topk_weight, gate, up, down, counts) of sum(out * ct), where fn -> (out, counts, ...)."""
    def loss(x, w, gate, up, down):
        out, counts = fn(x, idx, w, gate, up, down)[:2]
        return jnp.sum(out * ct), (out, counts)
    (_, (out, counts)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, w, gate, up, down)
    return out, grads, counts


def ragged_with_counts(x, idx, w, gate, up, down):
    return ragged_experts(x, idx, w, gate, up, down), jnp.bincount(idx.reshape(-1), length=E)


REFERENCE = jax.jit(lambda *a: loss_and_grads(ragged_with_counts, *a))


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_padded_transport(results: dict) -> None:
    """The emulated ragged_all_to_all reproduces the example of jax.lax.ragged_all_to_all's docstring."""
    mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])

    def body(operand, input_offsets, send_sizes, output_offsets, recv_sizes):
        out = _padded_ragged_all_to_all(operand[0], jnp.zeros((4,), operand.dtype), input_offsets[0], send_sizes[0],
                                        output_offsets[0], recv_sizes[0], axis_name="x", capacity=3)
        return out[None]

    f = jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    got = jax.jit(f)(jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32), jnp.array([[0, 1], [0, 1]], jnp.int32),
                     jnp.array([[1, 2], [1, 1]], jnp.int32), jnp.array([[0, 0], [1, 2]], jnp.int32),
                     jnp.array([[1, 1], [2, 1]], jnp.int32))
    results["padded_doc_example"] = np.asarray(got).tolist()  # docstring: [[1, 3, 0, 0], [2, 2, 4, 0]]


def check_mesh(shape, results: dict) -> None:
    mesh = jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    ep = shape[1]
    tokens, experts = NamedSharding(mesh, P(("data", "expert"))), NamedSharding(mesh, P("expert"))
    shardings = (tokens,) * 3 + (experts,) * 3 + (tokens,)
    ep_step = jax.jit(lambda *a: loss_and_grads(lambda *b: ragged_experts_ep(*b, mesh=mesh), *a))
    compiled = None
    for routing in ("random", "skewed"):
        inputs = make_inputs(routing, ep)
        ref_out, ref_grads, _ = REFERENCE(*inputs)
        # Inputs placed as the function wants them: tokens over (data, expert), weights over expert.
        placed = [jax.device_put(t, s) for t, s in zip(inputs, shardings)]
        if compiled is None:
            compiled = ep_step.lower(*placed).compile()
        out, grads, counts = compiled(*placed)
        results[f"{shape}/{routing}"] = {
            "out_err": max_err(out, ref_out),
            "out_scale": float(np.max(np.abs(np.asarray(ref_out)))),
            "grad_err": {name: max_err(g, r) for name, g, r in zip(("x", "w", "gate", "up", "down"), grads, ref_grads)},
            "grad_scale": {name: float(np.max(np.abs(np.asarray(r)))) for name, r in
                           zip(("x", "w", "gate", "up", "down"), ref_grads)},
            "counts": np.asarray(counts).tolist(),
            "bincount": np.bincount(np.asarray(inputs[1]).ravel(), minlength=E).tolist(),
        }

    if shape[2] > 1:  # expert width F split over tensor too: partial down projections psum'd over tensor
        width = (NamedSharding(mesh, P("expert", None, "tensor")),) * 2 + (NamedSharding(mesh, P("expert", "tensor")),)
        tp_step = jax.jit(lambda *a: loss_and_grads(
            lambda *b: ragged_experts_ep(*b, mesh=mesh, tensor_axis="tensor"), *a))
        inputs = make_inputs("random", ep, seed=5)
        ref_out, ref_grads, _ = REFERENCE(*inputs)
        placed_tp = [jax.device_put(t, s) for t, s in zip(inputs, (tokens,) * 3 + width + (tokens,))]
        tp_compiled = tp_step.lower(*placed_tp).compile()
        out, grads, _ = tp_compiled(*placed_tp)
        results[f"{shape}/tensor"] = {
            "out_err": max_err(out, ref_out), "out_scale": float(np.max(np.abs(np.asarray(ref_out)))),
            "grad_err": {n: max_err(g, r) for n, g, r in zip(("x", "w", "gate", "up", "down"), grads, ref_grads)},
            "grad_scale": {n: float(np.max(np.abs(np.asarray(r)))) for n, r in
                           zip(("x", "w", "gate", "up", "down"), ref_grads)},
            "weight_shard_shape": list(tp_compiled.input_shardings[0][3].shard_shape(inputs[3].shape)),
            "hlo_all_gather": "all-gather" in tp_compiled.as_text()}

    # Each device holds E/ep experts, and the compiled program takes the weights with that sharding (another
    # one would mean gathering the experts); its only collectives on them are the all-to-alls of tokens.
    gate, up, down = placed[3:6]
    hlo = compiled.as_text()
    in_shardings = compiled.input_shardings[0]
    results[f"{shape}/placement"] = {
        "local_expert_rows": sorted({s.data.shape[0] for t in (gate, up, down) for s in t.addressable_shards}),
        "compiled_weight_shard_rows": [in_shardings[i].shard_shape(t.shape)[0] for i, t in
                                       zip((3, 4, 5), (gate, up, down))],
        "hlo_all_to_all": "all-to-all" in hlo,
        "hlo_all_gather": "all-gather" in hlo,
        "expected_local_experts": E // ep,
    }
    # The accelerator transport cannot run on CPU; it must still trace and lower, forward and backward.
    rag = lambda *b: ragged_experts_ep(*b, mesh=mesh, transport="ragged")  # noqa: E731
    text = jax.jit(lambda *a: loss_and_grads(rag, *a)).lower(*placed).as_text()
    results[f"{shape}/ragged_lowering_ops"] = text.count("ragged_all_to_all")


def kept_assignments(idx: np.ndarray, n_token_shards: int, ep: int, capacity: int) -> np.ndarray:
    """[N, K] bool: which assignments survive a per-(token shard, expert shard) cap of `capacity` rows, when each
    token shard sends its assignments sorted by expert (stable) and every destination keeps its first rows."""
    n, k = idx.shape
    local = E // ep
    kept = np.zeros(n * k, bool)
    per_shard = n // n_token_shards
    for shard in range(n_token_shards):
        flat = idx[shard * per_shard:(shard + 1) * per_shard].reshape(-1)
        order = np.argsort(flat, kind="stable")
        dest = flat[order] // local
        rank = np.zeros_like(order)
        for p in range(ep):
            rank[dest == p] = np.arange(np.sum(dest == p))
        kept[shard * per_shard * k + order[rank < capacity]] = True
    return kept.reshape(n, k)


def check_capacity(results: dict) -> None:
    """capacity_factor=1 on skewed routing: the EP path drops exactly the overflow of each exchange pair and
    equals the single-device path with those assignments' weights set to zero."""
    for shape in [(1, 8, 1), (2, 2, 2)]:
        mesh = jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
        ep, n_token_shards = shape[1], shape[0] * shape[1]
        x, idx, w, gate, up, down, ct = make_inputs("skewed", ep, seed=11)
        cap = exchange_capacity(N // n_token_shards, K, E // ep, ep, 1.0)
        kept = kept_assignments(np.asarray(idx), n_token_shards, ep, cap)
        fn = jax.jit(lambda *a: ragged_experts_ep(*a, mesh=mesh, capacity_factor=1.0))
        out, _, dropped = fn(x, idx, w, gate, up, down)
        ref = ragged_experts(x, idx, w * jnp.asarray(kept, jnp.float32), gate, up, down)
        results[f"{shape}/capacity"] = {"out_err": max_err(out, ref), "out_scale": float(np.max(np.abs(np.asarray(ref)))),
                                        "dropped": int(dropped), "expected_dropped": int((~kept).sum()),
                                        "capacity": cap, "dropless_capacity": (N // n_token_shards) * min(K, E // ep)}


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    results: dict = {}
    check_padded_transport(results)
    check_capacity(results)
    for shape in MESHES:
        check_mesh(shape, results)
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
