"""Model and training presets, from test-sized to accelerator-sized.

  smoke      seconds on CPU; used by the tests
  tiny       the quick start: trains on 2 CPU cores in a few minutes and prints a sample
  bench-512  d_model 512, the CPU benchmark shape for MFU
  llama-100m ~100M parameters (Llama-style GQA), for accelerators
  tiny-moe   tiny with 8 top-1 experts per block (Switch-style); trains on CPU in a minute or two
  mixtral-22m Mixtral's architecture (8 experts, top-2, dropless, SwiGLU, GQA) at the CPU benchmark shape
  micro-moe  the routing-collapse study's base: 2 blocks of 8 top-1 experts, dropless, no balancing
  llama-1b   ~1.0B parameters (Llama 3.2 1B's shape with a 32k vocabulary), scanned and rematerialised: for pods
  retrieval  the context-rot study's model: needles in haystacks of corpus prose, answers alone scored
  deep-24    24 narrow blocks (d_model 256): where scanning the blocks (model.scan_layers) pays off in compile time
"""

from __future__ import annotations

from typing import Callable

from models.config import ConfigError, ModelConfig, MoEConfig
from research.config import DataConfig, OptimConfig, RetrievalConfig, TrainConfig


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


def llama_1b() -> TrainConfig:
    """Llama 3.2 1B's block shape (d_model 2048, 16 blocks, GQA 32:8, d_ff 8192) on our 32k vocabulary:
    1.04B parameters. Adam state alone is ~16.6 GB, so it needs fsdp or tensor sharding on a 16 GB chip;
    the blocks are scanned (one compiled body) and rematerialised keeping the matmul outputs."""
    return TrainConfig(
        name="llama-1b",
        model=ModelConfig(vocab_size=32000, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                          d_ff=8192, max_seq_len=2048, rope_theta=5e5, dtype="bfloat16",
                          scan_layers=True, remat_policy="dots_no_batch"),
        data=DataConfig(tokenizer="sentencepiece-bpe", seq_len=2048, batch_size=32),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=2000),
        steps=100_000, log_every=50, eval_every=2000, eval_batches=16, checkpoint_every=2000)


def tiny_moe() -> TrainConfig:
    """Switch-style: top-1 of 8 experts in every block, alpha = 1e-2, capacity factor 1.25."""
    return TrainConfig(
        name="tiny-moe",
        model=ModelConfig(vocab_size=2048, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                          d_ff=256, max_seq_len=256,
                          moe=MoEConfig(num_experts=8, top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0,
                                        switch_loss_weight=1e-2)),
        data=DataConfig(tokenizer="sentencepiece-bpe", seq_len=128, batch_size=16),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=30),
        steps=300, log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100)


def mixtral_22m() -> TrainConfig:
    """Mixtral 8x7B's layout (untied head, RoPE theta 1e6, GQA 4:1, top-2 of 8 SwiGLU experts with
    renormalised gates, dropless) at d_model 256; sliding attention is one override away
    (model.sliding_window=...)."""
    return TrainConfig(
        name="mixtral-22m",
        model=ModelConfig(vocab_size=8000, d_model=256, num_layers=4, num_heads=8, num_kv_heads=2, d_ff=688,
                          max_seq_len=2048, norm_eps=1e-5, rope_theta=1e6, tie_embeddings=False,
                          moe=MoEConfig(num_experts=8, top_k=2, renormalize=True, capacity_factor=0.0,
                                        eval_capacity_factor=0.0, switch_loss_weight=1e-2)),
        data=DataConfig(tokenizer="sentencepiece-bpe", seq_len=512, batch_size=8),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100),
        steps=2000, log_every=20, eval_every=250, eval_batches=8, checkpoint_every=250)


def micro_moe() -> TrainConfig:
    """Small enough for a sweep of many runs on 2 CPU cores (~1 s per 25 steps). Dropless and with every
    balancing term off, so the study's conditions each switch on exactly what they test."""
    return TrainConfig(
        name="micro-moe",
        model=ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128,
                          max_seq_len=64,
                          moe=MoEConfig(num_experts=8, top_k=1, capacity_factor=0.0, eval_capacity_factor=0.0,
                                        switch_loss_weight=0.0)),
        data=DataConfig(tokenizer="sentencepiece-bpe", seq_len=64, batch_size=16, max_bytes=1_000_000),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=30),
        steps=300, log_every=25, eval_every=300, eval_batches=8, checkpoint_every=100, sample_tokens=0)


def retrieval() -> TrainConfig:
    """Learns to answer "The code of K is" from facts hidden in up to seq_len tokens of prose
    (research/needles.py); max_seq_len leaves room to evaluate at 4x the trained length. Heads of 32
    dimensions: with 16 (4 heads at d_model 64) retrieval was learned far more slowly."""
    return TrainConfig(
        name="retrieval",
        model=ModelConfig(vocab_size=2048, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=256,
                          max_seq_len=1024),
        data=DataConfig(tokenizer="sentencepiece-bpe", seq_len=128, batch_size=16, task="retrieval",
                        retrieval=RetrievalConfig(max_facts=8)),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=50),
        steps=1500, log_every=50, eval_every=250, eval_batches=4, checkpoint_every=500, sample_tokens=0)


def deep_24() -> TrainConfig:
    """Deep and narrow (~18M parameters), so that tracing and compiling 24 blocks dominates a step's cost on
    CPU: experiments/benchmark_compile.py times it with the blocks looped and scanned."""
    return TrainConfig(
        name="deep-24",
        model=ModelConfig(vocab_size=2048, d_model=256, num_layers=24, num_heads=4, num_kv_heads=2, d_ff=688,
                          max_seq_len=256),
        data=DataConfig(tokenizer="sentencepiece-bpe", seq_len=128, batch_size=8),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=50),
        steps=600, log_every=20, eval_every=200, eval_batches=4, checkpoint_every=200)


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "smoke": smoke,
    "tiny": tiny,
    "bench-512": bench_512,
    "llama-100m": llama_100m,
    "llama-1b": llama_1b,
    "tiny-moe": tiny_moe,
    "mixtral-22m": mixtral_22m,
    "micro-moe": micro_moe,
    "retrieval": retrieval,
    "deep-24": deep_24,
}


def list_configs() -> list[str]:
    return sorted(PRESETS)


def get_config(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"config={name!r}: unknown preset; expected one of {', '.join(list_configs())}")
    return PRESETS[name]()
