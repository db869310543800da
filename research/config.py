"""Typed run configs: frozen dataclasses with validation, dotted overrides and (de)serialisation.

A run is fully described by one `TrainConfig`; named presets live in `configs/`. Any field can be
overridden as `section.field=value` (e.g. `model.d_model=512`, `optim.learning_rate=1e-3`, `steps=100`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

from models.config import ConfigError, ModelConfig, check, check_choice, check_finite

TOKENIZERS = ("bpe", "sentencepiece-bpe", "sentencepiece-unigram")


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """What the retrieval task's training episodes look like (`data.task=retrieval`, research/needles.py)."""
    min_length: int = 24  # shortest episode, in tokens
    max_facts: int = 4  # facts per episode (each asked about once)
    distractor_rate: float = 0.5  # share of episodes with 1-2 distractors (near-miss keys, stale values)
    paraphrase_rate: float = 0.5  # share of facts worded unlike the question

    def __post_init__(self) -> None:
        p = "data.retrieval."
        check_finite(self, p)
        check(self.min_length >= 8, p + "min_length", self.min_length, "expected an integer >= 8")
        check(self.max_facts >= 1, p + "max_facts", self.max_facts, "expected an integer >= 1")
        for name in ("distractor_rate", "paraphrase_rate"):
            check(0 <= getattr(self, name) <= 1, p + name, getattr(self, name), "expected 0 <= value <= 1")


TASKS = ("lm", "retrieval")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # "embedded", a text file, or a folder of text files
    tokenizer: str = "sentencepiece-bpe"  # vocabulary size is model.vocab_size
    seq_len: int = 128
    batch_size: int = 16  # global batch, in sequences
    val_fraction: float = 0.02
    split_seed: int = 0  # picks the validation documents; fixed across run seeds so their losses compare
    max_bytes: int = 0  # use only the first max_bytes of the text (0: all); keeps smoke runs fast
    cache_dir: str = ".cache"  # trained tokenizers and tokenized corpora
    task: str = "lm"  # lm: next-token prediction on the text; retrieval: needles in haystacks of it
    retrieval: RetrievalConfig = RetrievalConfig()

    def __post_init__(self) -> None:
        check_finite(self, "data.")
        check_choice("data.task", self.task, TASKS)
        check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        check(self.seq_len > 0, "data.seq_len", self.seq_len, "expected a positive integer")
        check(self.batch_size > 0, "data.batch_size", self.batch_size, "expected a positive integer")
        check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "expected 0 < value < 1")
        check(self.split_seed >= 0, "data.split_seed", self.split_seed, "expected an integer >= 0")
        check(self.max_bytes >= 0, "data.max_bytes", self.max_bytes, "expected 0 (all) or a positive byte count")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * learning_rate."""

    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables

    def __post_init__(self) -> None:
        check_finite(self, "optim.")
        check(self.learning_rate > 0, "optim.learning_rate", self.learning_rate, "expected > 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "expected >= 0")
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "expected 0 <= value <= 1")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "expected >= 0")
        check(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "expected 0 <= value < 1")
        check(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "expected 0 <= value < 1")
        check(self.eps > 0, "optim.eps", self.eps, "expected > 0")
        check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "expected >= 0 (0 disables)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over the axes (data, fsdp, tensor, expert); -1 takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self) -> None:
        sizes = dataclasses.asdict(self)
        for name, size in sizes.items():
            check(size == -1 or size >= 1, f"mesh.{name}", size, "expected a positive size or -1 (fill)")
        check(sum(s == -1 for s in sizes.values()) <= 1, "mesh", sizes, "at most one axis may be -1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "custom"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    steps: int = 500  # length of the run (sets the LR schedule)
    stop_after: int = 0  # stop early at this step without changing the schedule (0: run all steps)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    sample_prompt: str = "The "
    sample_tokens: int = 48  # greedy sample printed at the end (0: none)

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "eval_every", "eval_batches", "keep_checkpoints"):
            check(getattr(self, name) > 0, name, getattr(self, name), "expected a positive integer")
        for name in ("stop_after", "checkpoint_every", "sample_tokens", "seed"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "expected an integer >= 0")
        check(self.data.seq_len <= self.model.max_seq_len or self.model.position in ("rope", "none"),
              "data.seq_len", self.data.seq_len,
              f"longer than model.max_seq_len={self.model.max_seq_len} for {self.model.position} positions")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuilds a (nested) config dataclass; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        renamed = getattr(cls, "RENAMED_FIELDS", {}).get(unknown[0])
        hint = f" (renamed to {renamed!r})" if renamed else ""
        raise ConfigError(f"unknown config key {unknown[0]!r} for {cls.__name__}{hint}")
    kwargs = {}
    for key, value in data.items():
        kind = hints[key]
        kwargs[key] = from_dict(kind, value) if dataclasses.is_dataclass(kind) else value
    return cls(**kwargs)


def config_hash(cfg: Any) -> str:
    """Stable short hash of a resolved config, or of a JSON-able dict (keys runs in sweeps and caches)."""
    blob = json.dumps(cfg if isinstance(cfg, dict) else to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _parse(kind: type, key: str, raw: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if kind is int:
            value = float(raw)  # accepts 1e3; rejects 2.5 below
            if not value.is_integer():
                raise ValueError(raw)
            return int(value)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: expected a value of type {kind.__name__}") from None


def override(cfg: Any, key: str, raw: str, prefix: str = "") -> Any:
    """Returns cfg with the dotted field `key` set from the string `raw` (typed by the field)."""
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(type(cfg))
    full = prefix + head
    if head not in hints:
        allowed = ", ".join(prefix + f.name for f in dataclasses.fields(cfg))
        renamed = getattr(type(cfg), "RENAMED_FIELDS", {}).get(head)
        hint = f" ({prefix + head!r} was renamed to {prefix + renamed!r})" if renamed else ""
        raise ConfigError(f"unknown override key {prefix + key!r}: expected one of {allowed}{hint}")
    kind = hints[head]
    if dataclasses.is_dataclass(kind):
        if not rest:
            raise ConfigError(f"override key {full!r} names a section: set one of its fields, e.g. {full}.<field>=...")
        value = override(getattr(cfg, head), rest, raw, full + ".")
    else:
        if rest:
            raise ConfigError(f"unknown override key {prefix + key!r}: {full!r} has no sub-fields")
        value = _parse(kind, full, raw)
    return dataclasses.replace(cfg, **{head: value})


def apply_overrides(cfg: Any, assignments: list[str]) -> Any:
    """Applies `key=value` strings in order."""
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.d_model=512")
        cfg = override(cfg, key.strip(), raw.strip())
    return cfg
