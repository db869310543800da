"""The CPU kernels wired into the model (`matmul_impl="cpu"`, `attention_impl="cpu"`): the grouped
product and its gradients against NumPy loops, and whole models (dense and MoE in each dispatch layout)
against the XLA path in forward, gradients and greedy decoding."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.generate import generate
from models.config import ConfigError, ModelConfig, MoEConfig
from models.kernels import cpu_library
from models.linear import grouped_linear, grouped_weight_grad, linear
from models.transformer import Transformer, init_params, unbox

TOL = 1e-5  # fp32 single ops
MODEL_TOL = 1e-4  # fp32 whole models

DENSE = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                    max_seq_len=40, init_std=0.3)
MOE = dataclasses.replace(DENSE, tie_embeddings=False, moe=MoEConfig(num_experts=4, top_k=2, renormalize=True,
                                                                  capacity_factor=0.0, eval_capacity_factor=0.0))
CPU = {"matmul_impl": "cpu", "attention_impl": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert cpu_library.available(), cpu_library.unavailable_reason()


def test_linear_and_gradients_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # [B, T, N, H]
    w = rng.normal(size=(4, 5, 6)).astype(np.float32)  # [N, H, D]
    g = rng.normal(size=(2, 3, 6)).astype(np.float32)  # d loss / d y for loss = sum(g * y)
    y = linear(x, w, fan_in_dims=2, impl="cpu")
    np.testing.assert_allclose(y, np.einsum("btnh,nhd->btd", x, w), atol=TOL)
    dx, dw = jax.grad(lambda x, w: jnp.sum(g * linear(x, w, fan_in_dims=2, impl="cpu")), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dx, np.einsum("btd,nhd->btnh", g, w), atol=TOL)
    np.testing.assert_allclose(dw, np.einsum("btnh,btd->nhd", x, g), atol=TOL)


def test_grouped_linear_and_gradients_match_a_loop_over_groups():
    rng = np.random.default_rng(1)
    sizes = np.array([5, 0, 9, 3])  # an empty group, and 3 rows after the last group
    x = rng.normal(size=(20, 6)).astype(np.float32)
    w = rng.normal(size=(4, 6, 7)).astype(np.float32)
    g = rng.normal(size=(20, 7)).astype(np.float32)
    ends = np.cumsum(sizes)
    want_y, want_dx, want_dw = np.zeros((20, 7)), np.zeros((20, 6)), np.zeros((4, 6, 7))
    for e, (start, end) in enumerate(zip(ends - sizes, ends)):
        want_y[start:end] = x[start:end] @ w[e]
        want_dx[start:end] = g[start:end] @ w[e].T
        want_dw[e] = x[start:end].T @ g[start:end]
    s = jnp.asarray(sizes, jnp.int32)
    np.testing.assert_allclose(grouped_linear(x, w, s), want_y, atol=TOL)
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(g * grouped_linear(x, w, s)), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(dx, want_dx, atol=TOL)
    np.testing.assert_allclose(dw, want_dw, atol=TOL)
    np.testing.assert_allclose(grouped_weight_grad(x, g, s), want_dw, atol=TOL)


def forward(cfg, params, tokens):
    return jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])(params, tokens)


def loss_grads(cfg, params, tokens):
    def loss(p):
        logits, _, aux = Transformer(cfg).apply({"params": p}, tokens, train=True, rngs={"router": jax.random.key(1)})
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + sum(jax.tree.leaves(aux["losses"]))
    return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("cfg", [
    DENSE,
    dataclasses.replace(DENSE, sliding_window=5, qkv_bias=True, tie_embeddings=False),
    MOE,  # dropless: sorted rows, one grouped call per weight
    dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, capacity_factor=1.0, eval_capacity_factor=1.0)),
    dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, router="dense")),
], ids=["dense", "window-bias-untied", "moe-dropless", "moe-capacity", "moe-dense-router"])
def test_model_forward_and_gradients_match_xla(cfg):
    params = jax.jit(lambda key: unbox(init_params(cfg, key)))(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 19)), jnp.int32)
    fast = dataclasses.replace(cfg, **CPU)
    np.testing.assert_allclose(forward(fast, params, tokens), forward(cfg, params, tokens), atol=MODEL_TOL)
    for got, want in zip(jax.tree.leaves(loss_grads(fast, params, tokens)),
                         jax.tree.leaves(loss_grads(cfg, params, tokens))):
        np.testing.assert_allclose(got, want, atol=MODEL_TOL)


def test_greedy_decoding_matches_xla():
    params = jax.jit(lambda key: unbox(init_params(MOE, key)))(jax.random.key(0))
    prompt, lengths = np.array([[5, 9, 2, 7], [11, 4, 0, 0]], np.int32), np.array([4, 2])
    fast = generate(params, dataclasses.replace(MOE, **CPU), prompt, lengths, max_new_tokens=6)
    plain = generate(params, MOE, prompt, lengths, max_new_tokens=6)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)


@pytest.mark.parametrize("field", ["matmul_impl", "attention_impl"])
def test_cpu_kernels_need_float32(field):
    with pytest.raises(ConfigError, match=f"model.{field}='cpu': the CPU kernels are float32 only, "
                                          "but model.dtype='bfloat16'"):
        dataclasses.replace(DENSE, dtype="bfloat16", **{field: "cpu"})
