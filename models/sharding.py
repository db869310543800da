"""Logical axis names and the default table that maps them to mesh axes (MaxText style).

Parameters are created with logical names (`nn.with_logical_partitioning`); activations are
constrained at block boundaries (`nn.with_logical_constraint`). One rules table turns the names into
mesh axes, so FSDP / tensor / expert parallel ablations are config edits, not code edits.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
DEFAULT_RULES: Rules = (
    # activations; outside the MoE layers the expert axis is one more data-parallel axis
    ("batch", ("data", "fsdp", "expert")),
    ("act_expert", "expert"),  # MoE expert buffers [E, B, C, D]: tokens move to their expert's devices
    ("act_group", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("position", None),
    ("norm", None),
    # The scanned blocks' stacked axis (models/layers.py): not split across devices; each layer's other
    # axes shard as in the loop layout.
    ("layers", None),
)


def param_with_axes(init: Any, names: tuple[str | None, ...]) -> Any:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, names)


def _mesh_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """Logical names -> PartitionSpec, replicating any dim the mesh axes do not divide.

    Uneven splits (e.g. an MQA weight with one kv head on tensor=2) are replicated rather than
    rejected, so any preset runs on any mesh; the cost is only memory.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        # A mesh axis may appear once per array; size-1 axes add nothing.
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (abstract) values, boxed with `nn.LogicallyPartitioned`."""

    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = _mesh_spec(leaf.names, leaf.value.shape, mesh, rules)
        else:
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def sharding_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for one array with logical axis names (e.g. the batch)."""
    return NamedSharding(mesh, _mesh_spec(names, shape, mesh, rules))
