"""CPU kernels: C++ XLA FFI handlers built with the host's compiler on first use, float32, single device.

Everything CPU-specific lives here, behind the two dispatch points that name these kernels
(`models/linear.py` for products, `models/attention.py` for attention); no other model file imports them.

  panel_matmul.py/.cc  rows times a weight in 16-column panels, dense or per expert group
  linear.py            those products as `linear`'s: custom VJPs (XLA gradients), weights packed once
                       for a decode loop (`Packed`)                          matmul_impl="cpu_panel"
  attention.py/.cc     fused causal attention forward with its log-sum-exp; the backward is
                       models/blocked_attention.py's                          attention_impl="cpu_fused"
  library.py           builds both (with tile.h, the shared 6x16 register tile, and share.h, how they
                       share work with XLA's thread pool) into one library and registers them
  tests/               each kernel against its reference, and the model with the kernels against without

Without a C++ compiler (`available()` False) the dispatch points run XLA's ops instead: slower, never
wrong, and a RuntimeWarning says so once. XLA cannot partition an FFI call across a mesh (it runs on
gathered operands), so these are for single-device runs.
"""

from models.kernels.cpu.library import available, unavailable_reason

__all__ = ["available", "unavailable_reason"]
