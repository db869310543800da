"""The model config: frozen, validated, hashable (usable as a static jit argument)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned", "sinusoidal", "none")
ROPE_SCALINGS = ("none", "linear", "ntk")
ATTENTION_IMPLS = ("xla",)  # "pallas" and "cudnn" join with the kernel work; see models/attention.py
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config field holds a value that is not allowed. The message names the field."""


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raises a one-line ConfigError `field=value: allowed` unless `ok`."""
    if not ok:
        raise ConfigError(f"{field}={value!r}: {allowed}")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    check(value in choices, field, value, "expected one of " + ", ".join(map(str, choices)))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder-only transformer LM."""

    vocab_size: int = 4096
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8  # == num_heads: MHA; 1 < K < N: GQA; 1: MQA
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 1024
    max_seq_len: int = 512  # longest sequence the position scheme and the default cache support
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"
    position: str = "rope"
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"  # context extension: "linear" (position interpolation) or "ntk"
    rope_scaling_factor: float = 1.0
    sliding_window: int = 0  # 0: full causal attention; w > 0: each query sees the last w keys
    qkv_bias: bool = False
    tie_embeddings: bool = True
    attention_impl: str = "xla"
    dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
    param_dtype: str = "float32"
    init_std: float = 0.02
    remat: bool = False  # rematerialise each block in the backward pass (memory for compute)

    def __post_init__(self) -> None:
        p = "model."
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff",
                     "max_seq_len"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, p + name, value, "expected a positive integer")
        check(self.head_dim >= 0, p + "head_dim", self.head_dim, "expected 0 (auto) or a positive integer")
        if self.head_dim == 0:
            check(self.d_model % self.num_heads == 0, p + "d_model", self.d_model,
                  f"must be divisible by model.num_heads={self.num_heads} (or set model.head_dim)")
        check(self.num_heads % self.num_kv_heads == 0, p + "num_heads", self.num_heads,
              f"must be divisible by model.num_kv_heads={self.num_kv_heads}")
        check(self.resolved_head_dim % 2 == 0 or self.position != "rope", p + "head_dim",
              self.resolved_head_dim, "RoPE needs an even head dim")
        check_choice(p + "norm", self.norm, NORMS)
        check_choice(p + "mlp", self.mlp, MLPS)
        check_choice(p + "position", self.position, POSITIONS)
        check_choice(p + "rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check_choice(p + "attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_choice(p + "dtype", self.dtype, DTYPES)
        check_choice(p + "param_dtype", self.param_dtype, DTYPES)
        check(self.rope_theta > 0, p + "rope_theta", self.rope_theta, "expected > 0")
        check(self.rope_scaling_factor >= 1.0, p + "rope_scaling_factor", self.rope_scaling_factor,
              "expected >= 1 (the context extension factor)")
        check(self.sliding_window >= 0, p + "sliding_window", self.sliding_window,
              "expected 0 (off) or a positive window length")
        check(self.norm_eps > 0, p + "norm_eps", self.norm_eps, "expected > 0")
        check(self.init_std > 0, p + "init_std", self.init_std, "expected > 0")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def group_size(self) -> int:
        """G: query heads sharing one kv head."""
        return self.num_heads // self.num_kv_heads

    def param_count(self, include_embeddings: bool = True) -> int:
        """Exact number of parameters of `models.transformer.Transformer` for this config."""
        d, h, f = self.d_model, self.resolved_head_dim, self.d_ff
        n, k = self.num_heads, self.num_kv_heads
        norm = d if self.norm == "rmsnorm" else 2 * d
        attn = d * n * h + 2 * d * k * h + n * h * d + (n * h + 2 * k * h if self.qkv_bias else 0)
        mlp = (3 if self.mlp == "swiglu" else 2) * d * f
        blocks = self.num_layers * (attn + mlp + 2 * norm) + norm
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.position == "learned":
            embed += self.max_seq_len * d
        return blocks + (embed if include_embeddings else 0)
