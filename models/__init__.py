"""Functional Flax (Linen) building blocks for decoder-only language models.

Axis legend, used in einsum strings, docstrings and names throughout the codebase:

  B batch          T query length     S key/value length (cache slots)
  N query heads    K kv heads         G = N // K (query heads per kv head)
  H head dim       D model dim        F mlp hidden dim
  E experts        C expert capacity  V vocab
  L layers

Everything here is pure: parameters, KV caches and RNG keys are pytrees passed in and returned.
`models` imports nothing from the rest of the project.
"""
