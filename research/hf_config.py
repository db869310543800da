"""Hugging Face `config.json` <-> `ModelConfig` for the Llama, Mistral, Qwen2 and Mixtral families.

The four are one architecture with switches our `ModelConfig` already has: pre-norm RMSNorm blocks,
rotate-half RoPE (models/rope.py uses the same pairing, so no weight permutation is needed), GQA and
SwiGLU; Mistral adds a sliding window, Qwen2 biases on q/k/v, Mixtral a top-k softmax MoE whose gates
are renormalised over the chosen experts, dropless. Anything a config asks for that our model cannot
compute exactly (another RoPE scaling, mixed sliding/full layers, an output-projection bias, ...) is an
`UnsupportedError` naming the field, never a silent approximation.
"""

from __future__ import annotations

from typing import Any

from models.config import ModelConfig, MoEConfig

# architectures[0] in config.json -> family
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "MixtralForCausalLM": "mixtral"}
ARCHITECTURES = {family: arch for arch, family in FAMILIES.items()}
DEFAULT_ROPE_THETA = {"llama": 10_000.0, "mistral": 10_000.0, "qwen2": 10_000.0, "mixtral": 1_000_000.0}
SILU = ("silu", "swish")
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Keys this module writes, or older spellings of them, that must not leak through from a source config.
_OWNED = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
          "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "sliding_window",
          "use_sliding_window", "max_window_layers", "layer_types", "attention_bias", "mlp_bias", "dtype",
          "torch_dtype", "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise")


class ConversionError(ValueError):
    """A checkpoint cannot be converted. The one-line message names the file, tensor or field."""


class UnsupportedError(ConversionError):
    """The checkpoint asks for something our model does not compute."""


def unsupported(field: str, value: Any, why: str) -> UnsupportedError:
    return UnsupportedError(f"config.json {field}={value!r}: {why}")


def family_of(hf: dict[str, Any]) -> str:
    """The family of a config.json (from `architectures`, else `model_type`)."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    if not archs and hf.get("model_type") in ARCHITECTURES:
        return hf["model_type"]
    found = archs[0] if archs else hf.get("model_type")
    raise UnsupportedError(f"config.json architecture {found!r} is not supported; supported: "
                           + ", ".join(FAMILIES))


def check_sizes(hf: dict[str, Any], family: str) -> None:
    """The sizes config.json must give (there is no default for them) are there, each a positive integer."""
    required = SIZES + (("num_local_experts",) if family == "mixtral" else ())
    missing = [key for key in required if hf.get(key) is None]
    if missing:
        raise ConversionError(f"config.json: missing {', '.join(missing)} (required for {family})")
    for key in required:
        if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
            raise ConversionError(f"config.json {key}={hf[key]!r}: expected a positive integer")


def rope_from_hf(hf: dict[str, Any], family: str) -> tuple[float, str, float]:
    """(theta, our rope_scaling, factor) from either `rope_parameters` (transformers 5) or the older
    top-level `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or DEFAULT_ROPE_THETA[family])
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise unsupported("partial_rotary_factor", partial, "RoPE on only part of each head is not supported")
    if kind == "default":
        return theta, "none", 1.0
    if kind == "linear":
        return theta, "linear", float(params["factor"])
    raise unsupported("rope_parameters.rope_type", kind, "supported: default, linear")


def sliding_window_from_hf(hf: dict[str, Any], family: str) -> int:
    """Our single window (0: off). Qwen2 may window only some layers; that mix is not supported."""
    window = hf.get("sliding_window") or 0
    if family == "llama":
        return 0
    if family != "qwen2":
        return int(window)
    if "layer_types" in hf and hf["layer_types"] is not None:
        sliding = [t == "sliding_attention" for t in hf["layer_types"]]
    else:
        first = hf.get("max_window_layers", 28)
        sliding = [bool(hf.get("use_sliding_window")) and window > 0 and i >= first
                   for i in range(hf["num_hidden_layers"])]
    if any(sliding) and not all(sliding):
        raise unsupported("layer_types", hf.get("layer_types"),
                          "mixes sliding and full attention layers; model.sliding_window applies to every layer")
    return int(window) if all(sliding) and sliding else 0


def model_config_from_hf(hf: dict[str, Any], dtype: str = "auto") -> ModelConfig:
    """Our ModelConfig for a config.json. dtype: float32, bfloat16, or auto (bfloat16 when the checkpoint
    is stored in it, else float32: float16 is widened, as our models have no float16 path)."""
    family = family_of(hf)
    check_sizes(hf, family)
    if hf.get("hidden_act", "silu") not in SILU:
        raise unsupported("hidden_act", hf.get("hidden_act"), "supported: silu (SwiGLU)")
    for field in ("attention_bias", "mlp_bias"):
        if family == "llama" and hf.get(field):
            raise unsupported(field, hf[field], "our attention has biases only on q/k/v (Qwen2) and the MLP none")
    stored = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype == "auto":
        dtype = "bfloat16" if stored == "bfloat16" else "float32"
    theta, scaling, factor = rope_from_hf(hf, family)
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    moe = MoEConfig()
    if family == "mixtral":
        top_k = hf.get("num_experts_per_tok", 2)
        if top_k < 2:
            raise unsupported("num_experts_per_tok", top_k, "Mixtral renormalises the top-k gates, which our "
                              "router does only for top_k >= 2 (with 1 the gate would be 1)")
        # Mixtral is dropless; its auxiliary loss is the Switch loss.
        moe = MoEConfig(num_experts=hf["num_local_experts"], top_k=top_k, router="softmax", renormalize=True,
                        capacity_factor=0.0, eval_capacity_factor=0.0,
                        switch_loss_weight=float(hf.get("router_aux_loss_coef", 0.0)),
                        jitter=float(hf.get("router_jitter_noise") or 0.0))
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or d // heads,
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu", position="rope", rope_theta=theta,
        rope_scaling=scaling, rope_scaling_factor=factor, sliding_window=sliding_window_from_hf(hf, family),
        qkv_bias=family == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype, param_dtype=dtype, moe=moe)


def export_family(cfg: ModelConfig) -> str:
    """The family that computes what `cfg` does, or UnsupportedError naming the field.

    Mixtral is dropless: a model evaluated with a capacity factor differs only where it drops tokens.
    """

    def need(ok: bool, field: str, value: Any, why: str) -> None:
        if not ok:
            raise UnsupportedError(f"model.{field}={value!r}: {why}, so no Hugging Face family computes it")

    need(cfg.norm == "rmsnorm", "norm", cfg.norm, "the families use RMSNorm")
    need(cfg.mlp == "swiglu", "mlp", cfg.mlp, "the families use SwiGLU")
    need(cfg.position == "rope", "position", cfg.position, "the families use RoPE")
    need(cfg.attention_logit_scaling == "none", "attention_logit_scaling", cfg.attention_logit_scaling,
         "the families have no attention-logit scaling")
    moe = cfg.moe
    if not moe.num_experts:
        return "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
    need(not cfg.qkv_bias, "qkv_bias", cfg.qkv_bias, "Mixtral has no q/k/v biases")
    need(moe.every_n_layers == 1, "moe.every_n_layers", moe.every_n_layers, "Mixtral has experts in every block")
    need(moe.router == "softmax", "moe.router", moe.router, "Mixtral's router is a softmax top-k")
    need(moe.renormalize, "moe.renormalize", moe.renormalize, "Mixtral renormalises the top-k gates")
    need(moe.bias_update_rate == 0, "moe.bias_update_rate", moe.bias_update_rate, "Mixtral has no router bias")
    need(moe.d_ff in (0, cfg.d_ff), "moe.d_ff", moe.d_ff, f"Mixtral's experts are intermediate_size={cfg.d_ff} wide")
    return "mixtral"


def hf_config_from_model(cfg: ModelConfig, dtype: str, base: dict[str, Any] | None = None,
                         token_ids: dict[str, int | None] | None = None) -> dict[str, Any]:
    """The config.json of `cfg` stored in `dtype`.

    base: the config.json the model was imported from; its other fields (token ids, initializer range,
    ...) are kept. token_ids: bos/eos/pad_token_id to set. Static NTK scaling is a larger base, so it is
    written as default RoPE with theta * factor^(H / (H - 2)), which is what it computes.
    """
    family = export_family(cfg)
    theta, rope = cfg.rope_theta, {"rope_type": "default"}
    h = cfg.resolved_head_dim
    if cfg.rope_scaling == "ntk":
        theta = theta * cfg.rope_scaling_factor ** (h / (h - 2))
    elif cfg.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    out = {k: v for k, v in (base or {}).items() if k not in _OWNED and not k.startswith("_")}
    out.update({key: value for key, value in (token_ids or {}).items() if value is not None})
    out.update({
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": h,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": theta, "rope_parameters": {**rope, "rope_theta": theta},
        "tie_word_embeddings": cfg.tie_embeddings, "sliding_window": cfg.sliding_window or None, "dtype": dtype,
    })
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if family == "qwen2":
        windowed = bool(cfg.sliding_window)
        out.update(use_sliding_window=windowed, max_window_layers=0,
                   layer_types=[("sliding_attention" if windowed else "full_attention")] * cfg.num_layers)
    if family == "mixtral":
        out.update(num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                   router_aux_loss_coef=cfg.moe.switch_loss_weight, router_jitter_noise=cfg.moe.jitter)
    return out
