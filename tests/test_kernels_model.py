"""The whole model with attention_impl="pallas" against "xla": training logits and gradients, and
prefill + cached decode (flash kernel for the prompt, split-K decode kernel for each new token)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.kv_cache import init_cache, with_lengths
from models.transformer import Transformer, init_params, unbox
from research.metrics import cross_entropy

MODEL_TOL = 1e-4  # fp32 whole models, as in tests/test_models.py

# GQA with a sliding window shorter than the sequences, so the window and grouping both matter.
XLA = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, max_seq_len=32,
                  sliding_window=6, attention_impl="xla")
PALLAS = dataclasses.replace(XLA, attention_impl="pallas")


@pytest.fixture(autouse=True)
def full_precision_fp32_matmuls():
    """XLA may run fp32 matmuls in TF32 on GPU; the baselines compared against must not (no-op on CPU)."""
    with jax.default_matmul_precision("highest"):
        yield


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens, cache=None):
    return Transformer(cfg).apply({"params": params}, tokens, cache=cache)[:2]


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(cfg, params, tokens):
    def loss(params):
        logits, _, _ = Transformer(cfg).apply({"params": params}, tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:]).mean(), logits

    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.fixture(scope="module")
def params():
    return unbox(init_params(XLA, jax.random.key(0)))


def test_training_logits_and_gradients_match_xla(params):
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, XLA.vocab_size)
    (loss_x, logits_x), grads_x = loss_and_grads(XLA, params, tokens)
    (loss_p, logits_p), grads_p = loss_and_grads(PALLAS, params, tokens)
    np.testing.assert_allclose(logits_p, logits_x, atol=MODEL_TOL, rtol=MODEL_TOL)
    np.testing.assert_allclose(loss_p, loss_x, atol=MODEL_TOL, rtol=MODEL_TOL)
    for path, g_x in jax.tree_util.tree_leaves_with_path(grads_x):
        g_p = functools.reduce(lambda tree, key: tree[key.key], path, grads_p)
        np.testing.assert_allclose(g_p, g_x, atol=MODEL_TOL, rtol=MODEL_TOL, err_msg=jax.tree_util.keystr(path))


def test_ragged_prefill_then_cached_decode_matches_xla(params):
    """Rows of prompt length 11 and 5 (padded to 11), then 4 decoded tokens, logits at every step."""
    prompt = jax.random.randint(jax.random.key(2), (2, 11), 0, XLA.vocab_size)
    new = jax.random.randint(jax.random.key(3), (2, 4), 0, XLA.vocab_size)
    logits = {}
    for cfg in (XLA, PALLAS):
        cache = init_cache(cfg, batch=2, max_len=24)
        first, cache = forward(cfg, params, prompt, cache)
        cache = with_lengths(cache, jnp.array([11, 5]))
        steps = [first[0, -1], first[1, 4]]
        for i in range(new.shape[1]):
            step, cache = forward(cfg, params, new[:, i:i + 1], cache)
            steps.append(step[:, 0])
        logits[cfg.attention_impl] = jnp.concatenate([s.reshape(-1, cfg.vocab_size) for s in steps])
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=MODEL_TOL, rtol=MODEL_TOL)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error raised without a GPU")
def test_cudnn_without_gpu_is_a_clear_one_line_error(params):
    cfg = dataclasses.replace(XLA, attention_impl="cudnn")
    with pytest.raises(RuntimeError, match="attention_impl='cudnn' needs a CUDA GPU") as err:
        forward(cfg, params, jnp.zeros((1, 4), jnp.int32))
    assert "\n" not in str(err.value)
