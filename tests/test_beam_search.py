"""Beam search against brute-force enumeration on a tiny model and vocabulary, against greedy, and with
`BeamConfig.huggingface` against transformers' own beam search on a tiny random Llama.

With 40 beams over 5 tokens and 3 steps nothing is ever pruned (at most 16 live prefixes, at most 80
candidates = 2 x 40 kept), so the n-best must equal the exhaustive ranking. Scores agree to 1e-4 (fp32
whole-model tolerance), tokens exactly. Candidate selection without a sort is checked against `lax.top_k`.
"""

import dataclasses
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.beam_search import BeamConfig, beam_search, select_top_k, top_k_small
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


def brute_force(params, row, beam, banned=(), min_new_tokens=0):
    """Every continuation of prompt `row` (ending in EOS, or M tokens without), best first, scored by
    summed log-probs (after banning bigrams and EOS before `min_new_tokens`, renormalised) / lp(len)."""
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
            if j < min_new_tokens:
                x[EOS] = -np.inf
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


def test_min_new_tokens_holds_the_stop_token_back(tiny_params):
    beam = BeamConfig(num_beams=40, num_return=5)
    out = beam_search(tiny_params, TINY, PROMPT, LENGTHS, max_new_tokens=M, beam=beam, stop_tokens=(EOS,),
                      min_new_tokens=2)
    assert len(brute_force(tiny_params, 0, beam)[0][1]) == 1  # without it, prompt 0's best is EOS at once
    for row in range(2):
        expected = brute_force(tiny_params, row, beam, min_new_tokens=2)[:5]
        got = [list(np.asarray(out.tokens[row, n, :out.lengths[row, n]])) for n in range(5)]
        assert got == [s for _, s in expected]
        np.testing.assert_allclose(out.scores[row], [score for score, _ in expected], atol=ATOL_MODEL)


def test_stop_and_pad_ids_default_to_the_tokenizers(tiny_params):
    beam = BeamConfig(num_beams=3, num_return=3)
    run = lambda **kwargs: beam_search(tiny_params, TINY, PROMPT, LENGTHS, max_new_tokens=M, beam=beam, **kwargs)
    out = run(tokenizer=types.SimpleNamespace(eos_id=EOS, pad_id=2))
    explicit = run(stop_tokens=(EOS,), pad_id=2)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(a, b)
    assert np.any(out.lengths < M)
    for row, n in itertools.product(range(2), range(3)):  # EOS ends each short hypothesis, pads follow
        length = int(out.lengths[row, n])
        assert (length == M or out.tokens[row, n, length - 1] == EOS) and np.all(out.tokens[row, n, length:] == 2)
    without_pad = run(tokenizer=types.SimpleNamespace(eos_id=EOS, pad_id=None))  # pads with the stop token
    np.testing.assert_array_equal(without_pad.tokens, np.where(out.tokens == 2, EOS, out.tokens))


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


@pytest.mark.parametrize("group,steps", [(4, ([2, 2, 0, 1], [1, 0, 3, 3], [3, 3, 3, 0])),
                                         (2, ([1, 1, 2, 3], [0, 0, 3, 2], [1, 0, 2, 2]))])  # 2 prompts x 2 beams
def test_shared_slots_hold_the_same_sequences_as_gathered_caches(group, steps):
    rng = np.random.default_rng(0)
    kv = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
    gathered = KVCache(k=kv(4, 6, 2, 3), v=kv(4, 6, 2, 3), lengths=jnp.full((4,), 2, jnp.int32))
    (shared,) = share_slots((gathered,), group)
    for parents in steps:
        k_new, v_new = kv(4, 1, 2, 3), kv(4, 1, 2, 3)
        parents = jnp.asarray(parents)
        gathered = gathered.reorder(parents).append(k_new, v_new)
        shared = shared.reorder(parents).append(k_new, v_new)
        np.testing.assert_array_equal(shared.lengths, gathered.lengths)
        for got, want in zip(shared.sequence(), gathered.sequence()):
            np.testing.assert_array_equal(got[:, :5], want[:, :5])  # the 5 written slots of every row


@pytest.mark.parametrize("n, k", [(12, 4), (12, 10), (8000, 8), (8000, 12)])  # pairwise ranks; chunks
def test_top_k_small_equals_lax_top_k(n, k):
    rng = np.random.default_rng(n + k)
    x = rng.normal(size=(4, n)).astype(np.float32)
    x[0] = np.round(x[0]) + 0.0  # many ties: the lower index goes first (+ 0.0: no -0.0 from rounding)
    x[1, ::2] = -np.inf
    x[2, 3:] = -np.inf  # fewer finite entries than k: the tied -infs go by index too, none repeated
    x[3] = np.where(np.arange(n) % 2, 0.0, -0.0) + (np.arange(n) % 5 == 0)  # +0.0 ranks above -0.0
    values, indices = jax.jit(top_k_small, static_argnums=1)(x, k)
    expected_values, expected_indices = jax.lax.top_k(x, k)  # the oracle
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(values, expected_values)
    for row in range(3):  # and what both promise: descending, ties by index (no signed zeros in these rows)
        np.testing.assert_array_equal(indices[row], np.argsort(-x[row], kind="stable")[:k])


def test_selections_give_the_same_beams(tiny_params):
    outs = [beam_search(tiny_params, TINY, PROMPT, LENGTHS, max_new_tokens=M, stop_tokens=(EOS,),
                        beam=BeamConfig(num_beams=3, num_return=3, selection=selection))
            for selection in ("sort", "chunked")]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_array_equal(a, b)
    assert select_top_k(jnp.zeros((1, 3)), 2, "auto")[1].tolist() == [[0, 1]]


# transformers' beam search on a tiny random Llama: settings as transformers names them, stop token 9, which
# this model emits within a few tokens on some beams (asserted below), so hypotheses finish at every length.
HF_SETTINGS = [  # (num_beams, length_penalty, early_stopping, num_return_sequences, eos_token_id, min_new_tokens)
    (3, 1.5, True, 3, 9, 0),
    (4, 0.5, "never", 3, 9, 0),
    (2, -0.5, False, 2, 9, 0),
    (3, 1.0, False, 3, 9, 3),
    (3, 1.0, True, 2, [9, 2], 0),
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from research.hf_checkpoint import load_params, read_hf_config
    from research.hf_config import model_config_from_hf

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    cfg = model_config_from_hf(read_hf_config(folder), "float32")
    return torch, model, cfg, load_params(folder, cfg)


@pytest.mark.parametrize("setting", HF_SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_huggingface_scoring_equals_transformers(tiny_llama, setting):
    torch, model, cfg, params = tiny_llama
    num_beams, length_penalty, early_stopping, num_return, eos, min_new = setting
    stops = eos if isinstance(eos, list) else [eos]
    prompts, max_new = [[3, 17, 9, 25, 4], [11, 6, 30]], 8
    beam = BeamConfig.huggingface(num_beams=num_beams, length_penalty=length_penalty,
                                  early_stopping=early_stopping, num_return_sequences=num_return)
    prompt = np.zeros((2, 5), np.int32)
    for i, p in enumerate(prompts):
        prompt[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    out = beam_search(params, cfg, prompt, lengths, max_new_tokens=max_new, beam=beam, stop_tokens=stops,
                      min_new_tokens=min_new)
    finished_early = False
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=num_beams,
                                 length_penalty=length_penalty, early_stopping=early_stopping,
                                 num_return_sequences=num_return, eos_token_id=eos, pad_token_id=stops[0],
                                 max_new_tokens=max_new, min_new_tokens=min_new, output_scores=True,
                                 return_dict_in_generate=True)
        for n, seq in enumerate(ref.sequences[:, len(p):].tolist()):
            length = next((j + 1 for j, t in enumerate(seq) if t in stops), len(seq))
            finished_early |= length < max_new
            assert np.asarray(out.tokens[i, n, :out.lengths[i, n]]).tolist() == seq[:length], (i, n)
        np.testing.assert_allclose(out.scores[i], ref.sequences_scores.numpy(), atol=ATOL_MODEL, rtol=0)
    assert finished_early or min_new  # the finishing rule was exercised
    if setting == HF_SETTINGS[1]:  # and t5x's rule, where any candidate may finish, would differ here
        t5x = beam_search(params, cfg, prompt, lengths, max_new_tokens=max_new, stop_tokens=stops,
                          beam=dataclasses.replace(beam, scoring="t5x"))
        assert not np.array_equal(t5x.tokens, out.tokens)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=0), "num_beams=0: expected a positive integer"),
    (dict(num_beams=2, num_return=3), "num_return=3: expected 1 <= num_return <= num_beams=2"),
    (dict(alpha=-0.5), "alpha=-0.5: expected >= 0"),
    (dict(length_penalty="linear"), "length_penalty='linear': expected one of none, power, gnmt"),
    (dict(early_stopping="never"), "early_stopping='never': expected one of eager, heuristic, exact"),
    (dict(scoring="fairseq"), "scoring='fairseq': expected one of t5x, huggingface"),
    (dict(selection="heap"), "selection='heap': expected one of auto, sort, chunked"),
    (dict(scoring="huggingface"), "length_penalty='gnmt', alpha=0.6: scoring='huggingface' expects"),
])
def test_bad_beam_arguments_fail_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match="^" + message) as err:
        BeamConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_huggingface_config_takes_transformers_names():
    assert BeamConfig.huggingface(num_beams=3, length_penalty=-1.0, early_stopping="never",
                                  num_return_sequences=2) == BeamConfig(
        num_beams=3, num_return=2, length_penalty="power", alpha=-1.0, early_stopping="exact", scoring="huggingface")
    assert [BeamConfig.huggingface(early_stopping=e).early_stopping for e in (True, False)] == ["eager", "heuristic"]
    with pytest.raises(ValueError, match=r"^early_stopping='always': expected True, False or 'never'$"):
        BeamConfig.huggingface(early_stopping="always")
