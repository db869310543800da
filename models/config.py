"""The model config: frozen, validated, hashable (usable as a static jit argument)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Iterable

import jax

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned", "sinusoidal", "none")
ROPE_SCALINGS = ("none", "linear", "ntk")
# Query scaling by the number of visible keys n (models/attention.py `logit_scale`): "logn" Qwen's log-n
# attention, max(1, log n / log L); "learned" Scalable-Softmax (arXiv 2501.19399), s_h * log n.
LOGIT_SCALINGS = ("none", "logn", "learned")
# Named for the algorithm that runs, not the device; "auto" resolves per backend (`resolve_*_impl`).
ATTENTION_IMPLS = ("auto", "xla", "blocked", "pallas", "cudnn", "cpu_fused")  # models/attention.py
MATMUL_IMPLS = ("auto", "xla", "cpu_panel")  # models/linear.py
RENAMED_IMPLS = {"cpu": "cpu_fused or cpu_panel"}  # old value -> the new names
DTYPES = ("float32", "bfloat16")
ROUTERS = ("softmax", "noisy", "dense")
PRIORITIES = ("order", "probability")
# What a rematerialised block keeps from its forward pass (models/layers.py maps each to a
# jax.checkpoint_policies policy): "none" no remat (keep everything); "full" nothing (the whole block is
# recomputed in the backward pass); "dots" every matmul output; "dots_no_batch" the weight products only
# (2-D matmuls over flattened tokens), recomputing attention's batched score and value products.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


class ConfigError(ValueError):
    """A config field holds a value that is not allowed. The message names the field."""


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raises a one-line ConfigError `field=value: allowed` unless `ok`."""
    if not ok:
        raise ConfigError(f"{field}={value!r}: {allowed}")


def check_finite(cfg: Any, prefix: str) -> None:
    """Every float field of the config dataclass `cfg` is a finite number (inf and nan never make sense)."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float):
            check(math.isfinite(value), prefix + field.name, value, "expected a finite number")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    renamed = f" ({value!r} was renamed: {RENAMED_IMPLS[value]})" if value in RENAMED_IMPLS else ""
    check(value in choices, field, value, "expected one of " + ", ".join(map(str, choices)) + renamed)


def resolve_attention_impl(impl: str, backend: str | None = None) -> str:
    """"auto" -> what runs fastest on the backend: the block-skipping jnp path on CPU, and
    `jax.nn.dot_product_attention` (XLA; cuDNN is `cudnn`, opt-in) on GPU and TPU. Others unchanged."""
    if impl != "auto":
        return impl
    return "blocked" if (backend or jax.default_backend()) == "cpu" else "xla"


def resolve_matmul_impl(impl: str) -> str:
    """"auto" -> "xla" on every backend: the CPU panel kernel wins only on decode steps of a few rows,
    which get it through `models.linear.prepare_weight` (when `matmul_impl` is "auto" or "cpu_panel")."""
    return "xla" if impl == "auto" else impl


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sparse mixture-of-experts FFN (models/moe.py); num_experts=0 keeps the dense MLP in every block.

    Routers: "softmax" top-k (Switch, GShard, Mixtral); "noisy" top-k (Shazeer et al. 2017: trainable
    Gaussian noise on the logits in training); "dense" (every expert on every token, softmax-weighted: the
    baseline). A capacity factor of 0 means dropless. Loss weights of 0 switch the loss off.
    """

    RENAMED_FIELDS: ClassVar[dict[str, str]] = {"every": "every_n_layers"}  # old name -> new, for clear errors

    num_experts: int = 0
    top_k: int = 2
    every_n_layers: int = 1  # MoE in blocks i with (i + 1) % every_n_layers == 0 (1: all, 2: every second)
    d_ff: int = 0  # expert hidden dim; 0: model.d_ff
    router: str = "softmax"
    renormalize: bool = False  # top-k gates rescaled to sum to 1 (Mixtral) rather than raw probabilities
    zero_init_router: bool = False  # zero W_g (and W_noise): routing starts uniform (Shazeer)
    jitter: float = 0.0  # Switch: router input times U(1 - jitter, 1 + jitter) in training
    capacity_factor: float = 1.25  # training; 0: dropless
    eval_capacity_factor: float = 2.0  # evaluation and decoding; 0: dropless
    priority: str = "order"  # who keeps a full expert's slot: earlier tokens, or higher router probability
    switch_loss_weight: float = 0.01  # alpha in alpha * E * sum_i f_i P_i
    importance_loss_weight: float = 0.0  # Shazeer CV(importance)^2
    load_loss_weight: float = 0.0  # Shazeer CV(smooth load)^2; needs the noisy router
    z_loss_weight: float = 0.0  # ST-MoE: mean logsumexp(logits)^2
    bias_update_rate: float = 0.0  # u of the auxiliary-loss-free bias (DeepSeek); 0: no bias

    def __post_init__(self) -> None:
        p = "model.moe."
        check_finite(self, p)
        check(isinstance(self.num_experts, int) and self.num_experts >= 0, p + "num_experts", self.num_experts,
              "expected 0 (dense MLP) or a positive number of experts")
        if self.num_experts:
            check(1 <= self.top_k <= self.num_experts, p + "top_k", self.top_k,
                  f"expected 1 <= top_k <= model.moe.num_experts={self.num_experts}")
        check(self.every_n_layers >= 1, p + "every_n_layers", self.every_n_layers, "expected a positive integer")
        check(self.d_ff >= 0, p + "d_ff", self.d_ff, "expected 0 (model.d_ff) or a positive integer")
        check_choice(p + "router", self.router, ROUTERS)
        check_choice(p + "priority", self.priority, PRIORITIES)
        check(not (self.renormalize and self.top_k == 1), p + "renormalize", self.renormalize,
              "with top_k=1 every gate would be 1 and the router would get no gradient from the loss")
        check(0 <= self.jitter < 1, p + "jitter", self.jitter, "expected 0 <= jitter < 1")
        for name in ("capacity_factor", "eval_capacity_factor"):
            check(getattr(self, name) >= 0, p + name, getattr(self, name), "expected > 0, or 0 for dropless")
        for name in ("switch_loss_weight", "importance_loss_weight", "load_loss_weight", "z_loss_weight",
                     "bias_update_rate"):
            check(getattr(self, name) >= 0, p + name, getattr(self, name), "expected >= 0 (0: off)")
        check(self.load_loss_weight == 0 or self.router == "noisy", p + "load_loss_weight",
              self.load_loss_weight, "the smooth load estimator needs model.moe.router='noisy'")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder-only transformer LM."""

    RENAMED_FIELDS: ClassVar[dict[str, str]] = {"remat": "remat_policy"}  # old name -> new, for clear errors

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
    attention_logit_scaling: str = "none"  # see LOGIT_SCALINGS
    logit_scaling_length: int = 0  # L: the training length the scaling is anchored to (scale 1 at n = L)
    qkv_bias: bool = False
    tie_embeddings: bool = True
    attention_impl: str = "auto"  # see ATTENTION_IMPLS; run records hold the resolved value
    matmul_impl: str = "auto"  # see MATMUL_IMPLS
    dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
    param_dtype: str = "float32"
    init_std: float = 0.02
    remat_policy: str = "none"  # rematerialise each block in the backward pass: see REMAT_POLICIES
    # Blocks under nn.scan: one compiled body, params stacked on a leading "layers" axis (models/layers.py).
    # A scan step is `scan_group` blocks, so that MoE blocks every n layers repeat identically.
    scan_layers: bool = False
    moe: MoEConfig = MoEConfig()

    def __post_init__(self) -> None:
        p = "model."
        check_finite(self, p)
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
        check_choice(p + "matmul_impl", self.matmul_impl, MATMUL_IMPLS)
        for name in ("attention_impl", "matmul_impl"):
            check(not getattr(self, name).startswith("cpu_") or self.dtype == "float32", p + name,
                  getattr(self, name), f"the CPU kernels are float32 only, but model.dtype={self.dtype!r}")
        check_choice(p + "dtype", self.dtype, DTYPES)
        check_choice(p + "param_dtype", self.param_dtype, DTYPES)
        check(self.rope_theta > 0, p + "rope_theta", self.rope_theta, "expected > 0")
        check(self.rope_scaling_factor >= 1.0, p + "rope_scaling_factor", self.rope_scaling_factor,
              "expected >= 1 (the context extension factor)")
        check(self.sliding_window >= 0, p + "sliding_window", self.sliding_window,
              "expected 0 (off) or a positive window length")
        check_choice(p + "attention_logit_scaling", self.attention_logit_scaling, LOGIT_SCALINGS)
        if self.attention_logit_scaling == "none":
            check(self.logit_scaling_length >= 0, p + "logit_scaling_length", self.logit_scaling_length,
                  "expected >= 0 (unused without model.attention_logit_scaling)")
        else:
            check(self.logit_scaling_length >= 2, p + "logit_scaling_length", self.logit_scaling_length,
                  f"expected the training length (>= 2) that model.attention_logit_scaling="
                  f"{self.attention_logit_scaling!r} is anchored to")
        check(self.norm_eps > 0, p + "norm_eps", self.norm_eps, "expected > 0")
        check(self.init_std > 0, p + "init_std", self.init_std, "expected > 0")
        check_choice(p + "remat_policy", self.remat_policy, REMAT_POLICIES)
        check(not self.scan_layers or self.num_layers % self.scan_group == 0, p + "scan_layers", self.scan_layers,
              f"a scan step is model.moe.every_n_layers={self.scan_group} blocks (one of them MoE), which "
              f"must divide model.num_layers={self.num_layers}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def group_size(self) -> int:
        """G: query heads sharing one kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def scan_group(self) -> int:
        """Blocks per scan step: the period of the MoE / dense pattern (1 for a dense model)."""
        return self.moe.every_n_layers if self.moe.num_experts else 1

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.num_experts > 0 and (layer + 1) % self.moe.every_n_layers == 0

    def resolved(self, backend: str | None = None) -> "ModelConfig":
        """This config with "auto" implementations replaced by what runs on `backend` (default: JAX's)."""
        return dataclasses.replace(self, attention_impl=resolve_attention_impl(self.attention_impl, backend),
                                   matmul_impl=resolve_matmul_impl(self.matmul_impl))

    def param_count(self, include_embeddings: bool = True, active_only: bool = False) -> int:
        """Exact number of parameters of `models.transformer.Transformer` for this config.

        active_only: count only the experts a token is routed to (top_k of them; all of them with the
        dense router), i.e. the parameters that take part in one token's forward pass.
        """
        d, h, f = self.d_model, self.resolved_head_dim, self.d_ff
        n, k = self.num_heads, self.num_kv_heads
        norm = d if self.norm == "rmsnorm" else 2 * d
        attn = d * n * h + 2 * d * k * h + n * h * d + (n * h + 2 * k * h if self.qkv_bias else 0)
        attn += n if self.attention_logit_scaling == "learned" else 0
        per_ffn = 3 if self.mlp == "swiglu" else 2
        mlp = per_ffn * d * f
        moe, e = self.moe, self.moe.num_experts
        used = moe.top_k if active_only and moe.router != "dense" else e
        router = d * e * (2 if moe.router == "noisy" else 1) + (e if moe.bias_update_rate > 0 else 0)
        moe_mlp = router + used * per_ffn * d * (moe.d_ff or f)
        ffns = sum(moe_mlp if self.is_moe_layer(i) else mlp for i in range(self.num_layers))
        blocks = self.num_layers * (attn + 2 * norm) + ffns + norm
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.position == "learned":
            embed += self.max_seq_len * d
        return blocks + (embed if include_embeddings else 0)
