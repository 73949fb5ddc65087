"""What an optimised HLO module (the text of `compiled.as_text()`) costs: matmul FLOPs and collectives.

XLA's own cost analysis is unavailable on GPU (the CUDA plugin returns None) and, where it exists, counts the
body of a `while` loop once. A scanned layer stack or a gradient-accumulation loop is exactly such a loop, so
here every computation's cost is multiplied by how often it runs: a `while` body by its `known_trip_count`, a
fusion or call by the number of times its caller runs. Only matmuls are counted (`dot`, `ragged-dot`, and
cuBLAS/cuDNN GEMM custom calls carrying dot dimension numbers): 2 x output elements x contracted size, which is
what MFU is measured against; elementwise work is left out on purpose. The text is the per-device (SPMD
partitioned) program, so the answers are per device.

XLA:TPU writes its matmuls as `convolution`s (counted as 2 x the multiply-adds that touch a real input
element: padding and dilation holes excluded, every output position's window walked) and
ragged_dot as a grouped-matmul kernel call (`ragged-dot-*` custom calls, counted at the rows their static
shapes allow). Trip counts are read on both (GPU: `known_trip_count`; TPU: the loop condition's
`counter < constant`).

Our own kernel calls (dsv3_jax/kernels.py: splash / tokamax attention, tokamax grouped matmuls) are opaque
custom calls. Each runs inside a named scope written by `kernel_scope`, which records its geometry; XLA keeps
the scope in the call's `op_name`, and the FLOPs are counted from it (`_kernel_flops`): a grouped matmul as
2 x M x K x N (M the rows its static shape allows), attention as 2 x batch x heads x visible pairs (the causal
half) x the head dims its matmuls contract, by which pass the call is (forward, dq, dkv, or both in one call;
each backward loop recomputes the scores).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator

import numpy as np

COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
# Attributes naming the computations an instruction runs (`calls=%f`, `body=%b`, `to_apply=%r`, ...).
_CALLEES = re.compile(r"\b(calls|body|to_apply|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_KERNEL_SCOPE = re.compile(r"kernelcost_([a-z]+)_([0-9_]+[0-9])")
_KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu_v2", "mosaic_gpu")


def kernel_scope(kind: str, *dims: int) -> str:
    """The named scope a kernel call runs in, recording what `_kernel_flops` needs: `attention` with (batch,
    heads, visible query-key pairs per head, q/k head dim, v head dim), `gmm` with (rows, depth, width)."""
    return f"kernelcost_{kind}_" + "_".join(str(int(d)) for d in dims)


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str  # result shape text, e.g. "bf16[4096,1024]{1,0}" or a tuple
    opcode: str
    rest: str  # operands and attributes


@dataclasses.dataclass
class _Computation:
    name: str
    instructions: list[_Instruction]
    params: dict[str, str]  # parameter name -> shape text (from the header)


def _parse(hlo_text: str) -> tuple[dict[str, _Computation], str | None]:
    computations: dict[str, _Computation] = {}
    entry = None
    current: _Computation | None = None
    for line in hlo_text.splitlines():
        if current is None:
            header = _HEADER.match(line.strip())
            if header:
                current = _Computation(header.group(2), [], {})
                if header.group(1):
                    entry = current.name
            continue
        if line.strip() == "}":
            computations[current.name] = current
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            current.instructions.append(_Instruction(match.group(2), match.group(3), match.group(4), match.group(5)))
        elif current.instructions:  # an attribute spanning lines (a kernel's metadata): part of the instruction
            current.instructions[-1].rest += " " + line.strip()
    return computations, entry


def _dims(shape_text: str) -> list[int]:
    """Dimensions of the first array in a shape text (a tuple's first element: a GEMM's output)."""
    match = _ARRAY.search(shape_text)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction (`%a, %b` up to the closing parenthesis)."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def _contracting(rest: str) -> list[int] | None:
    match = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
    if match:
        return [int(d) for d in match.group(1).split(",") if d]
    match = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)  # cuBLAS GEMM backend config
    if match:
        return [int(d) for d in re.findall(r"\d+", match.group(1))]
    return None


def _convolution_flops(inst: _Instruction, shapes: dict[str, str]) -> float:
    """XLA:TPU's matmuls (it writes dots, batched or not, as convolutions whose batch dims become spatial dims
    with dilated, padded windows): 2 x multiply-adds that touch a real input element. Per spatial dim the taps
    landing on real elements (not padding, not dilation holes) are counted exactly over every output position;
    the kernel's input-feature dim is contracted whole."""
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", inst.rest)
    operands = _operands(inst.rest)
    if labels is None or len(operands) < 2 or operands[0] not in shapes or operands[1] not in shapes:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    lhs, rhs, out = _dims(shapes[operands[0]]), _dims(shapes[operands[1]]), _dims(inst.shape)
    window = re.search(r"window=\{([^}]*)\}", inst.rest)
    attrs = dict(re.findall(r"(\w+)=([0-9x_]+)", window.group(1))) if window else {}

    def per_dim(name: str, n: int, default: int) -> list[int]:
        return [int(v) for v in attrs[name].split("x")] if name in attrs else [default] * n

    n_spatial = sum(c.isdigit() for c in rhs_labels)
    sizes = per_dim("size", n_spatial, 1)
    strides, lhs_dilate, rhs_dilate = (per_dim(k, n_spatial, 1) for k in ("stride", "lhs_dilate", "rhs_dilate"))
    pads = [tuple(int(x) for x in p.split("_")) for p in attrs["pad"].split("x")] if "pad" in attrs else [(0, 0)] * n_spatial
    flops = 2.0 * math.prod(size for label, size in zip(out_labels, out) if not label.isdigit())
    flops *= math.prod(size for label, size in zip(rhs_labels, rhs) if label == "i")
    for k in range(n_spatial):
        length, out_len = lhs[lhs_labels.index(str(k))], out[out_labels.index(str(k))]
        o = np.arange(out_len)[:, None]
        tap = o * strides[k] + np.arange(sizes[k])[None, :] * rhs_dilate[k] - pads[k][0]
        real = (tap >= 0) & (tap <= (length - 1) * lhs_dilate[k]) & (tap % lhs_dilate[k] == 0)
        flops *= int(real.sum())
    return flops


def _tpu_ragged_dot_flops(inst: _Instruction, shapes: dict[str, str]) -> float:
    """XLA:TPU's grouped-matmul kernel for ragged_dot (a `tpu_custom_call` named ragged-dot-*): 2 x M x K x N
    for lhs [M, K] and output [M, N], the rows the static shapes allow (the kernel may skip empty tiles)."""
    out = _dims(inst.shape)
    if len(out) != 2:
        return 0.0
    for name in _operands(inst.rest):
        lhs = _dims(shapes.get(name, ""))
        if len(lhs) == 2 and lhs[0] == out[0]:
            return 2.0 * out[0] * lhs[1] * out[1]
    return 0.0


def _kernel_flops(inst: _Instruction) -> tuple[str, float] | None:
    """(kind, FLOPs) of one of our kernel calls (see the module docstring), or None when `inst` is not one."""
    if inst.opcode != "custom-call" or not any(f'custom_call_target="{t}"' in inst.rest for t in _KERNEL_TARGETS):
        return None
    scope = _KERNEL_SCOPE.search(inst.rest)
    if scope is None:
        return None
    kind, dims = scope.group(1), [int(d) for d in scope.group(2).split("_")]
    if kind == "gmm":
        rows, depth, width = dims
        return kind, 2.0 * rows * depth * width
    batch, heads, pairs, qk, v = dims
    op_class = re.search(r'__type\\?":\\?"([\w.]+)', inst.rest)  # tokamax names its op class first
    if op_class is not None:
        backward = op_class.group(1).endswith("Vjp")
        outputs = sum(1 for _, d in _ARRAY.findall(inst.shape) if d.count(",") >= 2)  # dq | dk, dv | all three
        role = ("dq", "dkv", "fused")[min(outputs, 3) - 1] if backward else "forward"
    else:  # splash: the kernel's name says which pass
        role = "dkv" if "dkv" in inst.name else "dq" if "_dq" in inst.name else "forward"
    per_pair = {"forward": qk + v,  # scores, P V
                "dq": 2 * qk + v,  # scores again, dP = dO V^T, dQ = dS K
                "dkv": 2 * qk + 2 * v,  # scores again, dV = P^T dO, dP, dK = dS^T Q
                # one call with both loops of FlashAttention-2's backward, each recomputing the scores: dkv + dq
                "fused": 4 * qk + 3 * v}[role]
    return kind, 2.0 * batch * heads * pairs * per_pair


def _matmul_flops(inst: _Instruction, shapes: dict[str, str]) -> float:
    if inst.opcode == "convolution":
        return _convolution_flops(inst, shapes)
    if inst.opcode == "custom-call" and inst.name.startswith("ragged-dot") and "tpu_custom_call" in inst.rest:
        return _tpu_ragged_dot_flops(inst, shapes)
    if inst.opcode not in ("dot", "ragged-dot") and not (
            inst.opcode == "custom-call" and "dot_dimension_numbers" in inst.rest):
        return 0.0
    contracting = _contracting(inst.rest)
    operands = _operands(inst.rest)
    if contracting is None or not operands or operands[0] not in shapes:
        return 0.0
    lhs = _dims(shapes[operands[0]])
    return 2.0 * math.prod(_dims(inst.shape)) * math.prod(lhs[d] for d in contracting)


def _trip_count(inst: _Instruction, computations: dict[str, _Computation]) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count` (GPU) or, failing that (TPU), the bound of a
    `counter < constant` condition, the form every `lax.scan` / `fori_loop` from zero takes."""
    known = _TRIP_COUNT.search(inst.rest)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", inst.rest)
    comp = computations.get(cond.group(1)) if cond else None
    if comp is None:
        return None
    constants = {i.name: int(m.group(1)) for i in comp.instructions
                 if i.opcode == "constant" and (m := re.match(r"(-?\d+)\)", i.rest))}
    for i in comp.instructions:
        if i.opcode == "compare" and "direction=LT" in i.rest:
            bound = [constants[o] for o in _operands(i.rest) if o in constants]
            if len(bound) == 1:
                return bound[0]
    return None


def _walk(computations: dict[str, _Computation], entry: str) -> Iterator[tuple[_Instruction, float, int | None]]:
    """Every instruction reachable from `entry` with how many times it runs per execution of the module, and
    for a `while`, its trip count (None when unknown: its body is then counted once)."""
    stack = [(entry, 1.0)]
    while stack:
        name, times = stack.pop()
        comp = computations.get(name)
        if comp is None:
            continue
        for inst in comp.instructions:
            trip = _trip_count(inst, computations) if inst.opcode == "while" else None
            yield inst, times, trip
            trips = float(trip or 1)
            for kind, callee in _CALLEES.findall(inst.rest):
                if kind == "to_apply" and inst.opcode not in ("call", "async-start"):
                    continue  # a reduce/sort/scatter's scalar combiner: no matmuls in it
                stack.append((callee, times * (trips if kind == "body" else 1.0)))
            branches = _BRANCHES.search(inst.rest)
            if branches:  # a conditional: one branch runs; count each (an upper bound, rare in our programs)
                stack.extend((b, times) for b in re.findall(r"%?([\w.\-]+)", branches.group(1)))


def analyse(hlo_text: str) -> dict:
    """{"matmul_flops": per-device FLOPs with loops expanded, "while_loops": [trip counts],
    "collectives": {op: {"count", "bytes"}} and "kernel_calls": {kind: count} (our kernels: attention, gmm),
    with loop bodies counted as often as they run}."""
    computations, entry = _parse(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    shapes = {}
    for comp in computations.values():
        shapes.update({inst.name: inst.shape for inst in comp.instructions})
    flops = 0.0
    trips = []
    collectives = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    kernel_calls: dict[str, int] = {}
    for inst, times, trip in _walk(computations, entry):
        kernel = _kernel_flops(inst)
        if kernel is not None:
            kernel_calls[kernel[0]] = kernel_calls.get(kernel[0], 0) + int(times)
        flops += times * (kernel[1] if kernel is not None else _matmul_flops(inst, shapes))
        if inst.opcode == "while":
            trips.append(trip)
        op = inst.opcode.removesuffix("-start")
        if op in collectives and not inst.opcode.endswith("-done"):
            collectives[op]["count"] += int(times)
            collectives[op]["bytes"] += int(times) * _result_bytes(inst)
    return {"matmul_flops": flops, "while_loops": trips, "kernel_calls": kernel_calls,
            "collectives": {op: v for op, v in collectives.items() if v["count"]}}


def _result_bytes(inst: _Instruction) -> int:
    """A collective's result size; an async `-start` returns a tuple (operands, results, scratch...): its
    largest array stands for the result."""
    if inst.opcode.endswith("-start") and inst.shape.startswith("("):
        return max((shape_bytes(f"{d}[{dims}]") for d, dims in _ARRAY.findall(inst.shape)), default=0)
    return shape_bytes(inst.shape)


def shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO result shape such as `f32[8,128]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


