"""Model and training presets, from test-sized to accelerator-sized.

  smoke      seconds on CPU; used by the tests
  tiny       the quick start: trains on 2 CPU cores in a few minutes and prints a sample
  bench-512  d_model 512, the CPU benchmark shape for MFU
  llama-100m ~100M parameters (Llama-style GQA), for accelerators
"""

from __future__ import annotations

from typing import Callable

from models.config import ConfigError, ModelConfig
from research.config import DataConfig, OptimConfig, TrainConfig


def smoke() -> TrainConfig:
    return TrainConfig(
        name="smoke",
        model=ModelConfig(vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          d_ff=64, max_seq_len=64),
        data=DataConfig(tokenizer="bpe", seq_len=32, batch_size=8, max_bytes=200_000),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=5),
        steps=20, log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10, sample_tokens=8)


def tiny() -> TrainConfig:
    return TrainConfig(
        name="tiny",
        model=ModelConfig(vocab_size=2048, d_model=192, num_layers=4, num_heads=6, num_kv_heads=2,
                          d_ff=512, max_seq_len=256),
        data=DataConfig(tokenizer="sentencepiece-bpe", seq_len=128, batch_size=16),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=50),
        steps=600, log_every=20, eval_every=200, eval_batches=8, checkpoint_every=200)


def bench_512() -> TrainConfig:
    return TrainConfig(
        name="bench-512",
        model=ModelConfig(vocab_size=4096, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8,
                          d_ff=1536, max_seq_len=256),
        data=DataConfig(tokenizer="sentencepiece-bpe", seq_len=256, batch_size=16),
        steps=200)


def llama_100m() -> TrainConfig:
    return TrainConfig(
        name="llama-100m",
        model=ModelConfig(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                          d_ff=2048, max_seq_len=1024, dtype="bfloat16"),
        data=DataConfig(tokenizer="sentencepiece-bpe", seq_len=1024, batch_size=64),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=500),
        steps=20_000, log_every=50, eval_every=1000, eval_batches=16, checkpoint_every=1000)


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "smoke": smoke,
    "tiny": tiny,
    "bench-512": bench_512,
    "llama-100m": llama_100m,
}


def list_configs() -> list[str]:
    return sorted(PRESETS)


def get_config(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"config={name!r}: unknown preset; expected one of {', '.join(list_configs())}")
    return PRESETS[name]()
