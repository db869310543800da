"""Decode-step matmuls that XLA:CPU runs well: 2-D, and for a few rows one matrix-vector product per row.

A decode step multiplies R = batch x beams rows by each weight. For one row XLA:CPU calls a
matrix-vector kernel that streams the weight once; for 2-8 rows a general matmul (YNNPACK or Eigen) that
packs the weight on every call: fast while the weight sits in cache, slow when it comes from memory,
as it does every step once a neighbour on the machine competes for the shared L3. With such a neighbour
(a training run), R <= 4 matrix-vector products cut a 4-beam step to 0.62-0.68x of its time and a greedy
step to 0.80-0.89x (interleaved runs); on a quieter machine the difference was within the noise.
The 2-D view also settles the weight's layout: written as an einsum such as `btnh,nhd->btd`, XLA
transposed the weight inside the decode loop, a copy per layer per step (the model's projections are now
2-D already, `models/linear.py`; the LM head's einsum is not).

`rowwise(fn)` traces `fn` to a jaxpr and evaluates it with every weight matmul (a `dot_general` without
batch dimensions) rewritten that way, inlining nested `jit`s so the einsums inside them are reached;
everything else is bound unchanged. Only on CPU: GPU matmuls need no help.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core

MAX_ROWS = 4  # 8 rows (batch-8 greedy) ran faster as one matmul than as 8 matrix-vector products


def rowwise(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn with the same signature and results (up to float rounding), its small matmuls row by row on CPU."""
    if jax.default_backend() != "cpu":
        return fn

    def wrapped(*args: Any) -> Any:
        closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shapes), outs)

    return wrapped


def _eval(jaxpr: core.Jaxpr, consts: list[Any], args: list[Any]) -> list[Any]:
    env: dict[core.Var, Any] = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive.name == "jit":
            outs = _eval(eqn.params["jaxpr"].jaxpr, eqn.params["jaxpr"].consts, ins)
        elif eqn.primitive.name == "dot_general" and (out := _weight_matmul(*ins, eqn.params)) is not None:
            outs = [out]
        else:
            outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _weight_matmul(lhs: jax.Array, rhs: jax.Array, params: dict[str, Any]) -> jax.Array | None:
    """dot_general(lhs, rhs) as [rows, k] times the weight rhs viewed as [k, n] or [n, k], split into one
    product per row when there are at most MAX_ROWS; None (leave it) for batched dot_generals and weights
    whose contracting dims are interleaved with the others.

    The view is a reshape of the stored weight, never a transposed copy: the contracting dims are
    flattened in the weight's order and the few lhs rows are reordered to match instead.
    """
    (lhs_contract, rhs_contract), (batch, _) = params["dimension_numbers"]
    if batch or not rhs_contract:
        return None
    lhs_contract, rhs_contract = zip(*sorted(zip(lhs_contract, rhs_contract), key=lambda pair: pair[1]))
    lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract]
    rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract]
    k = math.prod(rhs.shape[d] for d in rhs_contract)
    if not rhs_free or max(rhs_contract) < min(rhs_free):
        w, w_contract = rhs.reshape(k, -1), 0  # [k, n]
    elif max(rhs_free) < min(rhs_contract):
        w, w_contract = rhs.reshape(-1, k), 1  # [n, k]
    else:
        return None
    x = lhs.transpose(lhs_free + list(lhs_contract)).reshape(-1, k)
    dims = (((1,), (w_contract,)), ((), ()))
    dot = lambda rows: jax.lax.dot_general(rows, w, dims, precision=params["precision"],
                                           preferred_element_type=params["preferred_element_type"])
    rows = x.shape[0]
    out = jnp.concatenate([dot(x[r:r + 1]) for r in range(rows)], axis=0) if rows <= MAX_ROWS else dot(x)
    return out.reshape([lhs.shape[d] for d in lhs_free] + [rhs.shape[d] for d in rhs_free])
