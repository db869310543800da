"""Tests for research.tokenizer, research.bpe and research.sentencepiece_tokenizer."""

from collections import Counter
import random
import time

import pytest

from models.config import ConfigError
from research import bpe
from research import sentencepiece_tokenizer
from research import tokenizer
from research.data import DataError

VOCAB_SIZE = 512

TRICKY = [
    "",
    " ",
    "a",
    "hello world",
    "  leading and trailing  ",
    "\n\n",
    "para one\n\npara two\n",
    "\ttabs\tand\r\nCRLF\r\n",
    "multiple     spaces",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇯🇵",
    "CJK 日本語のテキスト 你好，世界",
    "Arabic مرحبا بالعالم and Hebrew שלום",
    "combining e\u0301 a\u0308 n\u0303\u0323",
    "U+2581 ▁ looks like SentencePiece's space ▁▁",
    "snake_case_name __dunder__ 3.14159 1,000,000",
    "zero width\u200bjoiner\u200d nbsp\u00a0 bom\ufeff",
    "\x00\x01\x7f control",
    "mixed: naïve café — “quotes” ‘single’ …",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛 and \U0010fffd",
]

# Surrogate-free code point ranges: ASCII, controls, 2-byte, rest of the BMP, astral planes.
_RANGES = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF),
           (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]


def _fuzz_strings(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    strings = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randrange(30)):
            lo, hi = rng.choice(_RANGES)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() < 0.8 else rng.choice(" \n\t"))
        strings.append("".join(chars))
    return strings


def _training_text(seed: int = 0, sentences: int = 1500) -> str:
    """About 60 KB of varied sentences with some Unicode, numbers and paragraph breaks."""
    rng = random.Random(seed)
    words = ("the a of and to in is was for on with as by at from that this it lower low newest "
             "widest river town people walked quickly slowly under over bright dark 12 2024 3.5 "
             "café naïve 東京 世界 مرحبا 😀 don't well-known e.g. (note) [x] {y}").split()
    parts = []
    for _ in range(sentences):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        parts.append(sentence.capitalize() + rng.choice([". ", "! ", "? ", ".\n", ".\n\n"]))
    return "".join(parts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tokenizer.Tokenizer]:
    cache_dir = tmp_path_factory.mktemp("cache")
    text = _training_text()
    return {kind: tokenizer.train_tokenizer(kind, text, VOCAB_SIZE, cache_dir)
            for kind in tokenizer.KINDS}


@pytest.mark.parametrize("kind", tokenizer.KINDS)
def test_round_trips_tricky_strings(trained, kind):
    tok = trained[kind]
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", tokenizer.KINDS)
def test_round_trips_random_code_points(trained, kind):
    tok = trained[kind]
    texts = _fuzz_strings(seed=1, count=300)
    batch = tok.encode_batch(texts)
    for text, ids in zip(texts, batch):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", tokenizer.KINDS)
def test_specials_are_distinct_and_dropped_by_decode(trained, kind):
    tok = trained[kind]
    specials = {tok.pad_id, tok.bos_id, tok.eos_id}
    assert len(specials) == 3 and max(specials) < tok.vocab_size
    ids = tok.encode("some text")
    assert not specials & set(ids)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "some text"


@pytest.mark.parametrize("kind", tokenizer.KINDS)
def test_encode_adds_bos_only_when_asked(trained, kind):
    """Our models are trained without bos (research/data.py), so by default encode adds none."""
    tok = trained[kind]
    assert tok.add_bos_default is False
    for text in ["some text", "", "U+2581 ▁ here"]:  # the last takes SentencePiece's meta-space path
        plain = tok.encode(text, add_bos=False)
        assert tok.encode(text) == plain and tok.bos_id not in plain
        assert tok.encode(text, add_bos=True) == [tok.bos_id, *plain]
        assert tok.decode(tok.encode(text, add_bos=True)) == text
    texts = ["one", "two ▁", ""]
    assert tok.encode_batch(texts, add_bos=True) == [[tok.bos_id, *tok.encode(t)] for t in texts]
    assert tok.encode_batch(texts) == tok.encode_batch(texts, add_bos=False) == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("kind", tokenizer.KINDS)
def test_compresses_training_text(trained, kind):
    text = _training_text(seed=5, sentences=100)
    assert len(trained[kind].encode(text)) < len(text.encode("utf-8")) / 2


def test_pretokenize_splits_words_digits_punctuation_and_whitespace():
    chunks = bpe.PRETOKENIZE.findall("Hello  world, it's 2024!\n\tfoo_bar")
    assert chunks == ["Hello", " ", " world", ",", " it", "'", "s", " 2024", "!", "\n", "\t", "foo",
                      "_", "bar"]


def _merges_as_bytes(merges: list[tuple[int, int]]) -> list[tuple[bytes, bytes]]:
    """Spells merges out using the documented id layout (bytes at 3..258, merges from 259)."""
    vocab = {b + 3: bytes([b]) for b in range(256)}
    spelled = []
    for k, (a, b) in enumerate(merges):
        spelled.append((vocab[a], vocab[b]))
        vocab[259 + k] = vocab[a] + vocab[b]
    return spelled


def test_train_bpe_hand_worked_word_counts():
    # Counts: es 9, st 9 -> (e, s) wins the tie as the smaller pair. Then (es, t) 9, (l, o) 7 beats
    # (o, w) 7, (lo, w) 7, then (n, e) (e, w) (w, est) all 6 -> (e, w) has the smallest ids; next
    # (n, ew) 6 < (ew, est) 6, (new, est) 6, then (d, est) (i, d) (w, i) all 3 -> (d, est), ...
    counts = {"low": 5, "lower": 2, "newest": 6, "widest": 3}
    assert _merges_as_bytes(bpe.train_bpe(counts, 10)) == [
        (b"e", b"s"), (b"es", b"t"), (b"l", b"o"), (b"lo", b"w"), (b"e", b"w"), (b"n", b"ew"),
        (b"new", b"est"), (b"d", b"est"), (b"i", b"dest"), (b"w", b"idest"),
    ]


def test_train_bpe_hand_worked_text_and_early_stop():
    # (a, a) 4 first, giving aa a b d aa a b a c; then (aa, a) 2 and (a, b) 2 tie and (a, b) has
    # the smaller ids; then (aa, ab) 2. After that every pair occurs once: (a, c), (d, aaab), ...
    merges = bpe.train_bpe("aaabdaaabac", 100)
    assert _merges_as_bytes(merges) == [
        (b"a", b"a"), (b"a", b"b"), (b"aa", b"ab"), (b"a", b"c"), (b"d", b"aaab"),
        (b"aaab", b"daaab"), (b"aaabdaaab", b"ac"),
    ]
    # Training stops once the text is a single token.
    assert bpe.BpeTokenizer(merges, 300).encode("aaabdaaabac") == [259 + 6]


def test_bpe_encoder_applies_merges_by_rank():
    merges = bpe.train_bpe({"low": 5, "lower": 2, "newest": 6, "widest": 3}, 10)
    tok = bpe.BpeTokenizer(merges, 300)
    assert tok.encode("newest") == [259 + 6]
    assert tok.encode("lowest") == [259 + 3, 259 + 1]  # low + est
    assert tok.encode(" low") == [3 + ord(" "), 259 + 3]


def _naive_train_bpe(counts: dict[str, int], num_merges: int) -> list[tuple[int, int]]:
    """Reference trainer: recounts every pair before each merge."""
    words = {tuple(b + 3 for b in w.encode("utf-8")): c for w, c in counts.items()}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new_id = 259 + len(merges)
        merges.append(best)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = count
        words = merged
    return merges


@pytest.mark.parametrize("seed", range(6))
def test_incremental_counts_match_full_recount(seed):
    rng = random.Random(seed)
    # A tiny alphabet makes many ties, repeats (aaaa) and overlapping pairs.
    text = "".join(rng.choice("aab  bc.é,1") for _ in range(3000))
    counts = dict(Counter(bpe.PRETOKENIZE.findall(text)))
    assert bpe.train_bpe(text, 80) == _naive_train_bpe(counts, 80)


@pytest.mark.parametrize("kind", tokenizer.KINDS)
def test_save_load_gives_identical_encodings(trained, kind, tmp_path):
    tok = trained[kind]
    tok.save(tmp_path / "saved")
    loaded = tokenizer.load_tokenizer(tmp_path / "saved")
    assert (loaded.kind, loaded.vocab_size) == (kind, tok.vocab_size)
    texts = TRICKY + [_training_text(seed=2, sentences=50)]
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)


def test_cache_reuses_directory(tmp_path, monkeypatch):
    text = _training_text(sentences=300)
    first = tokenizer.train_tokenizer("bpe", text, 400, tmp_path)
    entries = list((tmp_path / "tokenizers").iterdir())
    key = tokenizer.cache_key("bpe", 400, text)
    assert [e.name for e in entries] == [key[:16]]

    def fail(*args):
        raise AssertionError("trained again instead of loading from the cache")

    monkeypatch.setattr(bpe.BpeTokenizer, "train", fail)
    start = time.perf_counter()
    second = tokenizer.train_tokenizer("bpe", text, 400, tmp_path)
    assert time.perf_counter() - start < 1.0
    assert list((tmp_path / "tokenizers").iterdir()) == entries
    assert second.encode(text) == first.encode(text)


def test_cache_key_depends_on_every_input():
    keys = {tokenizer.cache_key("bpe", 400, "text"), tokenizer.cache_key("bpe", 401, "text"),
            tokenizer.cache_key("sentencepiece-bpe", 400, "text"),
            tokenizer.cache_key("bpe", 400, "text!")}
    assert len(keys) == 4


def test_cache_uses_the_winner_of_a_race(tmp_path, monkeypatch):
    text = _training_text(sentences=200)
    real_train = bpe.BpeTokenizer.train

    def racing_train(text, vocab_size):
        # Another process finishes first while this one is still training.
        monkeypatch.setattr(bpe.BpeTokenizer, "train", real_train)
        tokenizer.train_tokenizer("bpe", text, vocab_size, tmp_path)
        return real_train(text, vocab_size)

    monkeypatch.setattr(bpe.BpeTokenizer, "train", racing_train)
    tok = tokenizer.train_tokenizer("bpe", text, 300, tmp_path)
    assert tok.decode(tok.encode(text)) == text
    entries = list((tmp_path / "tokenizers").iterdir())
    assert [e.name for e in entries] == [tokenizer.cache_key("bpe", 300, text)[:16]]


@pytest.mark.parametrize("kind", ["sentencepiece-bpe", "sentencepiece-unigram"])
def test_sentencepiece_training_is_deterministic(kind):
    text = _training_text(sentences=300)
    first = sentencepiece_tokenizer.SentencePieceTokenizer.train(kind, text, 400)
    second = sentencepiece_tokenizer.SentencePieceTokenizer.train(kind, text, 400)
    assert first.model_proto == second.model_proto


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.tokenizer='wordpiece': expected one of bpe, "
                                          r"sentencepiece-bpe, sentencepiece-unigram$"):
        tokenizer.train_tokenizer("wordpiece", "text", 1000, tmp_path)


def test_a_bad_saved_tokenizer_is_a_data_error(tmp_path):
    """A tokenizer folder that cannot be read is bad data on disk, not a config value."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no tokenizer.json or tokenizer.model \(expected a saved tokenizer\)$"):
        tokenizer.load_tokenizer(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "tokenizer.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(DataError, match=r"odd: unknown tokenizer kind 'wordpiece'$"):
        tokenizer.load_tokenizer(tmp_path / "odd")


@pytest.mark.parametrize("kind,minimum", [("bpe", 259), ("sentencepiece-bpe", 261),
                                          ("sentencepiece-unigram", 261)])
def test_too_small_vocab_is_rejected(tmp_path, kind, minimum):
    with pytest.raises(ValueError, match=rf"^model\.vocab_size=100: expected an integer >= "
                                         rf"{minimum} for data\.tokenizer='{kind}'$"):
        tokenizer.train_tokenizer(kind, "text", 100, tmp_path)
    assert not (tmp_path / "tokenizers").exists()


def test_sentencepiece_reports_vocab_too_small_for_the_text(tmp_path):
    # 200 distinct frequent CJK characters each need a piece, beyond the 260 fixed ones.
    text = "\n".join("".join(chr(0x4E00 + (i * 7 + j) % 200) for j in range(40))
                     for i in range(200))
    with pytest.raises(ValueError, match=r"^model\.vocab_size=300: expected >= 4\d\d for "
                                         r"data\.tokenizer='sentencepiece-bpe' on this text"):
        tokenizer.train_tokenizer("sentencepiece-bpe", text, 300, tmp_path)
