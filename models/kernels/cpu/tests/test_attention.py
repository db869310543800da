"""The fused CPU attention kernel (`models/kernels/cpu/attention.py`): output and log-sum-exp against a
naive NumPy loop (MHA, GQA, MQA; full causal and sliding windows; head dims that are not a multiple of
16; lengths that leave partial query blocks and key panels), and its gradients through
`fused_causal_attention` against the blocked jnp path's."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.blocked_attention import causal_attention
from models.kernels.cpu import library as cpu_library
from models.kernels.cpu.attention import cpu_causal_attention, fused_causal_attention


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert cpu_library.available(), cpu_library.unavailable_reason()


def naive(q, k, v, window):
    """Loop over rows, heads and positions in float64 -> (out [B, T, N, H], lse [B, K, T * G])."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    out, lse = np.zeros(q.shape), np.zeros((b, kv, t * g))
    for bi in range(b):
        for head in range(n):
            for i in range(t):
                lo = max(0, i - window + 1) if window else 0
                keys = np.arange(lo, i + 1)
                logits = k[bi, keys, head // g].astype(np.float64) @ q[bi, i, head].astype(np.float64) / np.sqrt(h)
                peak = logits.max()
                weights = np.exp(logits - peak)
                out[bi, i, head] = weights @ v[bi, keys, head // g] / weights.sum()
                lse[bi, head // g, i * g + head % g] = peak + np.log(weights.sum())
    return out, lse


# (batch, length, heads, kv heads, head dim, window)
SHAPES = [(2, 37, 4, 2, 32, 0), (1, 70, 3, 1, 20, 0), (2, 50, 4, 4, 16, 9), (1, 33, 8, 2, 48, 17),
          (1, 130, 2, 1, 8, 0)]


@pytest.mark.parametrize("b,t,n,kv,h,window", SHAPES)
def test_matches_a_naive_loop(kernel, b, t, n, kv, h, window):
    rng = np.random.default_rng(t * 10 + n)
    q, k, v = (rng.normal(size=(b, t, heads, h)).astype(np.float32) for heads in (n, kv, kv))
    out, lse = jax.jit(lambda q, k, v: cpu_causal_attention(q, k, v, window))(q, k, v)
    want_out, want_lse = naive(q, k, v, window)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("window", [0, 7])
def test_gradients_match_the_jnp_path(kernel, window):
    rng = np.random.default_rng(window)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 45, heads, 16)), jnp.float32) for heads in (4, 2, 2))
    d_out = jnp.asarray(rng.normal(size=(2, 45, 4, 16)), jnp.float32)

    def grads(fused):
        attend = fused_causal_attention if fused else causal_attention
        loss = lambda q, k, v: jnp.sum(attend(q, k, v, window) * d_out)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(True), grads(False)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float32_only(kernel):
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(TypeError, match="float32 only"):
        cpu_causal_attention(x, x, x, 0)
