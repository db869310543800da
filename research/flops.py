"""Model FLOPs per token and the peak to divide by for MFU: the chip's published one, else a measured one."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from research import devices


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but the lookup tables and norms, plus the LM head."""
    weights = cfg.param_count(include_embeddings=False, active_only=True)  # MoE: only routed experts do work
    norms = (2 * cfg.num_layers + 1) * cfg.d_model * (1 if cfg.norm == "rmsnorm" else 2)
    return weights - norms + cfg.vocab_size * cfg.d_model


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """PaLM's count (Chowdhery et al. 2022, App. B): 6 N + 12 L N_heads H T for forward + backward."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
    return 6.0 * matmul_params(cfg) + attention


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return train_flops_per_token(cfg, seq_len) / 3.0


def matmul_chain(dtype: str = "float32", n: int = 1024, chain: int = 8) -> tuple[Callable[[], None], float]:
    """A compiled chain of n x n matmuls on the default device: (a runner that blocks until done, its FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype)) / n ** 0.5

    @jax.jit
    def run(x: jax.Array) -> jax.Array:
        for _ in range(chain):
            x = x @ a
        return x

    run(a).block_until_ready()  # compile
    return lambda: run(a).block_until_ready(), 2.0 * n ** 3 * chain


def measure_matmul_peak(dtype: str = "float32", n: int = 1024, chain: int = 8, repeats: int = 5) -> float:
    """Best achieved FLOP/s of a jitted chain of n x n matmuls on the default device."""
    run, flops = matmul_chain(dtype, n, chain)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return flops / best


def mfu_peak(dtype: str, device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, its source) for MFU: on a chip in research/devices.py's table, the vendor's
    dense peak for `dtype` ("table:<accelerator>"); elsewhere (CPUs, unknown chips, unpublished dtypes) the
    best rate of a matmul chain measured here ("measured"), which is only comparable within one machine."""
    device = device if device is not None else jax.devices()[0]
    peak = devices.peak_flops(device.device_kind, dtype)
    if peak is not None:
        return peak, f"table:{devices.accelerator(device.device_kind).name}"
    return measure_matmul_peak(devices.canonical_dtype(dtype)), "measured"
