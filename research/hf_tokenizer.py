"""A Hugging Face tokenizer folder behind our `Tokenizer` interface (research/tokenizer.py), with chat templates.

The folder holds tokenizer.json (run by the `tokenizers` library) or tokenizer.model (SentencePiece),
plus tokenizer_config.json for the special tokens and the chat template (or chat_template.jinja).
`encode` matches transformers' `encode(text)` (add_special_tokens=True: the bos a Llama or Mistral
tokenizer puts first, never a trailing eos) and `encode(text, add_bos=False)` its add_special_tokens=False;
`decode` drops pad/bos/eos as our tokenizers do and, unlike transformers with
`clean_up_tokenization_spaces`, never edits spaces, so decode(encode(text)) == text wherever the tokenizer
itself is lossless. `apply_chat_template` renders
with the same Jinja settings as transformers (sandboxed, trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII).

`save` copies the Hugging Face files, so an exported checkpoint can ship them, and records the resolved
special ids in special_token_ids.json (Hugging Face tools ignore that file).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from research.hf_config import ConversionError

HF_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "chat_template.json", "added_tokens.json")
IDS_FILE = "special_token_ids.json"
# The named special tokens transformers hands to chat templates (bos_token, eos_token, ...).
SPECIAL_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def is_hf_tokenizer(directory: str | os.PathLike) -> bool:
    """True for a Hugging Face tokenizer folder: tokenizer.model, or a tokenizer.json that is not ours
    (ours name their `kind`)."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return "kind" not in json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    return (directory / "tokenizer.model").is_file()


def copy_hf_files(source: Path, destination: Path) -> list[str]:
    """Copies the Hugging Face tokenizer files present in `source`; returns their names."""
    copied = [name for name in HF_FILES if (Path(source) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(source) / name, Path(destination) / name)
    return copied


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def read_chat_template(directory: Path) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's (a string, or a list of
    named templates of which "default" is the one transformers uses without tools)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template")
    template = template or _read_json(directory / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character each byte is spelled with in ByteLevel tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_LEVEL_ALPHABET = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SUPPORTED_DECODERS = "ByteLevel, Metaspace, or a Sequence of Replace, ByteFallback, Fuse and a final Strip (Llama-2)"


def _byte_level_bytes(token: str) -> bytes:
    """What the ByteLevel decoder makes of a token: the bytes its characters spell, or, when a character is
    outside that alphabet (an added token such as " hi"), the token's own UTF-8."""
    if all(c in _BYTE_LEVEL_ALPHABET for c in token):
        return bytes(_BYTE_LEVEL_ALPHABET[c] for c in token)
    return token.encode("utf-8")


def _decoder_steps(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if decoder is not None and decoder["type"] == "Sequence":
        return [step for d in decoder["decoders"] for step in _decoder_steps(d)]
    return [decoder or {"type": "None"}]


def _token_bytes_function(decoder: dict[str, Any] | None, where: str) -> Callable[[str], bytes]:
    """The bytes tokenizer.json's `decoder` turns one token string into, in the middle of a text.

    SentencePiece-style chains are per token (Replace, Metaspace's replacement -> " ", ByteFallback's
    `<0xNN>` -> byte NN) up to Fuse; after it only a Strip of the text's first characters is allowed, which
    like Metaspace's rule for the first token only touches the start of a text. Anything else (no decoder,
    WordPiece, a Regex Replace, steps in another order) raises a one-line ConversionError (a ValueError)
    naming it, rather than guessing.
    """
    steps = _decoder_steps(decoder)
    if [step["type"] for step in steps] == ["ByteLevel"]:
        return _byte_level_bytes
    replacements: list[tuple[str, str]] = []
    byte_fallback = fused = False
    for n, step in enumerate(steps, 1):
        kind, per_token = step["type"], not (byte_fallback or fused)
        if kind == "Replace" and "String" in step["pattern"] and per_token:
            replacements.append((step["pattern"]["String"], step["content"]))
        elif kind == "Metaspace" and per_token:
            replacements.append((step["replacement"], " "))
        elif kind == "ByteFallback" and not fused:
            byte_fallback = True
        elif kind == "Fuse":
            fused = True
        elif not (kind == "Strip" and fused and step["stop"] == 0):
            name = kind if len(steps) == 1 else f"{kind} (step {n} of a Sequence)"
            raise ConversionError(f"{where}: token_bytes cannot map decoder {name} exactly (supported: "
                                  f"{_SUPPORTED_DECODERS})")

    def to_bytes(token: str) -> bytes:
        for pattern, content in replacements:
            token = token.replace(pattern, content)
        byte = _BYTE_FALLBACK.fullmatch(token) if byte_fallback else None
        return bytes([int(byte[1], 16)]) if byte else token.encode("utf-8")
    return to_bytes


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                         **kwargs: Any) -> str:
    """The chat as one string, as transformers' apply_chat_template(..., tokenize=False) renders it."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConversionError("chat templates need the `jinja2` package (pip install -e '.[interop]')") from None

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body unchanged."""
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    # Like transformers: keys whose value is None are dropped (templates test for presence).
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            tools=None, documents=None, **kwargs)


class HFTokenizer:
    kind = "huggingface"

    def __init__(self, directory: Path):
        """Reads a Hugging Face tokenizer folder; use `load`."""
        self.directory = directory
        config = _read_json(directory / "tokenizer_config.json")
        tokens_map = _read_json(directory / "special_tokens_map.json")
        if (directory / "tokenizer.json").is_file():
            try:
                from tokenizers import Tokenizer as Backend
            except ImportError:
                raise ConversionError(f"{directory}/tokenizer.json: reading it needs the `tokenizers` package "
                                      "(pip install -e '.[interop]')") from None
            try:
                self._tok: Any = Backend.from_file(str(directory / "tokenizer.json"))
            except Exception as err:  # the Rust library raises plain Exceptions
                raise ConversionError(f"{directory}/tokenizer.json: {err}") from None
            self._sp = None
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            to_id = self._tok.token_to_id
        else:
            import sentencepiece as spm

            self._tok = None
            self._sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
            self.vocab_size = self._sp.get_piece_size()

            def to_id(piece: str) -> int | None:  # SentencePiece answers unk for a piece it lacks
                i = self._sp.piece_to_id(piece)
                return i if self._sp.id_to_piece(i) == piece else None
        # The named special tokens, as text (what chat templates receive as bos_token, eos_token, ...).
        self.special_tokens = {}
        for name in SPECIAL_NAMES:
            text = _token_text(config.get(f"{name}_token", tokens_map.get(f"{name}_token")))
            if text is not None:
                self.special_tokens[f"{name}_token"] = text
        saved = _read_json(directory / IDS_FILE)
        model_config = _read_json(directory / "config.json")  # present when reading a model folder

        def resolve(name: str) -> int | None:
            if name in saved:
                return saved[name]
            text = self.special_tokens.get(f"{name}_token")
            found = to_id(text) if text is not None else None
            if found is None:
                found = model_config.get(f"{name}_token_id")
                found = found[0] if isinstance(found, list) else found
            return found

        eos = resolve("eos")
        if eos is None:
            raise ConversionError(f"{directory}: no eos token in tokenizer_config.json, special_tokens_map.json "
                                  "or config.json")
        self.eos_id = eos
        bos, pad = resolve("bos"), resolve("pad")
        self.bos_id = eos if bos is None else bos  # only used to start an empty prompt
        self._has_bos = bos is not None
        self.pad_id = eos if pad is None else pad  # padding is masked, so any valid id serves
        self.chat_template = read_chat_template(directory)
        # What transformers puts before a text with add_special_tokens=True (Llama's and Mistral's bos),
        # which their models expect at the start of a prompt: what `encode` adds by default.
        if self._tok is not None:
            full, plain = self._tok.encode("a", add_special_tokens=True).ids, self._encode_plain("a")
            self.prompt_prefix = full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []
        else:
            self.prompt_prefix = [self.bos_id] if config.get("add_bos_token", True) and bos is not None else []
        self.add_bos_default = bool(self.prompt_prefix)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HFTokenizer":
        directory = Path(directory)
        if not ((directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file()):
            raise ConversionError(f"{directory}: no tokenizer.json or tokenizer.model")
        return cls(directory)

    def _encode_plain(self, text: str) -> list[int]:
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def _prefix(self, add_bos: bool | None) -> list[int]:
        """None: `prompt_prefix` (transformers' add_special_tokens=True); True: that, or bos when the
        tokenizer adds nothing by itself; False: nothing."""
        if add_bos is None or (add_bos and self.prompt_prefix):
            return list(self.prompt_prefix)
        if not add_bos:
            return []
        if not self._has_bos:
            raise ConversionError(f"add_bos=True: the tokenizer in {self.directory} has no bos token")
        return [self.bos_id]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of `text` as transformers' `encode(text)` gives them (its bos first, if it adds one; never eos);
        `add_bos=False` is its add_special_tokens=False, `add_bos=True` asks for bos even where it adds none."""
        return self._prefix(add_bos) + self._encode_plain(text)

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        prefix = self._prefix(add_bos)
        if self._tok is not None:
            return [prefix + e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return [prefix + ids for ids in self._sp.encode(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, dropping pad/bos/eos (other special tokens, e.g. chat markers, are kept)."""
        ids = [int(i) for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id appends to a text (research/tokenizer.py). tokenizer.json: each token as its decoder
        makes bytes of it (`_token_bytes_function`); added tokens go through the decoder too, as in `decode`, so
        an ASCII or spaced one gives its content's UTF-8. Special added tokens, the model's unk and pad/bos/eos
        are None. tokenizer.model: research/sentencepiece_tokenizer.py `piece_bytes`."""
        if self._sp is not None:
            from research.sentencepiece_tokenizer import piece_bytes

            out, never = piece_bytes(self._sp, self.vocab_size), set()
        else:
            data = _read_json(self.directory / "tokenizer.json")
            to_bytes = _token_bytes_function(data.get("decoder"), f"{self.directory}/tokenizer.json")
            out = [None if (token := self._tok.id_to_token(i)) is None else to_bytes(token)
                   for i in range(self.vocab_size)]
            never = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
            never |= {self._unk_id(data["model"])} - {None}
        for i in never | {self.pad_id, self.bos_id, self.eos_id}:
            if i < self.vocab_size:  # config.json may name an id this tokenizer lacks
                out[i] = None
        return out

    def _unk_id(self, model: dict[str, Any]) -> int | None:
        """The unk of tokenizer.json's model: a token (BPE, WordPiece, WordLevel) or an id (Unigram)."""
        if model.get("unk_token") is not None:
            return self._tok.token_to_id(model["unk_token"])
        return model.get("unk_id")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """transformers' apply_chat_template: the rendered chat, or its ids (the template writes any bos)."""
        if self.chat_template is None:
            raise ConversionError(f"{self.directory}: the tokenizer has no chat template")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    **{**self.special_tokens, **kwargs})
        return self.encode(text, add_bos=False) if tokenize else text

    def save(self, directory: Path) -> None:
        """Copies the Hugging Face files and records the resolved special ids."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        copy_hf_files(self.directory, directory)
        ids = {"bos": self.bos_id if self._has_bos else None, "eos": self.eos_id, "pad": self.pad_id}
        (directory / IDS_FILE).write_text(json.dumps(ids, indent=2) + "\n")
