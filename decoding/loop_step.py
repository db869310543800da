"""The decode step as a loop runs it on CPU: weight work hoisted out, weight matmuls for a few rows.

`loop_step(fn, params, *example)` is called once before a decode loop and returns `step(*args)`, equal
to `fn(params, *args)` up to float rounding. It traces fn to a jaxpr and splits it in two:
- before the loop: every equation that depends on the params (and constants) alone: dtype casts,
  reshapes and transposes of weights, RoPE tables. XLA does not hoist these out of a while loop; a weight
  transposed inside the loop was a copy per layer per step.
- in the loop (`step`): the rest, with each weight matmul (a `dot_general` without batch dims, the
  weight on the right) for R = batch x beams rows rewritten:
  * R <= MAX_PANEL_ROWS, float32, kernel built: `models/kernels/panel_matmul.py`, against the weight
    packed in 16-column panels before the loop. XLA:CPU's general matmul repacks a weight on every
    call; with the weights coming from memory each step, that made a 4-row step ~3x a 1-row step.
  * otherwise R <= MAX_ROWS: one matrix-vector product per row (XLA's matrix-vector kernel streams a
    weight once; this was the best plain-XLA form).
  * otherwise one 2-D matmul (against the [k, n] view made before the loop: no transposed copies in it).
Nested `jit`s (einsum is one) are inlined so the matmuls inside them are reached. On other backends
`step` is fn with the params bound: GPU matmuls need none of this.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core

from models.kernels import panel_matmul

MAX_ROWS = 4  # 8 rows (batch-8 greedy) ran faster as one matmul than as 8 matrix-vector products
MAX_PANEL_ROWS = 32  # beam-4 at batch 8: 787 vs 728 tok/s with XLA's matmul

_UNKNOWN = object()  # a value only the loop has


@dataclasses.dataclass
class _Plan:
    """What was computed before the loop for one (possibly nested) jaxpr."""
    known: dict[core.Var, Any] = dataclasses.field(default_factory=dict)
    hoisted: set[int] = dataclasses.field(default_factory=set)  # equations computed before the loop
    inner: dict[int, _Plan] = dataclasses.field(default_factory=dict)  # nested jit equations
    weights: dict[int, _Weight] = dataclasses.field(default_factory=dict)  # rewritten weight matmuls


@dataclasses.dataclass(frozen=True)
class _Weight:
    """A weight matmul's right side as a [k, n] matrix (`packed` in panels when the kernel runs it), and
    the order of the left side's dims that makes it [rows, k] in the matrix's k order."""
    lhs_order: tuple[int, ...]
    matrix: jax.Array
    packed: jax.Array | None


def loop_step(fn: Callable[..., Any], params: Any, *example: Any) -> Callable[..., Any]:
    """fn(params, *args) as step(*args) for a loop over fixed params; example: args of the loop's shapes."""
    if jax.default_backend() != "cpu":
        return functools.partial(fn, params)
    closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(params, *example)
    fixed = jax.tree.leaves(params)
    loop_args = len(closed.jaxpr.invars) - len(fixed)
    plan = _hoist(closed.jaxpr, closed.consts, fixed + [_UNKNOWN] * loop_args)

    def step(*args: Any) -> Any:
        outs = _run(closed.jaxpr, plan, [_UNKNOWN] * len(fixed) + jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shapes), outs)

    return step


def _read(env: dict[core.Var, Any], v: Any) -> Any:
    return v.val if isinstance(v, core.Literal) else env.get(v, _UNKNOWN)


def _bind(eqn: core.JaxprEqn, ins: list[Any]) -> list[Any]:
    outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    return outs if eqn.primitive.multiple_results else [outs]


def _hoist(jaxpr: core.Jaxpr, consts: list[Any], args: list[Any]) -> _Plan:
    """Evaluates the equations whose inputs are all known (no effects) and prepares the weight matmuls."""
    plan = _Plan()
    plan.known = dict(zip(jaxpr.constvars, consts)) | {v: a for v, a in zip(jaxpr.invars, args) if a is not _UNKNOWN}
    for i, eqn in enumerate(jaxpr.eqns):
        ins = [_read(plan.known, v) for v in eqn.invars]
        if eqn.primitive.name == "jit":
            inner = _hoist(eqn.params["jaxpr"].jaxpr, eqn.params["jaxpr"].consts, ins)
            outs = [_read(inner.known, v) for v in eqn.params["jaxpr"].jaxpr.outvars]
            if all(o is not _UNKNOWN for o in outs):
                plan.hoisted.add(i)
            else:
                plan.inner[i] = inner
            plan.known.update((v, o) for v, o in zip(eqn.outvars, outs) if o is not _UNKNOWN)
        elif all(x is not _UNKNOWN for x in ins) and not eqn.effects:
            plan.hoisted.add(i)
            plan.known.update(zip(eqn.outvars, _bind(eqn, ins)))
        elif eqn.primitive.name == "dot_general" and ins[0] is _UNKNOWN and ins[1] is not _UNKNOWN:
            if (weight := _prepare_weight(eqn.invars[0].aval, ins[1], eqn.params)) is not None:
                plan.weights[i] = weight
    return plan


def _run(jaxpr: core.Jaxpr, plan: _Plan, args: list[Any]) -> list[Any]:
    """Evaluates the equations left for the loop, reading hoisted values from the plan."""
    env = dict(plan.known) | {v: a for v, a in zip(jaxpr.invars, args) if a is not _UNKNOWN}
    for i, eqn in enumerate(jaxpr.eqns):
        if i in plan.hoisted:
            continue
        ins = [_read(env, v) for v in eqn.invars]
        if i in plan.inner:
            outs = _run(eqn.params["jaxpr"].jaxpr, plan.inner[i], ins)
        elif i in plan.weights:
            outs = [_weight_matmul(ins[0], plan.weights[i], eqn.params, eqn.outvars[0].aval.shape)]
        else:
            outs = _bind(eqn, ins)
        env.update(zip(eqn.outvars, outs))
    return [_read(env, v) for v in jaxpr.outvars]


def _prepare_weight(lhs: core.AbstractValue, rhs: jax.Array, params: dict[str, Any]) -> _Weight | None:
    """The weight as [k, n] (a copy made once, before the loop), packed when the kernel is to run it;
    None (leave the dot_general as it is) for batched ones."""
    (lhs_contract, rhs_contract), (batch, _) = params["dimension_numbers"]
    if batch or not rhs_contract:
        return None
    lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract]
    rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract]
    k = math.prod(rhs.shape[d] for d in rhs_contract)
    rows = lhs.size // k
    use_kernel = (rows <= MAX_PANEL_ROWS and lhs.dtype == rhs.dtype == jnp.float32
                  and params["preferred_element_type"] in (None, jnp.float32) and panel_matmul.available())
    matrix = rhs.transpose(list(rhs_contract) + rhs_free).reshape(k, -1)
    return _Weight(tuple(lhs_free) + tuple(lhs_contract), matrix, panel_matmul.pack(matrix) if use_kernel else None)


def _weight_matmul(lhs: jax.Array, weight: _Weight, params: dict[str, Any], out_shape: tuple[int, ...]) -> jax.Array:
    k, n = weight.matrix.shape
    x = lhs.transpose(weight.lhs_order).reshape(-1, k)
    if weight.packed is not None:
        return panel_matmul.panel_matmul(x, weight.packed, n).reshape(out_shape)
    dot = lambda rows: jax.lax.dot_general(rows, weight.matrix, (((1,), (0,)), ((), ())), precision=params["precision"],
                                           preferred_element_type=params["preferred_element_type"])
    if x.shape[0] > MAX_ROWS:
        return dot(x).reshape(out_shape)
    return jnp.concatenate([dot(x[r:r + 1]) for r in range(x.shape[0])], axis=0).reshape(out_shape)
