"""The CPU kernels wired into the model (`matmul_impl="cpu_panel"`, `attention_impl="cpu_fused"`, and
packed weights in the decode loop): the products and their gradients against NumPy loops, and whole
models (dense and MoE in each dispatch layout) against the XLA path in forward, gradients and decoding."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.generate import generate
from models.config import ConfigError, ModelConfig, MoEConfig
from models.kernels.cpu import library as cpu_library
from models.kernels.cpu.linear import Packed, grouped_weight_grad
from models.linear import expert_linear, linear, prepare_weight, ragged_linear
from models.transformer import Transformer, init_params, prepare_params, unbox

TOL = 1e-5  # fp32 single ops
MODEL_TOL = 1e-4  # fp32 whole models

DENSE = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                    max_seq_len=40, init_std=0.3)
MOE = dataclasses.replace(DENSE, tie_embeddings=False, moe=MoEConfig(num_experts=4, top_k=2, renormalize=True,
                                                                  capacity_factor=0.0, eval_capacity_factor=0.0))
CPU = {"matmul_impl": "cpu_panel", "attention_impl": "cpu_fused"}
XLA = {"matmul_impl": "xla", "attention_impl": "xla"}


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
    y = linear(x, w, fan_in_dims=2, impl="cpu_panel")
    np.testing.assert_allclose(y, np.einsum("btnh,nhd->btd", x, w), atol=TOL)
    dx, dw = jax.grad(lambda x, w: jnp.sum(g * linear(x, w, fan_in_dims=2, impl="cpu_panel")), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dx, np.einsum("btd,nhd->btnh", g, w), atol=TOL)
    np.testing.assert_allclose(dw, np.einsum("btnh,btd->nhd", x, g), atol=TOL)


def test_ragged_linear_and_gradients_match_a_loop_over_groups():
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
    np.testing.assert_allclose(ragged_linear(x, w, s, "cpu_panel"), want_y, atol=TOL)
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(g * ragged_linear(x, w, s, "cpu_panel")), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(dx, want_dx, atol=TOL)
    np.testing.assert_allclose(dw, want_dw, atol=TOL)
    np.testing.assert_allclose(grouped_weight_grad(x, g, s), want_dw, atol=TOL)


def test_expert_linear_matches_numpy():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(3, 5, 6)).astype(np.float32)  # [X, R, D]
    w = rng.normal(size=(3, 6, 7)).astype(np.float32)  # [X, D, F]
    np.testing.assert_allclose(expert_linear(h, w, "cpu_panel"), np.einsum("xrd,xdf->xrf", h, w), atol=TOL)


@pytest.mark.parametrize("fan_in_dims,transposed", [(1, False), (2, False), (1, True)])
def test_packed_weights_match_numpy(fan_in_dims, transposed):
    """A weight packed for a decode loop: projections [D, N, H], output projections [N, H, D] and a tied
    table [V, D] used as the LM head, each multiplied by a few rows."""
    rng = np.random.default_rng(4)
    shape = {(1, False): (6, 2, 5), (2, False): (2, 5, 6), (1, True): (37, 6)}[fan_in_dims, transposed]
    w = rng.normal(size=shape).astype(np.float32)
    x = rng.normal(size=(3, 1) + ((w.shape[1],) if transposed else w.shape[:fan_in_dims])).astype(np.float32)
    packed = prepare_weight(jnp.asarray(w), "auto", rows=3, fan_in_dims=fan_in_dims, transposed=transposed)
    assert isinstance(packed, Packed)
    contract = "btd,vd->btv" if transposed else ("btd,dnh->btnh" if fan_in_dims == 1 else "btnh,nhd->btd")
    got = jax.jit(lambda x, w: linear(x, w, fan_in_dims, transposed=transposed))(x, packed)
    np.testing.assert_allclose(got, np.einsum(contract, x, w), atol=TOL)


def test_prepared_params_pack_only_for_few_rows_and_the_kernel_impls():
    params = unbox(init_params(DENSE, jax.random.key(0)))
    leaves = lambda p: jax.tree.leaves(p, is_leaf=lambda x: isinstance(x, Packed))
    packed = lambda p: sum(isinstance(x, Packed) for x in leaves(p))
    # 4 projections per block, 3 MLP weights per block, the tied head (the embedding table).
    assert packed(prepare_params(params, DENSE, rows=4)) == DENSE.num_layers * 7 + 1
    assert packed(prepare_params(params, DENSE, rows=33)) == 0
    assert packed(prepare_params(params, dataclasses.replace(DENSE, matmul_impl="xla"), rows=4)) == 0


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


@pytest.mark.parametrize("cfg", [MOE, DENSE], ids=["moe", "dense"])
def test_greedy_decoding_matches_xla(cfg):
    """The kernels everywhere (the decode loop's packed weights included) against XLA's ops everywhere."""
    params = jax.jit(lambda key: unbox(init_params(cfg, key)))(jax.random.key(0))
    prompt, lengths = np.array([[5, 9, 2, 7], [11, 4, 0, 0]], np.int32), np.array([4, 2])
    fast = generate(params, dataclasses.replace(cfg, **CPU), prompt, lengths, max_new_tokens=6)
    plain = generate(params, dataclasses.replace(cfg, **XLA), prompt, lengths, max_new_tokens=6)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)
    np.testing.assert_allclose(fast.logprobs, plain.logprobs, atol=MODEL_TOL)


@pytest.mark.parametrize("field", ["matmul_impl", "attention_impl"])
def test_cpu_kernels_need_float32(field):
    value = CPU[field]
    with pytest.raises(ConfigError, match=f"model.{field}='{value}': the CPU kernels are float32 only, "
                                          "but model.dtype='bfloat16'"):
        dataclasses.replace(DENSE, dtype="bfloat16", **{field: value})


def test_without_the_library_the_kernel_settings_run_xla(monkeypatch):
    """A machine that cannot build the kernels loses speed, never correctness: the same logits, and a
    decode loop with nothing packed."""
    from models.kernels import cpu
    monkeypatch.setattr(cpu, "available", lambda: False)
    params = unbox(init_params(DENSE, jax.random.key(0)))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, DENSE.vocab_size, (2, 9)), jnp.int32)
    np.testing.assert_allclose(forward(dataclasses.replace(DENSE, **CPU), params, tokens),
                               forward(DENSE, params, tokens), atol=MODEL_TOL)
    prepared = prepare_params(params, DENSE, rows=2)
    assert not any(isinstance(x, Packed) for x in jax.tree.leaves(prepared, is_leaf=lambda x: isinstance(x, Packed)))
