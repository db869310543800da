"""Kernels, one op per file, each checked against a pure-jnp reference (a `*_reference` beside it, or the
model's own jnp path).


  flash_attention.py   blocked attention with online softmax, forward + backward (custom_vjp)
  decode_attention.py  split-K (flash-decoding) attention of one query token over a KV cache
  common.py            the mask description both share, padding and backend choice
  panel_matmul.py      (CPU, XLA FFI handlers in panel_matmul.cc) rows times a weight in 16-column
                       panels, dense or per expert group: the decode step's weight matmuls, and the
                       model's with matmul_impl="cpu"
  cpu_attention.py     (CPU, cpu_attention.cc) fused causal attention forward with its log-sum-exp:
                       attention_impl="cpu" (the backward is models/causal_attention.py's)
  cpu_library.py       builds the CPU kernels (with tile.h, their shared register tile, and share.h,
                       how they share units of work with XLA's thread pool) into one library with the
                       host's C++ compiler on first use, and registers them

The CPU kernels are float32 and single-device (XLA cannot partition an FFI call across a mesh).
The Pallas kernels (attention) lower with Triton on GPU and run with `interpret=True` elsewhere (chosen
automatically when the default backend is CPU), which is how the tests run them.
"""
