"""Attention-logit scaling (model.attention_logit_scaling): "none" leaves the model as it was, "logn" and
"learned" match a NumPy attention layer in every attention_impl, the KV-cache decode path agrees with the
full forward, bad values fail in one line, old run.json files load, and Hugging Face export refuses it.

Tolerances: fp32 single layer against a float64 NumPy reference 1e-5; fp32 whole model 1e-4.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention
from models.attention import Attention
from models.config import ConfigError, ModelConfig
from models.kv_cache import init_cache
from models.transformer import Transformer, init_params, unbox
from research.config import TrainConfig, apply_overrides, to_dict
from research.hf_config import UnsupportedError, export_family, model_config_from_hf
from research.runs import read_run_config

OP_TOL = 1e-5
MODEL_TOL = 1e-4
L = 6  # logit_scaling_length: shorter than the sequences below, so the scale is not 1
T = 20
# init_std 0.3 makes the attention far from uniform, so a wrong scale shows.
TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, max_seq_len=32,
                   init_std=0.3)


def scaled(cfg: ModelConfig, scaling: str, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, attention_logit_scaling=scaling, logit_scaling_length=L, **changes)


def np_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x: [B, T, heads, H] rotated by positions [B, T], rotate-half pairs (i, i + H/2) as models/rope.py."""
    h = x.shape[-1]
    angles = positions[:, :, None] / theta ** (np.arange(0, h, 2) / h)  # [B, T, H/2]
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    x1, x2 = x[..., :h // 2], x[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_logit_scale(cfg: ModelConfig, positions: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    """[B, T, N or 1]: the factor on each query, from the definitions."""
    n = positions + 1.0
    if cfg.sliding_window:
        n = np.minimum(n, cfg.sliding_window)
    if cfg.attention_logit_scaling == "logn":
        return np.maximum(1.0, np.log(n) / np.log(cfg.logit_scaling_length))[..., None]
    if cfg.attention_logit_scaling == "learned":
        return np.log(n)[..., None] * s
    return np.ones(n.shape + (1,))


def np_attention(cfg: ModelConfig, p: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One causal attention layer in float64 at positions 0..T-1: x [B, T, D] -> (out [B, T, D], the
    probabilities [B, N, T, T]). Query head i reads kv head i // G."""
    p = {name: np.asarray(w, np.float64) for name, w in p.items()}
    b, t, _ = x.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.float64), (b, t))
    q, k, v = (np.einsum("btd,dnh->btnh", x, p[w]) for w in ("wq", "wk", "wv"))
    q, k = np_rope(q, positions, cfg.rope_theta), np_rope(k, positions, cfg.rope_theta)
    q = q * np_logit_scale(cfg, positions, p.get("logit_scale"))[..., None]
    g = cfg.num_heads // cfg.num_kv_heads
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("bqnh,bsnh->bnqs", q, k) / np.sqrt(q.shape[-1])
    query, key = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = (key <= query) & ((key > query - cfg.sliding_window) if cfg.sliding_window else True)
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnqs,bsnh->bqnh", probs, v)
    return np.einsum("bqnh,nhd->bqd", out, p["wo"]), probs


def attention_layer(cfg: ModelConfig, seed: int = 0) -> tuple[dict, np.ndarray]:
    """(params of one Attention layer, x [2, T, D]); a learned scale gets distinct per-head values."""
    x = np.random.default_rng(seed).normal(size=(2, T, cfg.d_model)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    params = dict(unbox(Attention(cfg, True).init(jax.random.key(seed), x, positions)["params"]))
    if "logit_scale" in params:
        params["logit_scale"] = jnp.linspace(0.2, 0.7, cfg.num_heads)
    return params, x


def apply_layer(cfg: ModelConfig, params: dict, x: np.ndarray) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    out, _ = jax.jit(Attention(cfg, True).apply)({"params": params}, x, positions)
    return np.asarray(out)


def test_none_adds_no_parameter_and_no_op(monkeypatch):
    """"none" skips the scaling entirely (never multiplies by 1): no logit_scale parameter, `logit_scale`
    never called, and logit_scaling_length is ignored."""
    params = unbox(init_params(TINY, jax.random.key(0)))
    assert "logit_scale" not in params["block_0"]["attn"]
    assert sum(x.size for x in jax.tree.leaves(params)) == TINY.param_count()
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, TINY.vocab_size)

    def called(*args):
        raise AssertionError("logit_scale called")

    def logits(cfg: ModelConfig) -> np.ndarray:
        return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, tokens)[0])

    monkeypatch.setattr(attention, "logit_scale", called)
    np.testing.assert_array_equal(logits(dataclasses.replace(TINY, logit_scaling_length=512)), logits(TINY))
    with pytest.raises(AssertionError, match="logit_scale called"):
        logits(scaled(TINY, "logn"))


def test_learned_scale_is_a_per_head_parameter_starting_at_one_over_log_l():
    cfg = scaled(TINY, "learned")
    boxed = init_params(cfg, jax.random.key(0))
    scale = boxed["block_0"]["attn"]["logit_scale"]
    assert scale.names == ("heads",)
    np.testing.assert_allclose(scale.value, np.full(cfg.num_heads, 1 / np.log(L)), rtol=1e-6)
    assert sum(x.size for x in jax.tree.leaves(unbox(boxed))) == cfg.param_count()


@pytest.mark.parametrize("impl", ["xla", "blocked", "cpu_fused", "pallas"])
@pytest.mark.parametrize("scaling,window", [("logn", 0), ("learned", 0), ("logn", 9), ("learned", 9)])
def test_scaled_attention_matches_numpy(impl, scaling, window):
    cfg = scaled(TINY, scaling, sliding_window=window, attention_impl=impl)
    params, x = attention_layer(cfg)
    expected, _ = np_attention(cfg, params, x.astype(np.float64))
    np.testing.assert_allclose(apply_layer(cfg, params, x), expected, atol=OP_TOL, rtol=OP_TOL)
    unscaled = {k: w for k, w in params.items() if k != "logit_scale"}
    plain = dataclasses.replace(cfg, attention_logit_scaling="none")
    assert np.abs(apply_layer(plain, unscaled, x) - expected).max() > 100 * OP_TOL  # the scale shows


@pytest.mark.parametrize("scaling,window", [("logn", 0), ("learned", 0), ("logn", 9)])
def test_cached_decode_equals_full_forward(scaling, window):
    cfg = scaled(TINY, scaling, sliding_window=window)
    params = unbox(init_params(cfg, jax.random.key(0)))
    forward = jax.jit(lambda tokens, cache=None: Transformer(cfg).apply({"params": params}, tokens, cache=cache))
    tokens = jax.random.randint(jax.random.key(2), (2, T), 0, cfg.vocab_size)
    full, _, _ = forward(tokens)
    prefill, cache, _ = forward(tokens[:, :7], init_cache(cfg, batch=2, max_len=24))
    steps = [prefill]
    for i in range(7, T):
        logits, cache, _ = forward(tokens[:, i:i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=MODEL_TOL, rtol=MODEL_TOL)


@pytest.mark.parametrize("changes,message", [
    ({"attention_logit_scaling": "log"}, "model.attention_logit_scaling='log': expected one of none, logn, learned"),
    ({"attention_logit_scaling": "logn"},
     "model.logit_scaling_length=0: expected the training length (>= 2) that model.attention_logit_scaling='logn' "
     "is anchored to"),
    ({"attention_logit_scaling": "learned", "logit_scaling_length": 1},
     "model.logit_scaling_length=1: expected the training length (>= 2) that "
     "model.attention_logit_scaling='learned' is anchored to"),
    ({"logit_scaling_length": -1}, "model.logit_scaling_length=-1: expected >= 0 (unused without "
                                   "model.attention_logit_scaling)"),
])
def test_bad_values_fail_in_one_line(changes, message):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(TINY, **changes)
    assert str(err.value) == message


def test_overrides_set_both_fields():
    cfg = apply_overrides(TrainConfig(), ["model.logit_scaling_length=128", "model.attention_logit_scaling=logn"])
    assert (cfg.model.attention_logit_scaling, cfg.model.logit_scaling_length) == ("logn", 128)


def test_run_json_from_before_the_option_loads_without_scaling(tmp_path):
    config = to_dict(TrainConfig(model=TINY))
    for field in ("attention_logit_scaling", "logit_scaling_length"):
        del config["model"][field]
    (tmp_path / "run.json").write_text(json.dumps({"config": config}))
    assert read_run_config(tmp_path) == TrainConfig(model=TINY)


@pytest.mark.parametrize("scaling", ["logn", "learned"])
def test_hugging_face_export_refuses_scaling_and_import_sets_none(scaling):
    with pytest.raises(UnsupportedError) as err:
        export_family(scaled(TINY, scaling))
    assert str(err.value) == (f"model.attention_logit_scaling={scaling!r}: the families have no attention-logit "
                              "scaling, so no Hugging Face family computes it")
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4)
    assert model_config_from_hf(hf).attention_logit_scaling == "none"
