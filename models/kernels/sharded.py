"""The Pallas attention kernels under a mesh: `jax.shard_map` over the batch and head axes.

XLA has no partitioning rule for a `pallas_call`: under jit with sharded operands it would gather
them and run the whole kernel on every device. Attention is independent per (batch row, kv head
group), so each device can run the kernel unchanged on its own shard instead:

  batch  the mesh axes the logical rules map "batch" to (data, fsdp, expert by default); replicated
         where they do not divide B (as `models.sharding` does for any dim), e.g. decoding one prompt
  heads  the mesh axes of "act_heads" (tensor), for query and kv heads alike. Heads are grouped
         [K, G] (query head n reads kv head n // G), so splitting N and K over the same s devices
         gives each device whole groups exactly when s divides K; otherwise it is refused
  length never sharded: each device holds whole sequences and the whole KV cache of its rows

The mesh is the one in context (`jax.set_mesh`, as flax's logical constraints read it) and the rules
are flax's `nn.logical_axis_rules` (`DEFAULT_RULES` when none are set). With no mesh, or no axis of
size > 1 to split over, the kernel is called directly, as on one device.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, PartitionSpec as P

from models.kernels.decode_attention import decode_attention
from models.kernels.flash_attention import flash_attention
from models.sharding import DEFAULT_RULES, Rules

# Per-array layouts: which dims are the batch and the heads (the rest are whole on every device).
BATCH, HEADS = "batch", "heads"
Layout = tuple[str | None, ...]
_TOKENS: Layout = (BATCH, None, HEADS, None)  # [B, L, heads, H]
_ROWS: Layout = (BATCH, None)  # [B, L] positions, segment ids
_PER_ROW: Layout = (BATCH,)  # [B] lengths, positions
FLASH_LAYOUTS = {"q": _TOKENS, "k": _TOKENS, "v": _TOKENS, "q_positions": _ROWS, "kv_positions": _ROWS,
                 "kv_lengths": _PER_ROW, "q_segment_ids": _ROWS, "kv_segment_ids": _ROWS}
DECODE_LAYOUTS = {"q": (BATCH, HEADS, None), "k": _TOKENS, "v": _TOKENS, "kv_lengths": _PER_ROW,
                  "q_positions": _PER_ROW}


def _mesh_axes(name: str, mesh: AbstractMesh, rules: Rules) -> tuple[str, ...]:
    """The mesh axes of size > 1 that the rules map a logical name to (absent axes count as size 1)."""
    axes = dict(rules).get(name)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def _size(axes: tuple[str, ...], mesh: AbstractMesh) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _split_axes(mesh: AbstractMesh, batch: int, num_heads: int,
                num_kv_heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """-> (batch axes, head axes) for this mesh and the rules in context; raises if K does not split."""
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    batch_axes = _mesh_axes("batch", mesh, rules)
    if batch % _size(batch_axes, mesh):
        batch_axes = ()  # every device runs every row: correct, only redundant
    head_axes = tuple(a for a in _mesh_axes("act_heads", mesh, rules) if a not in batch_axes)
    if num_kv_heads % _size(head_axes, mesh):
        raise ValueError(
            f"Pallas attention on a mesh: the heads are split over mesh axes {head_axes} of size "
            f"{_size(head_axes, mesh)}, which must divide the kv heads K={num_kv_heads} (query heads "
            f"N={num_heads}) so that each device holds whole query groups; use a mesh whose "
            f"{'/'.join(head_axes)} size divides {num_kv_heads}, or attention_impl='xla'")
    return batch_axes, head_axes


def over_batch_and_heads(kernel: Callable[..., jax.Array], arrays: dict[str, jax.Array | None],
                         layouts: dict[str, Layout], out_layout: Layout) -> jax.Array:
    """kernel(**arrays) with each device running it on its shard of the batch and heads.

    arrays: the kernel's array arguments by name (None ones are left out, so the kernel fills in its
    defaults from local shapes: fine, as lengths are whole); layouts: their `Layout`s by name.
    """
    arrays = {name: x for name, x in arrays.items() if x is not None}
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(**arrays)
    q, k = arrays["q"], arrays["k"]
    batch_axes, head_axes = _split_axes(mesh, q.shape[0], q.shape[-2], k.shape[2])
    if not batch_axes and not head_axes:
        return kernel(**arrays)
    axes = {BATCH: batch_axes or None, HEADS: head_axes or None}

    def spec(layout: Layout) -> P:
        return P(*(axes[dim] if dim else None for dim in layout))

    in_specs = {name: spec(layouts[name]) for name in arrays}
    # check_vma=False: a pallas_call's outputs carry no varying-axes annotation (jax asks for one per
    # out_shape otherwise); out_specs are exact, each shard depending only on its own rows and heads.
    return jax.shard_map(lambda a: kernel(**a), mesh=mesh, in_specs=(in_specs,), out_specs=spec(out_layout),
                         check_vma=False)(arrays)


def sharded_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array | None = None,
                            kv_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                            q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                            **options) -> jax.Array:
    """`flash_attention` (same arguments and options), per device on its shard of the mesh in context."""
    arrays = dict(q=q, k=k, v=v, q_positions=q_positions, kv_positions=kv_positions, kv_lengths=kv_lengths,
                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    return over_batch_and_heads(functools.partial(flash_attention, **options), arrays, FLASH_LAYOUTS,
                                FLASH_LAYOUTS["q"])


def sharded_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                             q_positions: jax.Array | None = None, **options) -> jax.Array:
    """`decode_attention` (same arguments and options), per device on its shard of the mesh in context."""
    arrays = dict(q=q, k=k, v=v, kv_lengths=kv_lengths, q_positions=q_positions)
    return over_batch_and_heads(functools.partial(decode_attention, **options), arrays, DECODE_LAYOUTS,
                                DECODE_LAYOUTS["q"])
