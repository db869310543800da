"""Kernels, one op per file, each with a pure-jnp `*_reference` beside it.

  flash_attention.py   blocked attention with online softmax, forward + backward (custom_vjp)
  decode_attention.py  split-K (flash-decoding) attention of one query token over a KV cache
  common.py            the mask description both share, padding and backend choice
  panel_matmul.py      (CPU, an XLA FFI handler in panel_matmul.cc) a few rows times a weight packed in
                       16-column panels: the decode step's weight matmuls

The Pallas kernels (attention) lower with Triton on GPU and run with `interpret=True` elsewhere (chosen
automatically when the default backend is CPU), which is how the tests run them.
"""
