"""Sampling filters against NumPy references, sampling frequencies against the filtered distribution, and
the bisection thresholds (no sort) against the sort, their oracle.

Masks are compared exactly: test values sit away from floating-point boundaries except deliberate ties,
which are exact (equal logits).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.sampling import (SamplerConfig, SamplingParams, backend_default, choose_tokens, filter_logits,
                               make_sampler, min_p_mask, top_k_mask, top_p_mask)

NEG_INF = -np.inf
# chi-square critical values at significance 0.001, by degrees of freedom (standard tables).
CHI2_CRITICAL_0_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - np.max(x))
    return e / e.sum()


def np_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.size:
        return np.ones(logits.shape, bool)
    return logits >= np.sort(logits)[::-1][k - 1]


def np_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    if p >= 1:
        return np.ones(logits.shape, bool)
    probs = np_softmax(logits)
    return np.array([probs[logits > x].sum() < p for x in logits])


def np_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    probs = np_softmax(logits)
    return probs >= min_p * probs.max()


def np_filtered_probs(logits: np.ndarray, t: float, k: int, p: float, m: float) -> np.ndarray:
    """The documented order: temperature, top-k, top-p on the renormalised rest, min-p."""
    x = logits / t
    x = np.where(np_top_k(x, k), x, NEG_INF)
    x = np.where(np_top_p(x, p), x, NEG_INF)
    x = np.where(np_min_p(x, m), x, NEG_INF)
    return np_softmax(x)


TIES = np.array([2.0, 1.0, 1.0, 1.0, 0.0, -1.0, 1.0, NEG_INF], np.float32)
RANDOM = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32) * 2
ROWS = np.concatenate([TIES[None], TIES[None], RANDOM])


@pytest.fixture(scope="module", params=["sort", "bisect"])
def masks(request):
    method = request.param
    return jax.jit(lambda x, k, p, m: (top_k_mask(x, k, method), top_p_mask(x, p, method), min_p_mask(x, m)))


@pytest.mark.parametrize("k", [0, 1, 2, 4, 5, 8, 9])  # 2 and 4 fall inside the tie at 1.0; 8 = V, 9 > V
def test_top_k_matches_numpy(masks, k):
    got = np.asarray(masks(ROWS, np.full(5, k, np.int32), np.ones(5, np.float32), np.zeros(5, np.float32))[0])
    for row, logits in zip(got, ROWS):
        np.testing.assert_array_equal(row, np_top_k(logits, k))
    if k == 1:
        assert got[0].sum() == 1 and got[0, 0]  # the unique maximum


@pytest.mark.parametrize("p", [1e-3, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_numpy(masks, p):
    got = np.asarray(masks(ROWS, np.zeros(5, np.int32), np.full(5, p, np.float32), np.zeros(5, np.float32))[1])
    for row, logits in zip(got, ROWS):
        np.testing.assert_array_equal(row, np_top_p(logits, p))
        assert row[np.argmax(logits)]  # at least the most probable token
    if p == 0.3:  # the maximum alone has probability 0.376
        assert got[0].sum() == 1
    if p == 0.5:  # the max plus one tied 1.0 would reach p; the whole tie at 1.0 is kept
        np.testing.assert_array_equal(got[0], [True, True, True, True, False, False, True, False])
    if p == 1.0:
        assert got.all()


@pytest.mark.parametrize("m", [0.0, 0.1, 0.35, 1.0])
def test_min_p_matches_numpy(masks, m):
    got = np.asarray(masks(ROWS, np.zeros(5, np.int32), np.ones(5, np.float32), np.full(5, m, np.float32))[2])
    for row, logits in zip(got, ROWS):
        np.testing.assert_array_equal(row, np_min_p(logits, m))


def test_filters_combine_in_the_documented_order():
    config = SamplerConfig(sample=True, top_k=True, top_p=True, min_p=True)
    t, k, p, m = [0.7, 1.5, 1.0], [5, 3, 8], [0.8, 0.95, 0.6], [0.05, 0.2, 0.0]
    _, params = make_sampler(3, temperature=t, top_k=k, top_p=p, min_p=m)
    got = np.asarray(jax.nn.softmax(jax.jit(filter_logits, static_argnums=0)(config, params, RANDOM)))
    for i in range(3):
        np.testing.assert_allclose(got[i], np_filtered_probs(RANDOM[i], t[i], k[i], p[i], m[i]), atol=1e-6)


def test_sampling_frequencies_match_the_filtered_distribution():
    """Chi-square over 20,000 draws per setting, fixed seed; excluded tokens must never appear."""
    settings = [(1.0, 0, 1.0, 0.0), (0.8, 4, 1.0, 0.0), (1.3, 0, 0.7, 0.0), (1.0, 6, 0.9, 0.1)]
    draws = 20_000
    logits = np.repeat(RANDOM[:1], len(settings) * draws, axis=0)
    t, k, p, m = (np.repeat(np.array(v), draws) for v in zip(*settings))
    params = SamplingParams(temperature=jnp.asarray(t, jnp.float32), top_k=jnp.asarray(k, jnp.int32),
                            top_p=jnp.asarray(p, jnp.float32), min_p=jnp.asarray(m, jnp.float32))
    config = SamplerConfig(sample=True, top_k=True, top_p=True, min_p=True)
    tokens = np.asarray(jax.jit(choose_tokens, static_argnums=0)(config, params, logits, jax.random.key(0)))
    for i, setting in enumerate(settings):
        expected = np_filtered_probs(RANDOM[0], *setting)
        counts = np.bincount(tokens[i * draws:(i + 1) * draws], minlength=8)
        assert np.all(counts[expected == 0] == 0), (setting, counts)
        kept = expected > 0
        chi2 = np.sum((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept]))
        assert chi2 < CHI2_CRITICAL_0_001[int(kept.sum()) - 1], (setting, chi2, counts, expected)


def random_rows_with_ties(rows: int = 48, vocab: int = 40) -> np.ndarray:
    """Random logits; every third row rounded (runs of exact ties), every fourth with -inf entries, one row
    all ties, one with a +0.0 / -0.0 tie at the top."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(rows, vocab)) * 3).astype(np.float32)
    x[::3] = np.round(x[::3])
    x[1::4, ::3] = NEG_INF
    x[2] = 0.5
    x[5] = np.where(np.arange(vocab) % 2, 0.0, -0.0) - 5.0 * (np.arange(vocab) > 3)
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_bisection_thresholds_equal_the_sorted_ones(seed):
    """The bisection (no sort) against the sort, over random logits with exact ties and edge values of k
    and p: k = 0, 1, inside a run of ties, V - 1, V, > V; p tiny, 1 - tiny, 1, and random."""
    x = random_rows_with_ties()
    rows, vocab = x.shape
    rng = np.random.default_rng(seed)
    k = rng.choice(np.array([0, 1, 2, 3, vocab - 1, vocab, vocab + 5, *rng.integers(1, vocab, 8)]), rows)
    p = rng.choice(np.array([1e-7, 1e-3, 0.999999, 1.0, *rng.uniform(0.01, 0.99, 8)], np.float32), rows)
    masks = jax.jit(lambda x, k, p, method: (top_k_mask(x, k, method), top_p_mask(x, p, method)),
                    static_argnums=3)
    by_sort = [np.asarray(m) for m in masks(x, k.astype(np.int32), p, "sort")]
    by_bisection = [np.asarray(m) for m in masks(x, k.astype(np.int32), p, "bisect")]
    np.testing.assert_array_equal(by_bisection[0], by_sort[0])
    np.testing.assert_array_equal(by_bisection[1], by_sort[1])
    for row in range(rows):  # and the sort against the documented definitions
        np.testing.assert_array_equal(by_sort[0][row], np_top_k(x[row], k[row]))
        np.testing.assert_array_equal(by_sort[1][row], np_top_p(x[row], p[row]))
    assert by_sort[1].any(-1).all() and by_sort[0].any(-1).all()  # at least one token everywhere


@pytest.mark.parametrize("method", ["sort", "bisect"])
def test_sampled_tokens_do_not_depend_on_the_method(method):
    """The same uniform numbers pick the same tokens whichever way the thresholds are found."""
    x = random_rows_with_ties()
    rows = x.shape[0]
    rng = np.random.default_rng(2)
    params = SamplingParams(temperature=jnp.asarray(rng.uniform(0.5, 2.0, rows), jnp.float32),
                            top_k=jnp.asarray(rng.integers(0, 12, rows), jnp.int32),
                            top_p=jnp.asarray(rng.uniform(0.3, 1.0, rows), jnp.float32),
                            min_p=jnp.zeros((rows,), jnp.float32))
    choose = jax.jit(choose_tokens, static_argnums=0)
    config = SamplerConfig(sample=True, top_k=True, top_p=True)
    for seed in range(3):
        expected = choose(config, params, x, jax.random.key(seed))  # "auto": bisection on CPU
        got = choose(dataclasses.replace(config, method=method), params, x, jax.random.key(seed))
        np.testing.assert_array_equal(got, expected)


def test_auto_resolves_by_backend(monkeypatch):
    assert backend_default("auto", "bisect", "sort") == ("bisect" if jax.default_backend() == "cpu" else "sort")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert backend_default("auto", "bisect", "sort") == "sort"
    assert backend_default("bisect", "bisect", "sort") == "bisect"


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="quickselect"), "method='quickselect': expected one of auto, sort, bisect"),
    (dict(top_p=0.0), "top_p=0.0: expected 0 < top_p <= 1"),
    (dict(top_p=1.5), "top_p=1.5: expected 0 < top_p <= 1"),
    (dict(temperature=-0.5), "temperature=-0.5: expected >= 0"),
    (dict(top_k=[1, -2]), "top_k=-2: expected >= 0"),
    (dict(min_p=2.0), "min_p=2.0: expected 0 <= min_p <= 1"),
    (dict(top_k=[1, 2, 3]), "top_k: expected a scalar or 2 values"),
    (dict(strategy="nucleus"), "strategy='nucleus': expected one of greedy, sample"),
])
def test_bad_sampling_arguments_fail_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as err:
        make_sampler(2, **kwargs)
    assert "\n" not in str(err.value)
