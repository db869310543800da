"""Train-step compile time with the blocks looped against scanned (`model.scan_layers`), with and without remat.

    python -m experiments.benchmark_compile [--out FILE] [--quick]

The deep-24 preset (24 blocks of d_model 256; `--quick`: smoke, 2 blocks) in four layouts: the blocks as a
Python loop or under `nn.scan`, each with `model.remat_policy` "none" and REMAT_POLICY. For each, the train
step that research/train_step.py builds (one device) is traced and lowered (`jit(...).lower(...)`) and
compiled (`.compile()`), timed by wall clock, round-robin over the layouts (the round with the least
lower + compile time of REPEATS, each from a fresh `build_steps`, so nothing is cached). Recorded with
each: the StableHLO text's size, the compiled program's temporary memory (XLA's memory analysis:
activations and workspace, where the backend reports it) and the compiled step's run time (best of
STEP_REPEATS round-robin rounds of STEPS steps), so that what scanning saves at compile time is seen beside
what it costs per step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from configs.presets import deep_24, smoke
from experiments.bench_common import (bench_args, environment, interleaved_best, markdown_rows, random_tokens,
                                      resolved_config)
from research.config import MeshConfig, TrainConfig
from research.mesh import make_mesh, put_batch
from research.run_record import write_json_atomic
from research.train_step import build_steps

DEFAULT_OUT = Path("experiments/results/benchmark_compile.json")
REMAT_POLICY = "full"  # the remat contenders' policy: keeps the least, so its effect on memory is clearest
REPEATS = 2  # compile rounds; each layout's best is reported
STEPS, STEP_REPEATS = 2, 2


def layouts(base: TrainConfig) -> dict[str, TrainConfig]:
    def variant(scan: bool, remat: str) -> TrainConfig:
        model = dataclasses.replace(base.model, scan_layers=scan, remat_policy=remat)
        return dataclasses.replace(base, name=f"{base.name} ({'scan' if scan else 'loop'}, remat {remat})",
                                   model=model)

    return {"loop": variant(False, "none"), "scan": variant(True, "none"),
            f"loop_remat_{REMAT_POLICY}": variant(False, REMAT_POLICY),
            f"scan_remat_{REMAT_POLICY}": variant(True, REMAT_POLICY)}


def compile_train_step(cfg: TrainConfig) -> tuple[dict[str, Any], Any, Any]:
    """Lowers and compiles cfg's train step from scratch: (timings and sizes, the executable, its Steps)."""
    steps = build_steps(cfg, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    batch = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), jnp.int32,
                                 sharding=steps.batch_sharding)
    start = time.perf_counter()
    lowered = steps.train.lower(steps.abstract_state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    memory = compiled.memory_analysis()
    facts = {"lower_seconds": lowered_at - start, "compile_seconds": done - lowered_at,
             "stablehlo_chars": len(lowered.as_text()),
             "temp_bytes": getattr(memory, "temp_size_in_bytes", None)}
    return facts, compiled, steps


def step_runner(cfg: TrainConfig, compiled: Any, steps: Any) -> Any:
    """Runs STEPS steps of the compiled train step on fixed random batches (the state is donated each step)."""
    b, t = cfg.data.batch_size, cfg.data.seq_len
    batches = [put_batch(random_tokens(cfg.model.vocab_size, (b, t + 1), seed), steps.batch_sharding)
               for seed in range(STEPS)]
    state = steps.init()
    state, _ = compiled(state, batches[0])  # the first call allocates
    jax.block_until_ready(state)

    def run() -> None:
        nonlocal state
        for batch in batches:
            state, _ = compiled(state, batch)
        jax.block_until_ready(state)

    return run


def markdown_table(results: dict[str, Any]) -> str:
    rows = [("layout", "lower s", "compile s", "lower + compile s", "vs loop", "StableHLO chars", "temp MB",
             "step s"), ("---",) + ("---:",) * 7]
    for key, r in results["layouts"].items():
        temp = f"{r['temp_bytes'] / 1e6:,.0f}" if r["temp_bytes"] is not None else "n/a"
        rows.append((key, f"{r['lower_seconds']:.2f}", f"{r['compile_seconds']:.2f}", f"{r['total_seconds']:.2f}",
                     f"{r['total_vs_loop']:.2f}", f"{r['stablehlo_chars']:,}", temp,
                     f"{r['step_seconds']:.3f}"))
    return markdown_rows(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(argv, __doc__, DEFAULT_OUT, "the smoke preset (2 blocks), one compile round")

    load_start = os.getloadavg()
    base = smoke() if args.quick else deep_24()
    configs = layouts(base)
    repeats = 1 if args.quick else REPEATS
    best: dict[str, dict[str, Any]] = {}  # per layout, the round with the least lower + compile time
    executables = {}
    for _ in range(repeats):  # round-robin: a neighbour's load falls on every layout alike
        for key, cfg in configs.items():
            facts, compiled, steps = compile_train_step(cfg)
            facts["total_seconds"] = facts["lower_seconds"] + facts["compile_seconds"]
            if key not in best or facts["total_seconds"] < best[key]["total_seconds"]:
                best[key] = facts
            executables[key] = (compiled, steps)
    step_seconds = interleaved_best({key: step_runner(configs[key], *executables[key]) for key in configs},
                                    STEP_REPEATS)
    results = {
        "quick": args.quick,
        "preset": base.name,
        "num_layers": base.model.num_layers,
        "batch_size": base.data.batch_size,
        "seq_len": base.data.seq_len,
        "repeats": repeats,
        "layouts": {key: {"name": cfg.name, "config": resolved_config(cfg), **best[key],
                          "total_vs_loop": best[key]["total_seconds"] / best["loop"]["total_seconds"],
                          "steps": STEPS, "step_repeats": STEP_REPEATS, "step_seconds": step_seconds[key] / STEPS}
                    for key, cfg in configs.items()},
        **environment(load_start),
    }
    write_json_atomic(args.out, results)
    print(markdown_table(results))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
