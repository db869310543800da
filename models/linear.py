"""The model's weight products, and the one place that chooses who computes them.

    linear(x, w, fan_in_dims, impl)        projections, MLPs, the LM head: one 2-D matmul
    expert_linear(h, w, impl)              stacked experts: [X, R, D] x [X, D, F] -> [X, R, F]
    ragged_linear(x, w, sizes, impl)       rows in expert order, each run times its expert's weight

`impl` is `ModelConfig.matmul_impl`: "xla" (XLA's dot) or "cpu_panel" (the panel kernel of
`models/kernels/cpu`, float32; XLA's dot where it cannot be built); "auto" is "xla" here (decode steps get
the kernel through `prepare_weight`). A weight prepared by `prepare_weight` (a `Packed` leaf, made once
before a decode loop by `models.transformer.prepare_params`) is always multiplied by the kernel.

Why 2-D: written as `einsum("btd,df->btf")`, a projection's weight gradient contracts two dims (batch and
length), and XLA:CPU then copies the [B*T, F] output gradient into a transposed layout before the matmul:
a strided copy per projection that took 12% of a d_model=512 train step. The same product on tokens
flattened to 2-D needs no copy (SwiGLU MLP forward + backward at 4096 tokens x 512 x 1536, interleaved in
one process: 510 ms as einsum, 395 ms flattened). The reshapes are free (row-major views) and keep the
sharding: the flattened token dim is split like the batch dim it leads with.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.config import resolve_matmul_impl
from models.kernels import cpu
from models.kernels.cpu import linear as cpu_linear

Weight = jax.Array | cpu_linear.Packed

# A decode step multiplies batch x beams rows by every weight. Up to this many rows the panel kernel on
# packed weights beats XLA:CPU's matmul, which repacks the weight on every call (beam-4 at batch 8, 32
# rows: 787 vs 728 tok/s); beyond it the step is compute-bound and XLA's matmul is as good.
PACKED_MAX_ROWS = 32


def linear(x: jax.Array, w: Weight, fan_in_dims: int = 1, impl: str = "xla", transposed: bool = False,
           out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x: [..., *fan_in], w: [*fan_in, *fan_out] -> [..., *fan_out].

    fan_in_dims: how many trailing dims of x (leading dims of w) are contracted, e.g. 2 for an attention
    output projection [B, T, N, H] x [N, H, D]. transposed: w is [fan_out, fan_in] (2-D; a tied embedding
    table as the LM head). out_dtype: the product's dtype (None: x's), e.g. float32 logits.
    """
    if transposed:
        fan_in, fan_out = w.shape[1:], w.shape[:1]
    else:
        fan_in, fan_out = w.shape[:fan_in_dims], w.shape[fan_in_dims:]
    lead = x.shape[:x.ndim - len(fan_in)]
    assert x.shape[len(lead):] == fan_in, (x.shape, w.shape, transposed)
    x2 = x.reshape(-1, math.prod(fan_in))
    if isinstance(w, cpu_linear.Packed):
        y = cpu_linear.packed_matmul(x2, w)
    elif resolve_matmul_impl(impl) == "cpu_panel" and _kernel_runs(x2, w):
        w2 = w.reshape(-1, x2.shape[1]).T if transposed else w.reshape(x2.shape[1], -1)
        y = cpu_linear.matmul(x2, w2)
    else:
        # Transposed: contract w's last dim in place (no transposed copy of the table).
        dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
        w2 = w.reshape(-1, x2.shape[1]) if transposed else w.reshape(x2.shape[1], -1)
        y = jax.lax.dot_general(x2, w2, dims, preferred_element_type=out_dtype)
    return y.astype(out_dtype or y.dtype).reshape(*lead, *fan_out)


def expert_linear(h: jax.Array, w: jax.Array, impl: str = "xla") -> jax.Array:
    """Stacked experts: h [X, R, D], w [X, D, F] -> [X, R, F] (expert x's rows times its weight)."""
    if resolve_matmul_impl(impl) == "cpu_panel" and _kernel_runs(h, w):
        x, r = h.shape[:2]
        sizes = jnp.full((x,), r, jnp.int32)
        return cpu_linear.grouped(h.reshape(x * r, -1), w, sizes).reshape(x, r, -1)
    return jnp.einsum("xrd,xdf->xrf", h, w)


def multiplies_ragged(impl: str) -> bool:
    """Whether `ragged_linear` computes only each group's rows (else every group densely, as XLA:CPU's
    ragged_dot does: the dropless MoE layout then pads runs to blocks instead)."""
    return resolve_matmul_impl(impl) == "cpu_panel" and cpu.available()


def ragged_linear(x: jax.Array, w: jax.Array, sizes: jax.Array, impl: str = "xla") -> jax.Array:
    """x: [M, D] rows in group order, w: [G, D, F], sizes: [G] rows per group (sum <= M) -> [M, F].

    Group g's rows times w[g]; rows after the last group are zero (`jax.lax.ragged_dot`'s contract).
    """
    sizes = sizes.astype(jnp.int32)
    if resolve_matmul_impl(impl) == "cpu_panel" and _kernel_runs(x, w):
        return cpu_linear.grouped(x, w, sizes)
    return jax.lax.ragged_dot(x, w, sizes)


def prepare_weight(w: jax.Array, impl: str, rows: int, fan_in_dims: int = 1, transposed: bool = False) -> Weight:
    """w for a loop that multiplies `rows` rows by it many times (a decode loop): packed for the panel
    kernel where that is faster (CPU, float32, few rows; impl "auto" or "cpu_panel"), else w itself."""
    if (impl in ("auto", "cpu_panel") and rows <= PACKED_MAX_ROWS and w.dtype == jnp.float32
            and jax.default_backend() == "cpu" and cpu.available()):
        return cpu_linear.pack_weight(w, fan_in_dims, transposed)
    return w


def unprepared(w: Weight) -> jax.Array:
    """The weight as the model declares it, prepared or not (a tied table's embedding lookup)."""
    return w.w if isinstance(w, cpu_linear.Packed) else w


def _kernel_runs(x: jax.Array, w: jax.Array) -> bool:
    """The kernel takes float32 and must be built; otherwise XLA multiplies (slower, never wrong)."""
    return x.dtype == w.dtype == jnp.float32 and cpu.available()
