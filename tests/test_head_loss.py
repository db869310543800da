"""The chunked LM-head cross-entropy equals the plain one: value and gradients (model and raw arrays)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.transformer import Transformer, head_weight, init_params, unbox
from research.head_loss import head_nll_sum
from research.metrics import cross_entropy

TOL = 1e-5
TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                   max_seq_len=32)


# 2 rows x 11 positions: chunks of 3 positions (padded last chunk), 1 position, all positions.
@pytest.mark.parametrize("chunk_tokens", [6, 2, 64])
def test_head_nll_sum_matches_plain_cross_entropy(chunk_tokens):
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 11, 8, 13
    x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)

    def plain(x, w):
        return jnp.sum(cross_entropy(x @ w, targets))

    def chunked(x, w):
        return head_nll_sum(x, w, targets, chunk_tokens)

    # A non-trivial outer function checks that the cotangent scales the gradients. It takes the sum over
    # the b * t positions scaled to a mean: sin of the raw sum (~100) turned a few float32 ulps of the sum,
    # summed in another order on another CPU, into 1.5e-5 of the value.
    outer = lambda loss: jnp.sin(loss / (b * t))
    expected = jax.value_and_grad(lambda x, w: outer(plain(x, w)), argnums=(0, 1))(x, w)
    got = jax.jit(jax.value_and_grad(lambda x, w: outer(chunked(x, w)), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(got[0], expected[0], atol=TOL, rtol=TOL)
    for g, e in zip(got[1], expected[1]):
        np.testing.assert_allclose(g, e, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_through_hidden_states_matches_logits(tie):
    """return_hidden + head_weight + head_nll_sum (the train step's loss) == mean CE of the logits."""
    cfg = dataclasses.replace(TINY, tie_embeddings=tie)
    params = unbox(init_params(cfg, jax.random.key(0)))
    batch = jax.random.randint(jax.random.key(1), (3, 11), 0, cfg.vocab_size)
    model = Transformer(cfg)

    def plain(p):
        return jnp.mean(cross_entropy(model.apply({"params": p}, batch[:, :-1])[0], batch[:, 1:]))

    def chunked(p):
        hidden = model.apply({"params": p}, batch[:, :-1], return_hidden=True)[0]
        return head_nll_sum(hidden, head_weight(cfg, p), batch[:, 1:], 9) / batch[:, 1:].size

    expected, expected_grads = jax.jit(jax.value_and_grad(plain))(params)
    got, grads = jax.jit(jax.value_and_grad(chunked))(params)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(g, e, atol=TOL, rtol=1e-4)
