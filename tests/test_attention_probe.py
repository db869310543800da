"""The attention probe (models/attention_probe.py): each layer's last-query attention probabilities match a
NumPy forward of the whole model (float64, 1e-5 against fp32), with and without log-n scaling, in the loop
and the scanned layout; the cached decode path sows the same row; calls without the probe compute nothing."""

import dataclasses

import jax
import numpy as np
import pytest
from test_logit_scaling import np_attention

from models import attention
from models.attention_probe import last_query_attention
from models.config import ModelConfig
from models.kv_cache import init_cache
from models.layers import stack_layers
from models.transformer import Transformer, init_params, unbox

TOL = 1e-5
T = 20
TINY = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=32, max_seq_len=32,
                   norm="rmsnorm", mlp="swiglu", position="rope", init_std=0.3)
CONFIGS = {"plain": TINY, "logn": dataclasses.replace(TINY, attention_logit_scaling="logn", logit_scaling_length=6)}
TOKENS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, T))


def np_rmsnorm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_swiglu(x: np.ndarray, p: dict) -> np.ndarray:
    gate = x @ p["w_gate"]
    return (gate / (1 + np.exp(-gate)) * (x @ p["w_up"])) @ p["w_down"]


def np_last_query_attention(cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """[layers, B, N, T]: the pre-norm blocks in float64, keeping each layer's last attention row."""
    params = jax.tree.map(lambda w: np.asarray(w, np.float64), params)
    x = params["embed"]["table"][tokens]
    rows = []
    for i in range(cfg.num_layers):
        block = params[f"block_{i}"]
        h, probs = np_attention(cfg, block["attn"], np_rmsnorm(x, block["attn_norm"]["scale"], cfg.norm_eps))
        rows.append(probs[:, :, -1])
        x = x + h
        x = x + np_swiglu(np_rmsnorm(x, block["mlp_norm"]["scale"], cfg.norm_eps), block["mlp"])
    return np.stack(rows)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_probe_matches_numpy_forward(name):
    cfg = CONFIGS[name]
    params = unbox(init_params(cfg, jax.random.key(0)))
    probs = last_query_attention(cfg, params, TOKENS)
    assert probs.shape == (cfg.num_layers, 2, cfg.num_heads, T) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, np_last_query_attention(cfg, params, TOKENS), atol=TOL, rtol=0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=TOL)
    assert np.all(probs > 0)  # the last query sees every key
    scanned = dataclasses.replace(cfg, scan_layers=True)
    np.testing.assert_allclose(last_query_attention(scanned, stack_layers(params, scanned), TOKENS), probs,
                               atol=TOL, rtol=0)


def test_probe_respects_the_sliding_window():
    cfg = dataclasses.replace(TINY, sliding_window=5)
    probs = last_query_attention(cfg, unbox(init_params(cfg, jax.random.key(0))), TOKENS)
    assert np.all(probs[..., :T - 5] == 0) and np.all(probs[..., T - 5:] > 0)


def test_cached_decode_sows_the_same_row():
    """One decode step over a cache sows the last query's row over the cache's slots (0 past the length)."""
    cfg = CONFIGS["logn"]
    params = unbox(init_params(cfg, jax.random.key(0)))
    apply = jax.jit(Transformer(cfg).apply, static_argnames="mutable")
    _, cache, _ = apply({"params": params}, TOKENS[:, :-1], cache=init_cache(cfg, batch=2, max_len=24))
    _, state = apply({"params": params}, TOKENS[:, -1:], cache=cache, mutable=("intermediates",))
    step = np.asarray(state["intermediates"]["block_1"]["attn"]["last_query_attention"][0])
    full = last_query_attention(cfg, params, TOKENS)[1]
    np.testing.assert_allclose(step[..., :T], full, atol=TOL, rtol=0)
    assert np.all(step[..., T:] == 0)


def test_calls_without_the_probe_do_not_compute_it(monkeypatch):
    def called(*args):
        raise AssertionError("last_query_probs called")

    monkeypatch.setattr(attention, "last_query_probs", called)
    params = {"params": unbox(init_params(TINY, jax.random.key(0)))}
    jax.jit(lambda p: Transformer(TINY).apply(p, TOKENS))(params)
    with pytest.raises(AssertionError, match="last_query_probs called"):
        jax.jit(lambda p: Transformer(TINY).apply(p, TOKENS, mutable=["intermediates"]))(params)
