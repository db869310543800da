"""Kernels, one op per file, each checked against a pure-jnp reference (a `*_reference` beside it, or the
model's own jnp path).

  flash_attention.py   blocked attention with online softmax, forward + backward (custom_vjp)
  decode_attention.py  split-K (flash-decoding) attention of one query token over a KV cache
  mask.py              the mask description both share, padding and backend choice
  sharded.py           both under a mesh: jax.shard_map over the batch and head axes, one kernel per device
  cpu/                 C++ CPU kernels (XLA FFI): the panel matmul and fused causal attention, their
                       build, wrappers, custom VJPs and tests (see cpu/__init__.py)

The Pallas kernels (attention) lower with Triton on GPU and run with `interpret=True` elsewhere (chosen
automatically when the default backend is CPU), which is how the tests run them. Only the dispatch points
(`models/linear.py`, `models/attention.py`) import these.
"""
