"""The two parameter layouts of `DeepSeekV3` (model.scan_layers) seen as one: every parameter split per main
layer and named as in the unrolled layout (`layers.{i}....`), and conversion between the layouts.

HF import/export (`convert.py`) maps these per-layer names to HF tensors, so its name table does not depend on
the layout; `relayout` moves a model from one layout to the other variable by variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.model import DeepSeekV3
from dsv3_jax.partitioning import path_str


def leaves(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    return [(path_str(path, "."), var) for path, var in nnx.to_flat_state(nnx.state(model))]


@dataclass(frozen=True)
class LayerSlot:
    """One layer's share of a variable: `leaf` is the unrolled layout's dotted name (what `hf_name` maps), and
    `index` the position on the variable's leading layer axis (None: the whole variable)."""

    leaf: str
    var: nnx.Variable
    index: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.var.get_value().shape)
        return shape if self.index is None else shape[1:]


def layer_slots(model: DeepSeekV3) -> list[LayerSlot]:
    """Every parameter, split per main layer when the model is scanned, named as in the unrolled layout
    (`layers.{i}....`): the HF name table and the checks see one layout."""
    stacks = {name: indices for name, indices, _ in model.cfg.layer_stacks()} if model.cfg.scan_layers else {}
    out = []
    for leaf, var in leaves(model):
        stack, _, rest = leaf.partition(".")
        if stack in stacks:
            out += [LayerSlot(f"layers.{i}.{rest}", var, n) for n, i in enumerate(stacks[stack])]
        else:
            out.append(LayerSlot(leaf, var, None))
    return out


def by_variable(items: list, slot_of: Any) -> list[list]:
    """`items` grouped by the variable of their slot (`slot_of(item)`), in first-seen order: one group per
    whole variable, one per stacked variable holding its layers."""
    groups: dict[int, list] = {}
    for item in items:
        groups.setdefault(id(slot_of(item).var), []).append(item)
    return list(groups.values())


def relayout(model: DeepSeekV3, scan_layers: bool, dot_general: Any = None) -> DeepSeekV3:
    """The same model (every number equal) in the other parameter layout: unrolled `layers/{i}` <-> scanned
    `dense_layers` / `moe_layers` stacks. Works variable by variable through the per-layer names both layouts
    share, so it holds one extra copy of one variable at a time, not of the model. `dot_general` as in
    `DeepSeekV3` (default: the one `cfg.fp8` selects)."""
    cfg = model.cfg.replace(scan_layers=scan_layers)
    if cfg == model.cfg:
        return model
    target = nnx.eval_shape(lambda: DeepSeekV3(cfg, nnx.Rngs(0), dot_general))
    source = {slot.leaf: slot for slot in layer_slots(model)}
    for slots in by_variable(layer_slots(target), lambda slot: slot):
        def read(slot: LayerSlot) -> jax.Array:
            src = source[slot.leaf]
            value = src.var.get_value()
            return value if src.index is None else value[src.index]
        if slots[0].index is None:
            slots[0].var.set_value(read(slots[0]))
        else:
            slots[0].var.set_value(jnp.stack([read(slot) for slot in sorted(slots, key=lambda s: s.index)]))
    return target
