"""Pieces every benchmark shares: random batches, compiled train-step and forward runners, round-robin
timing, and the run environment."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from models.transformer import Transformer, init_params, unbox
from research.cli import ArgumentParser
from research.config import MeshConfig, TrainConfig, to_dict
from research.mesh import make_mesh, put_batch
from research.run_record import device_info, library_versions
from research.train_step import build_steps

# The square matmul timed as the machine's peak: flops.py's default, smaller under --quick to keep it fast.
PEAK_SIZE, QUICK_PEAK_SIZE = 1024, 256


def random_tokens(vocab: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int32)


def train_runner(cfg: TrainConfig, steps: int, warmup: int = 3) -> Callable[[], None]:
    """Compiles cfg's train step on one device; the runner takes `steps` steps on distinct batches.

    Batches are placed up front so a timed call measures only the steps; `warmup` calls (the first
    compiles) reach the steady state before the runner is returned.
    """
    b, t = cfg.data.batch_size, cfg.data.seq_len
    train = build_steps(cfg, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    batches = [put_batch(random_tokens(cfg.model.vocab_size, (b, t + 1), seed), train.batch_sharding)
               for seed in range(steps)]
    state = train.init()
    for i in range(warmup):
        state, _ = train.train(state, batches[i % steps])
    jax.block_until_ready(state)

    def run() -> None:
        nonlocal state  # the train step donates its input state
        for batch in batches:
            state, _ = train.train(state, batch)
        jax.block_until_ready(state)

    return run


Runner = Callable[[], None]  # does a fixed amount of work and blocks until it is done


def forward_runner(cfg: TrainConfig, tokens: np.ndarray) -> Runner:
    """Our forward in evaluation mode (full [B, T, V] fp32 logits, as HF's), compiled; random params."""
    model = Transformer(cfg.model)
    # A compiled init: run op by op, init compiles every op separately (slow on CPU).
    params = jax.jit(lambda key: unbox(init_params(cfg.model, key)))(jax.random.key(0))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    x = jax.device_put(tokens)
    forward(params, x).block_until_ready()  # compile
    return lambda: forward(params, x).block_until_ready()


def interleaved_best(runners: dict[str, Runner], repeats: int) -> dict[str, float]:
    """Best seconds of each runner over `repeats` rounds, each round running every runner once.

    Round-robin, so that a neighbour's load on the shared machine falls on all contenders alike.
    """
    best = {name: float("inf") for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def versions() -> dict[str, str]:
    """The run record's library versions plus the optional Hugging Face baseline's."""
    found = library_versions()
    for name in ("torch", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def environment(load_start: tuple[float, float, float]) -> dict[str, Any]:
    """What ran the benchmark; a load average above 0 means neighbours shared the cores."""
    return {
        "load_average_start_end": [load_start, os.getloadavg()],  # 1/5/15-min
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "devices": device_info(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def resolved_config(cfg: TrainConfig) -> dict:
    """The config as a dict with the model's "auto" implementations resolved: what the benchmark ran."""
    return to_dict(dataclasses.replace(cfg, model=cfg.model.resolved()))


def bench_args(argv: list[str] | None, doc: str, default_out: Path, quick_help: str):
    """Every benchmark's command line: --out (its results JSON file) and --quick (what the tests run)."""
    parser = ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out, help="results JSON file")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser.parse_args(argv)


def markdown_rows(rows: list[tuple[str, ...]]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
