"""Beam search against brute-force enumeration on a tiny model and vocabulary, and against greedy.

With 40 beams over 5 tokens and 3 steps nothing is ever pruned (at most 16 live prefixes, at most 80
candidates = 2 x 40 kept), so the n-best must equal the exhaustive ranking. Scores agree to 1e-4 (fp32
whole-model tolerance), tokens exactly.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.beam_search import BeamConfig, beam_search, top_k_small
from decoding.generate import generate
from decoding.processors import BannedBigrams
from models.config import ModelConfig
from models.kv_cache import KVCache, share_slots
from models.transformer import Transformer, init_params, unbox

ATOL_MODEL = 1e-4
TINY = ModelConfig(vocab_size=5, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=16, max_seq_len=16,
                   init_std=0.5)
EOS, M = 4, 3
PROMPT = np.array([[1, 2, 3], [2, 0, 0]], np.int32)
LENGTHS = np.array([3, 1], np.int32)


@pytest.fixture(scope="module")
def tiny_params():
    return unbox(init_params(TINY, jax.random.key(3)))


FORWARD = jax.jit(lambda params, tokens: Transformer(TINY).apply({"params": params}, tokens)[0])


def brute_force(params, row, beam, banned=()):
    """Every continuation of prompt `row` (ending in EOS, or M tokens without), best first, scored by
    summed log-probs (after banning bigrams, renormalised) / lp(len)."""
    prompt = list(PROMPT[row, :LENGTHS[row]])
    seqs = [list(s) + [EOS] for n in range(M) for s in itertools.product(range(EOS), repeat=n)]
    seqs += [list(s) for s in itertools.product(range(EOS), repeat=M)]
    buf = np.zeros((len(seqs), PROMPT.shape[1] + M), np.int32)
    for i, s in enumerate(seqs):
        buf[i, :len(prompt) + len(s)] = prompt + s
    logits = np.array(FORWARD(params, buf), np.float64)
    ranked = []
    for i, s in enumerate(seqs):
        full, total = prompt + s, 0.0
        for j, token in enumerate(s):
            x = logits[i, len(prompt) + j - 1].copy()
            for a, b in banned:
                if full[len(prompt) + j - 1] == a:
                    x[b] = -np.inf
            total += x[token] - np.log(np.sum(np.exp(x - x.max()))) - x.max()
        if np.isfinite(total):
            ranked.append((float(total / beam.penalty(len(s))), s))
    return sorted(ranked, key=lambda r: -r[0])


@pytest.mark.parametrize("banned", [
    ((-1, 0), (-1, 0), (-1, 0)),  # no token is -1: nothing banned (the same program as the next case)
    ((3, 0), (0, 0), (2, 1)),  # a stateful processor whose state must follow the beams
])
def test_enough_beams_find_the_brute_force_n_best(tiny_params, banned):
    beam = BeamConfig(num_beams=40, num_return=5, length_penalty="gnmt", alpha=0.6)
    out = beam_search(tiny_params, TINY, PROMPT, LENGTHS, max_new_tokens=M, beam=beam,
                      processors=(BannedBigrams(np.array(banned, np.int32)),), stop_tokens=(EOS,))
    for row in range(2):
        expected = brute_force(tiny_params, row, beam, banned)[:5]
        got = [list(np.asarray(out.tokens[row, n, :out.lengths[row, n]])) for n in range(5)]
        assert got == [s for _, s in expected]
        np.testing.assert_allclose(out.scores[row], [score for score, _ in expected], atol=ATOL_MODEL)
        np.testing.assert_allclose(np.sum(out.logprobs[row], -1) / beam.penalty(out.lengths[row]),
                                   out.scores[row], atol=ATOL_MODEL)


@pytest.mark.parametrize("mode", ["heuristic", "eager"])
def test_early_stopping_returns_true_hypotheses_no_better_than_the_best(tiny_params, mode):
    beam = BeamConfig(num_beams=2, num_return=2, early_stopping=mode)
    out = beam_search(tiny_params, TINY, PROMPT, LENGTHS, max_new_tokens=M, beam=beam, stop_tokens=(EOS,))
    for row in range(2):
        exhaustive = {tuple(s): score for score, s in brute_force(tiny_params, row, beam)}
        got = [tuple(np.asarray(out.tokens[row, n, :out.lengths[row, n]])) for n in range(2)]
        np.testing.assert_allclose(out.scores[row], [exhaustive[g] for g in got], atol=ATOL_MODEL)
        assert out.scores[row, 0] >= out.scores[row, 1] and out.scores[row, 0] <= max(exhaustive.values()) + ATOL_MODEL


def test_one_beam_equals_greedy():
    cfg = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                      max_seq_len=32, init_std=0.3)  # the model and shapes of test_generate.py
    params = unbox(init_params(cfg, jax.random.key(0)))
    prompt = np.array([[5, 9, 2, 7, 1, 3], [11, 4, 8, 0, 0, 0]], np.int32)
    lengths = np.array([6, 3], np.int32)
    greedy = generate(params, cfg, prompt, lengths, max_new_tokens=8)
    out = beam_search(params, cfg, prompt, lengths, max_new_tokens=8,
                      beam=BeamConfig(num_beams=1, length_penalty="none"))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.scores, greedy.scores, atol=ATOL_MODEL)


def test_shared_slots_hold_the_same_sequences_as_gathered_caches():
    rng = np.random.default_rng(0)
    kv = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
    gathered = KVCache(k=kv(4, 6, 2, 3), v=kv(4, 6, 2, 3), lengths=jnp.full((4,), 2, jnp.int32))
    (shared,) = share_slots((gathered,))
    for parents in ([2, 2, 0, 1], [1, 0, 3, 3], [3, 3, 3, 0]):
        k_new, v_new = kv(4, 1, 2, 3), kv(4, 1, 2, 3)
        parents = jnp.asarray(parents)
        gathered = gathered.reorder(parents).append(k_new, v_new)
        shared = shared.reorder(parents).append(k_new, v_new)
        np.testing.assert_array_equal(shared.lengths, gathered.lengths)
        for got, want in zip(shared.sequence(), gathered.sequence()):
            np.testing.assert_array_equal(got[:, :5], want[:, :5])  # the 5 written slots of every row


@pytest.mark.parametrize("n, k", [(12, 4), (8000, 8)])
def test_top_k_small_matches_a_stable_sort(n, k):
    x = np.random.default_rng(n).normal(size=(3, n)).astype(np.float32)
    x[0] = np.round(x[0])  # many ties: the lower index goes first
    x[1, ::2] = -np.inf
    values, indices = jax.jit(top_k_small, static_argnums=1)(x, k)
    for row in range(3):
        order = np.argsort(-x[row], kind="stable")[:k]
        np.testing.assert_array_equal(indices[row], order)
        np.testing.assert_array_equal(values[row], x[row, order])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=0), "num_beams=0: expected a positive integer"),
    (dict(num_beams=2, num_return=3), "num_return=3: expected 1 <= num_return <= num_beams=2"),
    (dict(alpha=-0.5), "alpha=-0.5: expected >= 0"),
    (dict(length_penalty="linear"), "length_penalty='linear': expected one of none, power, gnmt"),
    (dict(early_stopping="never"), "early_stopping='never': expected one of eager, heuristic, exact"),
])
def test_bad_beam_arguments_fail_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match="^" + message) as err:
        BeamConfig(**kwargs)
    assert "\n" not in str(err.value)
