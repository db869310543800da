"""`token_bytes()` (research/tokenizer.py) for every tokenizer kind: a token's bytes are what it appends to the
decoded text, for real tiny tokenizers built offline (ours, and Hugging Face byte-level, Llama-2-style and
SentencePiece folders)."""

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from research import bpe, tokenizer
from research.sentencepiece_tokenizer import SentencePieceTokenizer
from tests.test_tokenizers import TRICKY, _fuzz_strings, _training_text

MULTIBYTE = ["é", "日本語", "🙂", "naïve café, 日本語 and 🙂!", "a🙂b日c"]
TEXTS = TRICKY + MULTIBYTE + _fuzz_strings(seed=7, count=100)
# Left alone by SentencePiece's default normalizer (NFKC, no repeated or outer spaces, no newlines).
NORMALIZED_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! Héllo wörld, naïve café.",
                    "numbers 12345 and symbols #@!?", "zebra ünïcode", *MULTIBYTE]
ADDED = ["<tool>", " hi there"]  # non-special added tokens: they append their content


@dataclass
class Case:
    tok: tokenizer.Tokenizer
    texts: list[str]  # decode(encode(text)) == text
    # What token_bytes hold before a text's own bytes when encode starts it with a dummy-prefix space that
    # decode drops (SentencePiece's add_dummy_prefix, Llama-2's Metaspace + Strip).
    lead: bytes = b""
    never: list[str] = field(default_factory=list)  # token strings that must map to None


def _hf_helpers():
    return pytest.importorskip("tests.test_hf_tokenizer")  # skips without transformers/tokenizers/jinja2


def _train_hf_sentencepiece(folder: Path, model_type: str) -> None:
    """A Llama-2-style tokenizer.model: SentencePiece defaults (dummy prefix, NFKC) with byte fallback, trained
    without CJK or emoji."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(_hf_helpers().TEXTS * 8), vocab_size=320,
                                   model_prefix=str(folder / "tokenizer"), model_type=model_type,
                                   byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')


def _set_decoder(folder: Path, decoder: dict | None) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    data["decoder"] = decoder
    (folder / "tokenizer.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def ours() -> dict[str, tokenizer.Tokenizer]:
    """Our three kinds; the training text has café, 東京 and 😀 but not 日本語 or 🙂 (byte fallback)."""
    text = _training_text(sentences=300)
    return {"bpe": bpe.BpeTokenizer.train(text, 400),
            **{kind: SentencePieceTokenizer.train(kind, text, 400)
               for kind in ("sentencepiece-bpe", "sentencepiece-unigram")}}


@pytest.fixture(scope="module")
def hf_byte_level_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_hf_tokenizer's GPT-2-style byte-level BPE, completed with the bytes its trainer never saw (real
    byte-level vocabularies hold all 256), plus non-special added tokens."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers

    folder = tmp_path_factory.mktemp("byte_level")
    _hf_helpers().save_tiny_tokenizer(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for char in sorted(set(pre_tokenizers.ByteLevel.alphabet()) - vocab.keys()):
        vocab[char] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens([AddedToken(content, special=False) for content in ADDED])
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer.json as transformers converts a Llama-2 tokenizer.model: BPE with byte fallback, Metaspace
    pre-tokenizer, decoder Replace("▁", " ") + ByteFallback + Fuse + Strip(left=1)."""
    transformers = pytest.importorskip("transformers")
    source, folder = tmp_path_factory.mktemp("llama_sp"), tmp_path_factory.mktemp("llama")
    _train_hf_sentencepiece(source, "bpe")
    transformers.LlamaTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf_sentencepiece")
    _train_hf_sentencepiece(folder, "unigram")
    return folder


CASES = ["bpe", "sentencepiece-bpe", "sentencepiece-unigram", "hf-byte-level", "hf-llama", "hf-sentencepiece"]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    if request.param in tokenizer.KINDS:
        return Case(request.getfixturevalue("ours")[request.param], TEXTS,
                    never=["<unk>"] if request.param != "bpe" else [])

    def load(fixture: str) -> tokenizer.Tokenizer:
        return tokenizer.load_tokenizer(request.getfixturevalue(fixture))

    if request.param == "hf-byte-level":
        return Case(load("hf_byte_level_dir"), TEXTS, never=_hf_helpers().SPECIALS)
    if request.param == "hf-llama":
        # A text that starts with a space gets no dummy prefix, and U+2581 comes back as a space.
        texts = [t for t in TEXTS if t and not t.startswith(" ") and "\u2581" not in t]
        return Case(load("hf_llama_dir"), texts, lead=b" ", never=["<unk>", "<s>", "</s>"])
    return Case(load("hf_sentencepiece_dir"), NORMALIZED_TEXTS, lead=b" ", never=["<unk>", "<s>", "</s>"])


def _join(token_bytes: list[bytes | None], ids: list[int]) -> bytes:
    return b"".join(token_bytes[i] for i in ids)


def test_a_text_is_its_tokens_bytes(case):
    """From the start of a document, up to the one documented dummy-prefix space decode drops."""
    token_bytes = case.tok.token_bytes()
    for text in case.texts:
        ids = case.tok.encode(text, add_bos=False)
        assert case.tok.decode(ids) == text
        assert _join(token_bytes, ids) == case.lead + text.encode()


def test_tokens_append_their_bytes_after_other_tokens(case):
    """The defining property, exactly: decode(start + ids) is decode(start) followed by the ids' bytes, for
    encoded texts and random id sequences (those whose bytes are whole UTF-8; decode replaces the rest)."""
    tok, token_bytes = case.tok, case.tok.token_bytes()
    start = tok.encode("x", add_bos=False)
    rng = random.Random(0)
    allowed = [i for i, b in enumerate(token_bytes) if b is not None]
    sequences = [tok.encode(text, add_bos=False) for text in TEXTS]
    sequences += [rng.choices(allowed, k=rng.randint(1, 6)) for _ in range(300)]
    checked = 0
    for ids in sequences:
        try:
            appended = _join(token_bytes, ids).decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tok.decode(start + ids) == tok.decode(start) + appended, ids
        checked += 1
    assert checked > len(TEXTS) + 50


def test_multibyte_characters_split_across_tokens(case):
    """Characters missing from training come as one token per byte (byte-level or byte fallback), so single
    tokens hold partial UTF-8 that only their sequence completes."""
    token_bytes = case.tok.token_bytes()
    for text in ["日本語", "🙂"]:
        pieces = [token_bytes[i] for i in case.tok.encode(text, add_bos=False)]
        assert b"".join(pieces).endswith(text.encode()) and len(pieces) >= len(text.encode())
        with pytest.raises(UnicodeDecodeError):
            pieces[-1].decode("utf-8")


def _token_id(tok: tokenizer.Tokenizer, text: str) -> int:
    """The id of a single-token string (SentencePiece pieces and tokenizer.json tokens alike)."""
    if getattr(tok, "_sp", None) is not None:
        return tok._sp.piece_to_id(text)
    return tok._tok.token_to_id(text)


def test_specials_are_none(case):
    token_bytes = case.tok.token_bytes()
    assert len(token_bytes) == case.tok.vocab_size
    assert token_bytes[case.tok.bos_id] is token_bytes[case.tok.eos_id] is token_bytes[case.tok.pad_id] is None
    for text in case.never:
        assert token_bytes[_token_id(case.tok, text)] is None, text


@pytest.mark.parametrize("kind", ["sentencepiece-bpe", "sentencepiece-unigram"])
def test_sentencepiece_pieces(ours, kind):
    """Byte-fallback pieces are their byte, U+2581 a space (the piece "▁" alone is b" "), control, unknown
    and unused pieces None, and ids past the model's pieces None."""
    from sentencepiece import sentencepiece_model_pb2

    tok = ours[kind]
    token_bytes = tok.token_bytes()
    assert token_bytes[:4] == [None] * 4  # pad, bos, eos, unk
    assert token_bytes[4:260] == [bytes([b]) for b in range(256)]
    assert token_bytes[tok._sp.piece_to_id("\u2581")] == b" "
    assert token_bytes[tok._sp.piece_to_id("\u2581the")] == b" the"
    model = sentencepiece_model_pb2.ModelProto.FromString(tok.model_proto)
    model.pieces[300].type = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    pieces = len(model.pieces)
    padded = SentencePieceTokenizer(kind, model.SerializeToString(), pieces + 7).token_bytes()
    assert padded[300] is None and padded[:300] == token_bytes[:300]
    assert len(padded) == pieces + 7 and padded[pieces:] == [None] * 7


def test_bpe_bytes_merges_and_padding(ours):
    tok = ours["bpe"]
    token_bytes = tok.token_bytes()
    assert token_bytes[:bpe.FIRST_MERGE_ID] == [None] * 3 + [bytes([b]) for b in range(256)]
    for k, (a, b) in enumerate(tok.merges):
        assert token_bytes[bpe.FIRST_MERGE_ID + k] == token_bytes[a] + token_bytes[b]
    padded = bpe.BpeTokenizer(tok.merges, tok.vocab_size + 5).token_bytes()
    assert len(padded) == tok.vocab_size + 5 and padded[-5:] == [None] * 5


def test_hf_byte_level_tokens(hf_byte_level_dir):
    """GPT-2's byte alphabet is inverted ("Ġ" is a space); non-special added tokens append their content."""
    tok = tokenizer.load_tokenizer(hf_byte_level_dir)
    token_bytes = tok.token_bytes()
    assert token_bytes[_token_id(tok, "Ġ")] == b" " and token_bytes[_token_id(tok, "Ċ")] == b"\n"
    for content in ADDED:
        token_id = _token_id(tok, content)
        assert token_bytes[token_id] == content.encode() and tok.decode([token_id]) == content


def test_hf_llama_tokens(hf_llama_dir):
    tok = tokenizer.load_tokenizer(hf_llama_dir)
    token_bytes = tok.token_bytes()
    assert token_bytes[_token_id(tok, "<0x41>")] == b"A" and token_bytes[_token_id(tok, "<0xE6>")] == b"\xe6"
    assert token_bytes[_token_id(tok, "\u2581")] == b" "
    assert tok.decode([_token_id(tok, "\u2581")]) == ""  # what the Strip decoder leaves at a text's start


def test_hf_metaspace_decoder(hf_llama_dir, tmp_path):
    """A lone Metaspace decoder (T5-style) has no byte fallback: a `<0xNN>` token decodes as that text."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_llama_dir / name).read_bytes())
    _set_decoder(tmp_path, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                            "split": True})
    tok = tokenizer.load_tokenizer(tmp_path)
    token_bytes = tok.token_bytes()
    byte_a, the = _token_id(tok, "<0x41>"), _token_id(tok, "\u2581the")
    assert token_bytes[byte_a] == b"<0x41>" and token_bytes[the] == b" the"
    start = tok.encode("x", add_bos=False)
    assert tok.decode(start + [the, byte_a]) == tok.decode(start) + " the<0x41>"
    assert tok.decode([the]) == "the"  # Metaspace drops the first token's U+2581


_REPLACE_A = {"type": "Replace", "pattern": {"String": "a"}, "content": "b"}
_REGEX_REPLACE = {"type": "Replace", "pattern": {"Regex": " +"}, "content": " "}


@pytest.mark.parametrize("decoder,name", [
    ({"type": "WordPiece", "prefix": "##", "cleanup": True}, "WordPiece"),
    (None, "None"),  # tokenizers then joins tokens with spaces
    ({"type": "Sequence", "decoders": [{"type": "Fuse"}, _REPLACE_A]}, r"Replace \(step 2 of a Sequence\)"),
    ({"type": "Sequence", "decoders": [_REGEX_REPLACE]}, "Replace"),
])
def test_unsupported_decoder_is_one_line(hf_byte_level_dir, tmp_path, decoder, name):
    for path in hf_byte_level_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    _set_decoder(tmp_path, decoder)
    tok = tokenizer.load_tokenizer(tmp_path)
    message = rf"^{re.escape(str(tmp_path))}/tokenizer\.json: token_bytes cannot map decoder {name} exactly \("
    with pytest.raises(ValueError, match=message + r"supported: [^\n]+\)$"):
        tok.token_bytes()


def test_constraints_compile_over_every_kind(case):
    """A pattern with multi-byte characters over each vocabulary: the tokenizer's own encoding of a match is
    a complete path, and random walks through the automaton (any allowed token, then the stop token where
    accepting) spell only matches, whatever the pieces (whole characters, partial UTF-8, byte fallback)."""
    from decoding.constraint import compile_regex

    pattern = "(日本|é|🙂)+ [0-9]{1,3}"
    tok, token_bytes = case.tok, case.tok.token_bytes()
    automaton = compile_regex(pattern, token_bytes, len(token_bytes), eos_id=tok.eos_id)
    start = tok.encode("x", add_bos=False)
    ids = tok.encode("x" + "日本é🙂 42", add_bos=False)
    if ids[:len(start)] == start:  # the text after "x" tokenised on its own (not merged across the boundary)
        assert automaton.check(ids[len(start):], [tok.eos_id]) == "complete"
    rng = np.random.default_rng(0)
    for _ in range(50):
        state, walk = 0, []
        while len(walk) < 40:
            allowed = np.flatnonzero(automaton.next_state[state][automaton.token_class] >= 0)
            if automaton.accepting[state] and (len(allowed) == 0 or rng.random() < 0.3):
                break
            walk.append(int(rng.choice(allowed)))
            state = int(automaton.next_state[state, automaton.token_class[walk[-1]]])
        if automaton.accepting[state]:
            assert re.fullmatch(pattern, _join(token_bytes, walk).decode("utf-8")), walk
            assert automaton.check([*walk, tok.eos_id], [tok.eos_id]) == "complete"
