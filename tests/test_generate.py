"""The jitted KV-cache generation loop against recomputing the whole sequence each step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.generate import check_prompt, generate
from models.config import ModelConfig
from models.transformer import Transformer, init_params, unbox

CFG = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                  max_seq_len=32)


def greedy_by_recompute(params, prompt, steps):
    forward = jax.jit(lambda p, t: Transformer(CFG).apply({"params": p}, t)[0])
    seq = list(prompt)
    for _ in range(steps):
        logits = forward(params, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


def test_greedy_ragged_batch_matches_recompute_per_row():
    params = unbox(init_params(CFG, jax.random.key(0)))
    prompts = [[5, 9, 2, 7, 1, 3], [11, 4, 8]]
    padded = np.zeros((2, 6), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    tokens, lengths = generate(params, CFG, padded, np.array([6, 3], np.int32), jax.random.key(0),
                               max_new_tokens=8)
    assert tokens.shape == (2, 8) and list(np.asarray(lengths)) == [8, 8]
    for row, prompt in enumerate(prompts):
        assert list(np.asarray(tokens[row])) == greedy_by_recompute(params, prompt, 8)


def test_stops_at_eos_and_pads_after():
    params = unbox(init_params(CFG, jax.random.key(1)))
    prompt = np.array([[3, 1, 4]], np.int32)
    free, _ = generate(params, CFG, prompt, np.array([3]), jax.random.key(0), max_new_tokens=6)
    eos = int(free[0, 2])  # make the third generated token the stop token
    tokens, lengths = generate(params, CFG, prompt, np.array([3]), jax.random.key(0), max_new_tokens=6,
                               eos_id=eos, pad_id=0)
    first = list(np.asarray(free[0])).index(eos)
    assert int(lengths[0]) == first + 1
    assert list(np.asarray(tokens[0, :first + 1])) == list(np.asarray(free[0, :first + 1]))
    assert np.all(np.asarray(tokens[0, first + 1:]) == 0)


def test_sampling_is_reproducible_from_the_key():
    params = unbox(init_params(CFG, jax.random.key(2)))
    prompt, length = np.array([[1, 2, 3]], np.int32), np.array([3])
    a, _ = generate(params, CFG, prompt, length, jax.random.key(7), max_new_tokens=10, temperature=1.0)
    b, _ = generate(params, CFG, prompt, length, jax.random.key(7), max_new_tokens=10, temperature=1.0)
    c, _ = generate(params, CFG, prompt, length, jax.random.key(8), max_new_tokens=10, temperature=1.0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_prompt_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="prompt of 30 tokens \\+ max_new_tokens=8 exceeds model.max_seq_len=32"):
        check_prompt(CFG, 30, 8)
