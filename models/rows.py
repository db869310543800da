"""When to run a layer one batch row at a time (a sequential loop over the batch) instead of batched.

On a CPU, a row's activations (a block of attention scores, the [T, d_ff] MLP hidden states) stay in
cache, where the whole batch's would stream through memory: timed alone at the 6.9M Llama's shapes
(8 x 512, fp32), the attention forward was ~1.7x and the MLP forward ~1.4x faster row by row.
Only on one device: with a mesh of several devices the batch is split across them, and a loop over a
split axis would gather it; and accelerators want large ops.
"""

from __future__ import annotations

import jax

ROW_MIN_TOKENS = 64  # shorter rows (decoding steps, short prompts) are cheaper batched


def row_by_row() -> bool:
    """True on one CPU device (the current mesh, if any, has a single device)."""
    return jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().size <= 1
