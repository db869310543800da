"""Metric helpers against NumPy."""

import numpy as np

from research.flops import matmul_params, train_flops_per_token
from research.metrics import cosine_similarity, cross_entropy, kl_divergence, perplexity
from configs import get_config


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(3, 7)).astype(np.float32), rng.normal(size=(3, 7)).astype(np.float32)
    pp, qq = softmax(p.astype(np.float64)), softmax(q.astype(np.float64))
    np.testing.assert_allclose(kl_divergence(p, q), (pp * np.log(pp / qq)).sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl_divergence(p, p), 0.0, atol=1e-6)
    targets = np.array([0, 3, 6])
    np.testing.assert_allclose(cross_entropy(p, targets), -np.log(pp[np.arange(3), targets]), rtol=1e-5)
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    ref = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(cosine_similarity(a, b), ref, rtol=1e-5, atol=1e-6)
    assert abs(perplexity(float(np.log(17.0))) - 17.0) < 1e-9


def test_train_flops_follow_palm_formula():
    m = get_config("tiny").model
    # 6N per token with N the matmul weights (attention, MLP, LM head) + 12 L heads head_dim T.
    attn = 2 * m.d_model * m.num_heads * m.resolved_head_dim + 2 * m.d_model * m.num_kv_heads * m.resolved_head_dim
    n = m.num_layers * (attn + 3 * m.d_model * m.d_ff) + m.vocab_size * m.d_model
    assert matmul_params(m) == n
    assert train_flops_per_token(m, 128) == 6 * n + 12 * m.num_layers * m.num_heads * m.resolved_head_dim * 128
