"""SentencePiece (BPE or unigram) tokenizers that round-trip any string exactly.

Id layout: 0 = pad, 1 = bos, 2 = eos, 3 = unk, then the 256 byte-fallback pieces, then learned
pieces. Exact round trips come from identity normalisation, no dummy prefix, keeping extra
whitespace, and byte fallback for characters outside the vocabulary (so unk never occurs).
Training reads the text line by line, so "\n" is never a learned piece: it is encoded as the byte
piece <0x0A>, one token either way.
"""

from collections.abc import Sequence
import io
import json
from pathlib import Path
import re

import sentencepiece as spm

from models.config import ConfigError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_NUM_FIXED_PIECES = 4 + 256  # Specials and byte-fallback pieces.
# Each character within the coverage also needs a piece, so the real minimum depends on the text;
# `train` reports it when it is not met.
MIN_VOCAB_SIZE = _NUM_FIXED_PIECES + 1
CHARACTER_COVERAGE = 0.9995
_MODEL_FILE = "sentencepiece.model"
# SentencePiece shows a space as U+2581 and decodes U+2581 back to a space, so a literal U+2581
# would come back as " ". It is encoded as its UTF-8 byte pieces instead.
_META_SPACE = "\u2581"


def piece_bytes(sp: spm.SentencePieceProcessor, vocab_size: int) -> list[bytes | None]:
    """`token_bytes` (research/tokenizer.py) of a SentencePiece model, padded with None up to `vocab_size`.

    A piece (user-defined ones too) appends its text with U+2581 as a space, so the piece "▁" alone is b" ";
    a byte-fallback piece `<0xNN>` the byte NN alone (a character may span several such pieces). Control
    (bos, eos, pad), unknown and unused pieces are None.

    Unlike here, `decode` drops the first piece's leading U+2581 when the model adds a dummy prefix or removes
    extra whitespace (Llama-2-style models; not ours), with the latter also that of each next piece while the
    text is still empty: there a text's first tokens decode without the space they append mid-text.
    """
    out: list[bytes | None] = [None] * vocab_size
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        piece = sp.id_to_piece(i)
        out[i] = (bytes([int(piece[3:5], 16)]) if sp.is_byte(i)  # "<0xNN>"
                  else piece.replace(_META_SPACE, " ").encode("utf-8"))
    return out


class SentencePieceTokenizer:
    """A trained SentencePiece model; `kind` is "sentencepiece-bpe" or "sentencepiece-unigram"."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    # Training text has no bos (research/data.py packs documents separated by eos alone), so neither
    # does a prompt unless asked for (research/tokenizer.py).
    add_bos_default = False

    def __init__(self, kind: str, model_proto: bytes, vocab_size: int):
        """`vocab_size` may exceed the model's pieces; the extra ids are never produced."""
        self.kind = kind
        self.model_proto = model_proto
        self.vocab_size = vocab_size
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._meta_space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META_SPACE.encode()]

    @classmethod
    def train(cls, kind: str, text: str, vocab_size: int) -> "SentencePieceTokenizer":
        """Trains a `kind` model; the same inputs give byte-identical models.

        One thread, because the learned pieces depend on the thread count. The model may hold
        fewer than `vocab_size` pieces when the text is small (`hard_vocab_limit=False`).
        """
        lines = [line for line in text.split("\n") if line]
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model,
                model_type=kind.removeprefix("sentencepiece-"),
                vocab_size=vocab_size,
                hard_vocab_limit=False,
                character_coverage=CHARACTER_COVERAGE,
                byte_fallback=True,
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                # Longer lines would be silently left out of training.
                max_sentence_length=max([4192] + [len(line.encode()) for line in lines]),
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
            if not needed:
                raise
            raise ConfigError(
                f"model.vocab_size={vocab_size}: expected >= {needed[1]} for "
                f"data.tokenizer={kind!r} on this text ({_NUM_FIXED_PIECES} fixed pieces + one per "
                f"character within coverage {CHARACTER_COVERAGE})") from None
        return cls(kind, model.getvalue(), vocab_size)

    def _bos(self, add_bos: bool | None) -> list[int]:
        return [BOS_ID] if (self.add_bos_default if add_bos is None else add_bos) else []

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of `text`, with bos first when `add_bos` (None: `add_bos_default`, no bos)."""
        if _META_SPACE not in text:
            return self._bos(add_bos) + self._sp.encode(text)
        parts = text.split(_META_SPACE)
        ids = self._bos(add_bos) + self._sp.encode(parts[0])
        for part in parts[1:]:
            ids += self._meta_space_ids + self._sp.encode(part)
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        if any(_META_SPACE in text for text in texts):
            return [self.encode(text, add_bos) for text in texts]
        bos = self._bos(add_bos)
        return [bos + ids for ids in self._sp.encode(list(texts))] if bos else self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Drops pad/bos/eos: SentencePiece decodes control pieces to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id appends to a text (research/tokenizer.py): see `piece_bytes`. Ours keep every
        space in decode (no dummy prefix), so these also hold for a text's first token."""
        return piece_bytes(self._sp, self.vocab_size)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _MODEL_FILE).write_bytes(self.model_proto)
        meta = {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "specials": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID},
            "model_file": _MODEL_FILE,
        }
        # research.tokenizer.load_tokenizer dispatches on this file's "kind".
        (directory / "tokenizer.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> "SentencePieceTokenizer":
        directory = Path(directory)
        meta = json.loads((directory / "tokenizer.json").read_text())
        model_proto = (directory / meta["model_file"]).read_bytes()
        return cls(meta["kind"], model_proto, meta["vocab_size"])
