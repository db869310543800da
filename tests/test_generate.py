"""The jitted KV-cache generation loop: against full recompute, per-row independence, stopping,
sampling equivalences and reproducibility, logits processors with state, min_new_tokens, and the stop
and pad ids a tokenizer implies.

Tolerance: fp32 whole-model outputs agree to 1e-4 (tokens exactly). The test model's init scale is
raised so its next-token distributions are peaked and greedy choices are not near-ties.
"""

import types

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.beam_search import beam_search
from decoding.generate import _generate, check_prompt, generate, greedy_by_recompute
from decoding.steps import decode_step, prefill
from decoding.processors import BannedBigrams, RepetitionPenalty
from decoding.sampling import SamplerConfig, make_sampler
from models.config import ModelConfig
from models.linear import PACKED_MAX_ROWS
from models.transformer import Transformer, init_params, prepare_params, unbox

ATOL_MODEL = 1e-4
CFG = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                  max_seq_len=32, init_std=0.3)
PROMPTS = [[5, 9, 2, 7, 1, 3], [11, 4, 8]]
M = 8
# One sampling program serves every sampling and processor test: all filters and both processors are
# compiled in, and their values switch them off (no token is -1, a penalty of 1 changes nothing).
ALL_FILTERS = SamplerConfig(sample=True, top_k=True, top_p=True, min_p=True)
INERT = (RepetitionPenalty(np.ones(2, np.float32)), BannedBigrams(np.full((3, 2), -1, np.int32)))


def padded(prompts, width=6):
    out = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out, np.array([len(p) for p in prompts], np.int32)


@pytest.fixture(scope="module")
def params():
    return unbox(init_params(CFG, jax.random.key(0)))


@pytest.fixture(scope="module")
def greedy(params):
    prompt, lengths = padded(PROMPTS)
    return generate(params, CFG, prompt, lengths, max_new_tokens=M)


def sample(params, key, processors=INERT, **values):
    prompt, lengths = padded(PROMPTS)
    _, sampling = make_sampler(2, **values)
    return generate(params, CFG, prompt, lengths, key, max_new_tokens=M, sampler=ALL_FILTERS,
                    sampling=sampling, num_samples=2, processors=processors)


@pytest.mark.parametrize("rows", [1, 4, PACKED_MAX_ROWS + 1])  # packed weights (on CPU), or XLA's matmul
def test_decode_step_on_prepared_params_equals_the_plain_model(params, rows):
    prompt, lengths = padded([[5, 9, 2, 7, 1, 3]])
    cache, _ = prefill(params, CFG, prompt, lengths, 4, rows)
    tokens = jnp.arange(rows, dtype=jnp.int32) % CFG.vocab_size
    step = jax.jit(lambda p, t, c: decode_step(prepare_params(p, CFG, rows), CFG, t, c))
    logits, new_cache = step(params, tokens, cache)
    expected, expected_cache, _ = Transformer(CFG).apply({"params": params}, tokens[:, None], cache=cache)
    np.testing.assert_allclose(logits, expected[:, 0], atol=1e-5)
    for got, want in zip(jax.tree.leaves(new_cache), jax.tree.leaves(expected_cache)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_cached_decoding_equals_full_recompute(params, greedy):
    prompt, lengths = padded(PROMPTS)
    tokens, logprobs = greedy_by_recompute(params, CFG, prompt, lengths, max_new_tokens=M)
    np.testing.assert_array_equal(greedy.tokens[:, 0], tokens)
    np.testing.assert_allclose(greedy.logprobs[:, 0], logprobs, atol=ATOL_MODEL)
    np.testing.assert_allclose(greedy.scores[:, 0], logprobs.sum(-1), atol=ATOL_MODEL)
    assert greedy.tokens.shape == (2, 1, M) and np.all(greedy.lengths == M)


def test_ragged_batch_equals_each_prompt_alone(params, greedy):
    for row, prompt in enumerate(PROMPTS):
        alone = generate(params, CFG, np.array([prompt], np.int32), np.array([len(prompt)]), max_new_tokens=M)
        np.testing.assert_array_equal(alone.tokens[0], greedy.tokens[row])
        np.testing.assert_allclose(alone.logprobs[0], greedy.logprobs[row], atol=ATOL_MODEL)


def test_rows_stop_at_their_stop_tokens_and_pad_after(params, greedy):
    free = np.asarray(greedy.tokens[:, 0])
    stops = (int(free[0, 2]), int(free[1, 4]))  # row 0 stops at step 2 (unless earlier), row 1 at 4
    prompt, lengths = padded(PROMPTS)
    out = generate(params, CFG, prompt, lengths, max_new_tokens=M, stop_tokens=stops, pad_id=0)
    for row in range(2):
        first = min(i for i, t in enumerate(free[row]) if t in stops)
        assert int(out.lengths[row, 0]) == first + 1
        np.testing.assert_array_equal(out.tokens[row, 0, :first + 1], free[row, :first + 1])
        assert np.all(np.asarray(out.tokens[row, 0, first + 1:]) == 0)
        assert np.all(np.asarray(out.logprobs[row, 0, first + 1:]) == 0)


def test_temperature_to_zero_and_top_k_one_equal_greedy(params, greedy):
    expected = np.repeat(np.asarray(greedy.tokens), 2, axis=1)
    for values in (dict(temperature=0.0), dict(temperature=1e-4), dict(temperature=1.0, top_k=1)):
        out = sample(params, jax.random.key(3), **values)
        np.testing.assert_array_equal(out.tokens, expected, err_msg=str(values))


def test_same_seed_same_tokens_and_samples_differ(params):
    values = dict(temperature=[1.0, 0.8], top_k=[0, 20], top_p=[0.95, 1.0], min_p=[0.0, 0.05])
    a = sample(params, jax.random.key(7), **values)
    b = sample(params, jax.random.key(7), **values)
    c = sample(params, jax.random.key(8), **values)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens[:, 0], a.tokens[:, 1])  # two samples per prompt


def reference_with_processors(params, penalty, banned, stops=(), min_new_tokens=0):
    """Greedy by recompute with the processors' rules written out in NumPy, one step at a time (M tokens,
    not stopping; `stops` only get -inf before `min_new_tokens`)."""
    forward = jax.jit(lambda p, x: Transformer(CFG).apply({"params": p}, x)[0])
    out = []
    for prompt, pen in zip(PROMPTS, penalty):
        seq = list(prompt)
        for _ in range(M):
            buf = np.zeros((1, 6 + M), np.int32)
            buf[0, :len(seq)] = seq
            logits = np.array(forward(params, buf)[0, len(seq) - 1])
            seen = np.isin(np.arange(CFG.vocab_size), seq)
            logits = np.where(seen, np.where(logits > 0, logits / pen, logits * pen), logits)
            for a, b in banned:
                if seq[-1] == a:
                    logits[b] = -np.inf
            if len(seq) - len(prompt) < min_new_tokens:
                logits[list(stops)] = -np.inf
            seq.append(int(np.argmax(logits)))
        out.append(seq[len(prompt):])
    return np.array(out)


def test_stateful_processors_in_the_loop(params, greedy):
    free = np.asarray(greedy.tokens[:, 0])
    # Ban the bigrams greedy decoding produced (one spans the prompt boundary), and penalise row 0 only.
    banned = np.array([[PROMPTS[0][-1], free[0, 0]], [free[1, 1], free[1, 2]], [free[0, 3], free[0, 4]]], np.int32)
    penalty = np.array([3.0, 1.0], np.float32)
    processors = (RepetitionPenalty(penalty), BannedBigrams(banned))
    greedy_rows = sample(params, jax.random.key(0), processors, temperature=0.0)  # both samples greedy
    expected = reference_with_processors(params, penalty, banned)
    for n in range(2):
        np.testing.assert_array_equal(greedy_rows.tokens[:, n], expected)
    sampled = sample(params, jax.random.key(1), processors, temperature=2.0)
    for row, prompt_row in enumerate(PROMPTS):
        for n in range(2):
            seq = list(prompt_row) + list(np.asarray(sampled.tokens[row, n]))
            assert not {tuple(b) for b in banned.tolist()} & set(zip(seq[:-1], seq[1:]))


def test_prompt_longer_than_context_is_refused(params):
    with pytest.raises(ValueError, match=r"^prompt of 30 tokens \+ max_new_tokens=8 exceeds model.max_seq_len=32$"):
        generate(params, CFG, np.zeros((1, 30), np.int32), np.array([30]), max_new_tokens=8)
    with pytest.raises(ValueError, match=r"^prompt_lengths=\[7\]: expected 1 <= length <= 6"):
        generate(params, CFG, np.zeros((1, 6), np.int32), np.array([7]), max_new_tokens=8)
    check_prompt(CFG, 24, 8)  # exactly fits


def test_sampled_tokens_do_not_depend_on_the_threshold_method(params, greedy):
    prompt, lengths = padded(PROMPTS)
    _, sampling = make_sampler(2, temperature=[1.2, 0.0], top_k=[6, 3], top_p=[0.8, 0.5])  # row 1 greedy
    outs = [generate(params, CFG, prompt, lengths, jax.random.key(5), max_new_tokens=M, num_samples=3,
                     sampler=SamplerConfig(sample=True, top_k=True, top_p=True, method=method), sampling=sampling)
            for method in ("sort", "bisect")]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].tokens[1], np.repeat(greedy.tokens[1], 3, axis=0))
    assert not np.array_equal(outs[0].tokens[0, 0], outs[0].tokens[0, 1])  # row 0 does sample


def first_stop_length(tokens, stops):
    """The length of a continuation that stops at the first of `stops` in `tokens` (all of them if none)."""
    return next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))


def test_min_new_tokens_holds_the_stop_tokens_back(params, greedy):
    free = np.asarray(greedy.tokens[:, 0])
    stops = (int(free[0, 0]), int(free[1, 1]))  # without it, row 0 stops at once and row 1 after 2 tokens
    prompt, lengths = padded(PROMPTS)
    expected = reference_with_processors(params, np.ones(2, np.float32), [], stops=stops, min_new_tokens=3)
    out = generate(params, CFG, prompt, lengths, max_new_tokens=M, stop_tokens=stops, min_new_tokens=3)
    compiled = _generate._cache_size()
    for row in range(2):
        length = first_stop_length(expected[row], stops)
        assert int(out.lengths[row, 0]) == length >= 4
        np.testing.assert_array_equal(out.tokens[row, 0, :length], expected[row, :length])
    never = generate(params, CFG, prompt, lengths, max_new_tokens=M, stop_tokens=stops, min_new_tokens=M)
    assert np.all(never.lengths == M) and _generate._cache_size() == compiled  # a traced value


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_new_tokens=-1), "min_new_tokens=-1: expected an integer with 0 <= min_new_tokens <= max_new_tokens=8"),
    (dict(min_new_tokens=9), "min_new_tokens=9: expected an integer with 0 <= min_new_tokens <= max_new_tokens=8"),
    (dict(min_new_tokens=1.5), "min_new_tokens=1.5: expected an integer"),
    (dict(pad_id="0"), "pad_id='0': expected an integer token id"),
])
def test_bad_loop_arguments_fail_with_one_line(params, kwargs, message):
    prompt, lengths = padded(PROMPTS)
    for decode in (generate, beam_search):
        with pytest.raises(ValueError, match="^" + message) as err:
            decode(params, CFG, prompt, lengths, max_new_tokens=M, **kwargs)
        assert "\n" not in str(err.value)


def test_stop_and_pad_ids_default_to_the_tokenizers(params, greedy):
    free = np.asarray(greedy.tokens[:, 0])
    eos = int(free[0, 2])
    prompt, lengths = padded(PROMPTS)
    tokenizer = lambda eos_id, pad_id: types.SimpleNamespace(eos_id=eos_id, pad_id=pad_id)

    def check(stop, pad, **kwargs):
        out = generate(params, CFG, prompt, lengths, max_new_tokens=M, **kwargs)
        for row in range(2):
            length = first_stop_length(free[row], (stop,))
            assert int(out.lengths[row, 0]) == length, kwargs
            np.testing.assert_array_equal(out.tokens[row, 0, :length], free[row, :length])
            assert np.all(np.asarray(out.tokens[row, 0, length:]) == pad), kwargs

    assert first_stop_length(free[0], (eos,)) < M
    check(eos, 50, tokenizer=tokenizer(eos, 50))
    check(eos, eos, tokenizer=tokenizer(eos, None))  # no pad id: the stop token
    check(eos, eos, tokenizer=tokenizer(eos, -1))
    check(None, 0, tokenizer=tokenizer(None, None))
    check(eos, 7, tokenizer=tokenizer(eos, 50), pad_id=7)  # explicit arguments win
    check(None, 50, tokenizer=tokenizer(eos, 50), stop_tokens=())
    check(eos, eos, stop_tokens=(eos,))  # no tokenizer: pad with the first stop token
    check(None, 0)


PROBED = []  # (step, state [R]) from LastTokenProbe, in order


@flax.struct.dataclass
class LastTokenProbe:
    """A processor whose state is each row's last token, reported to the host at every step."""

    def init(self, prompt, prompt_lengths, vocab_size):
        return jnp.take_along_axis(prompt, (prompt_lengths - 1)[:, None], axis=1)[:, 0]

    def process(self, state, logits, step):
        jax.debug.callback(lambda t, s: PROBED.append((int(t), np.asarray(s))), step, state, ordered=True)
        return logits

    def update(self, state, tokens):
        return tokens


def test_finished_rows_keep_their_processor_states(params, greedy):
    """The pad id written after a row's stop token never reaches its processors' states."""
    free = np.asarray(greedy.tokens[:, 0])
    stops = (int(free[0, 2]), int(free[1, 4]))
    prompt, lengths = padded(PROMPTS)
    PROBED.clear()
    out = generate(params, CFG, prompt, lengths, max_new_tokens=M, stop_tokens=stops, pad_id=-1,
                   processors=(LastTokenProbe(),))
    ends = np.asarray(out.lengths[:, 0])
    assert ends.min() < ends.max() <= M and [t for t, _ in PROBED] == list(range(ends.max()))
    for step, state in PROBED:
        for row, prompt_row in enumerate(PROMPTS):
            last = out.tokens[row, 0, min(step, ends[row]) - 1] if step else prompt_row[-1]
            assert state[row] == last, (step, row)

