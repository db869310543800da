"""The retrieval task (research/needles.py): token-exact placement, clean haystacks, scored answers only."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import get_config
from models.transformer import Transformer, head_weight
from research.config import RetrievalConfig, apply_overrides
from research.data import DataError, load_text, split_documents, train_val_split
from research.needles import Pieces, RetrievalDataset, edits, episode
from research.tokenizer import train_tokenizer
from research.train_step import lm_loss, split_batch


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    cache = ".cache"  # the embedded corpus and trained tokenizers are cached by content: shared with other tests
    train, val = train_val_split(split_documents(load_text("embedded", cache)[:1_500_000]), 0.05, 0)
    tokenizer = train_tokenizer("sentencepiece-bpe", "\n\n".join(train), 2048, cache)
    return Pieces(tokenizer, val, train)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
def test_needle_lands_at_the_sentence_boundary_nearest_its_depth(pieces, depth):
    rng = np.random.default_rng(int(depth * 100))
    for _ in range(5):
        ep = episode(pieces, rng, length=300, depth=depth)
        start, end = ep.needle
        fact = pieces.fact(ep.key, ep.value)
        assert np.array_equal(ep.tokens[start:end], fact)  # token-exact: the fact's own ids, unmerged
        assert np.array_equal(ep.tokens[-len(pieces.question(ep.key)):], pieces.question(ep.key))
        assert len(ep.tokens) == 300 and ep.haystack_tokens == 300 - len(fact) - len(pieces.question(ep.key))
        hay = np.concatenate([ep.tokens[:start], ep.tokens[end:-len(pieces.question(ep.key))]])
        # The boundaries a fact may take: the haystack's sentence starts and its end. The needle took the one
        # nearest to depth x H, so no boundary is nearer.
        starts, total = [0], 0
        while total < len(hay):
            match = next(i for i, sentence in enumerate(pieces.tokens)
                         if np.array_equal(hay[total:total + len(sentence)], sentence[:len(hay) - total]))
            total += len(pieces.tokens[match])
            starts.append(min(total, len(hay)))
        target = depth * len(hay)
        assert start in starts
        assert abs(start - target) <= min(abs(s - target) for s in starts)
    if depth == 0.0:
        assert start == 0
    if depth == 1.0:
        assert end == len(ep.tokens) - len(pieces.question(ep.key))


@pytest.mark.parametrize("kind", ["plain", "distractors", "lost_in_the_middle", "shuffled_paraphrase"])
def test_keys_and_values_occur_only_where_placed(pieces, kind):
    rng = np.random.default_rng(7)
    options = {"plain": {}, "distractors": {"distractors": 8}, "lost_in_the_middle": {"others": 19},
               "shuffled_paraphrase": {"shuffled": True, "template": "paraphrase"}}[kind]
    for length in (120, 600):
        for _ in range(4):
            ep = episode(pieces, rng, length=max(length, 450 if kind == "lost_in_the_middle" else 0), **options)
            text = words(pieces.tokenizer.decode(ep.tokens.tolist()))
            facts = [f for _, _, f in ep.spans]
            assert text.count(ep.value) == 1  # the needle's value, and the answer is the needle's
            assert text.count(ep.key) == sum(f.key == ep.key for f in facts) + 1  # ... and the question
            for f in facts:
                assert text.count(f.value) == 1
            assert len({f.value for f in facts}) == len(facts)
            assert np.array_equal(ep.answer, pieces.answer(ep.value)) and len(ep.answer) == 1
            kinds = [f.kind for f in facts]
            if kind == "distractors":
                assert kinds.count("near_miss") == 4 and kinds.count("stale") == 4
                needle_at = ep.needle[0]
                assert all(s < needle_at for s, _, f in ep.spans if f.kind == "stale")  # stale comes first
                assert all(f.key != ep.key for f in facts if f.kind == "near_miss")
            if kind == "lost_in_the_middle":
                assert kinds.count("other") == 19 and kinds.count("needle") == 1


def test_lost_in_the_middle_puts_the_gold_fact_at_its_index(pieces):
    rng = np.random.default_rng(3)
    for gold in (0, 4, 9):
        ep = episode(pieces, rng, length=200, others=9, gold_index=gold)
        assert [f.kind for _, _, f in ep.spans].index("needle") == gold


def test_near_miss_is_the_closest_free_key(pieces):
    rng = np.random.default_rng(0)
    ep = episode(pieces, rng, length=100, distractors=1)
    near = next(f for _, _, f in ep.spans if f.kind == "near_miss")
    assert edits(near.key, ep.key) == min(edits(k, ep.key) for k in pieces.keys if k != ep.key and k != near.key
                                          and k not in words(pieces.tokenizer.decode(ep.tokens.tolist()))
                                          or k == near.key)
    assert edits("kitten", "sitting") == 3 and edits("", "abc") == 3


def test_a_length_too_short_for_the_facts_is_one_line(pieces):
    with pytest.raises(DataError, match=r"^length=20: the facts and the question alone take \d+ tokens$"):
        episode(pieces, np.random.default_rng(0), length=20, distractors=4)


def test_training_rows_score_exactly_the_answers(pieces):
    data = RetrievalDataset(pieces, 128, 4, seed=0, mix=RetrievalConfig())
    batch = data.batch(3)
    assert batch.shape == (4, 129) and batch.dtype == np.int32
    assert np.array_equal(batch, data.batch(3))  # a pure function of (seed, step)
    ids = np.where(batch < 0, ~batch, batch)
    text_scored = 0
    for row_ids, row in zip(ids, batch):
        scored = np.flatnonzero(row[1:] >= 0) + 1
        for i in scored:  # each scored target is a value right after its question "... The code of K is"
            assert pieces.tokenizer.decode(row_ids[i - 1:i].tolist()).strip() == "is"
            assert pieces.tokenizer.decode(row_ids[i:i + 1].tolist()).strip() in pieces.values
        text_scored += len(scored)
    assert text_scored > 0


def test_masked_loss_is_the_mean_nll_of_the_scored_targets():
    cfg = get_config("smoke").model
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (2, 17)).astype(np.int32)
    scored = rng.random((2, 16)) < 0.3
    stored = ids.copy()
    stored[:, 1:] = np.where(scored, ids[:, 1:], ~ids[:, 1:])
    params = nn.meta.unbox(model.init(jax.random.key(0), ids[:, :-1])["params"])
    _, (nll, _) = lm_loss(model, params, jnp.asarray(stored), jax.random.key(1))
    hidden, _, _ = model.apply({"params": params}, ids[:, :-1], return_hidden=True)
    logits = np.asarray(hidden @ head_weight(cfg, params), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(nll), -picked[scored].mean(), rtol=2e-5)
    _, (plain, _) = lm_loss(model, params, jnp.asarray(ids), jax.random.key(1))  # LM data: every target
    np.testing.assert_allclose(float(plain), -picked.mean(), rtol=2e-5)
    inputs, targets, mask = split_batch(jnp.asarray(stored))
    assert np.array_equal(inputs, ids[:, :-1]) and np.array_equal(mask, scored)


def test_retrieval_config_is_validated_in_one_line():
    cfg = get_config("retrieval")
    assert cfg.data.task == "retrieval"
    with pytest.raises(Exception, match=r"^data\.retrieval\.distractor_rate=1\.5: expected 0 <= value <= 1$"):
        apply_overrides(cfg, ["data.retrieval.distractor_rate=1.5"])
    with pytest.raises(Exception, match=r"^data\.task='qa': expected one of"):
        apply_overrides(cfg, ["data.task=qa"])


def test_a_vocabulary_without_enough_one_token_words_is_refused_in_one_line(tmp_path):
    train, val = train_val_split(split_documents(load_text("embedded", ".cache")[:300_000]), 0.05, 0)
    small = train_tokenizer("bpe", "\n\n".join(train), 384, str(tmp_path))
    with pytest.raises(DataError, match=r"^the tokenizer has \d+ key and \d+ value words .* needs 32 of each "
                                        r"\(a larger vocabulary\)$"):
        Pieces(small, val, train)
