"""What checkpoint integrity costs: the manifest's hashing against orbax's save, verification against restore.

    python -m experiments.benchmark_checkpoint [--out FILE] [--quick]

For each preset's full train state (params + AdamW moments; `--quick`: smoke only), saved through
research/checkpoint.py into a fresh temporary folder on the same disk as --out, REPEATS times:
  save     orbax's part: from `save()` until the asynchronous write has finished (`wait` minus the seal);
  seal     hashing every file (SHA-256) and writing manifest.json, once orbax is done;
  restore  orbax's restore of the whole state;
  verify   re-hashing the files against the manifest, which every restore does first.
The best of REPEATS is reported for each, with the ratios seal/save and verify/restore.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from configs import get_config
from experiments.bench_common import bench_args, environment
from research.checkpoint import Checkpointer
from research.mesh import make_mesh
from research.run_record import write_json_atomic
from research.train_step import build_steps

DEFAULT_OUT = Path("experiments/results/benchmark_checkpoint.json")
PRESETS = ("tiny", "bench-512", "llama-100m")
REPEATS = 3


def bench_preset(name: str, scratch: Path) -> dict[str, Any]:
    cfg = get_config(name)
    steps = build_steps(cfg, make_mesh(cfg.mesh))
    state = jax.block_until_ready(steps.init())
    times: dict[str, list[float]] = {"save": [], "seal": [], "restore": [], "verify": []}
    for step in range(1, REPEATS + 1):
        ckpt = Checkpointer(Path(tempfile.mkdtemp(dir=scratch)) / "checkpoints")
        start = time.perf_counter()
        ckpt.save(step, state)
        ckpt.wait()
        total = time.perf_counter() - start
        times["seal"].append(ckpt.seal_seconds[step])
        times["save"].append(total - ckpt.seal_seconds[step])
        start = time.perf_counter()
        assert ckpt.verify(step) is None
        times["verify"].append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(ckpt.restore(step, steps.abstract_state))
        times["restore"].append(time.perf_counter() - start - times["verify"][-1])  # restore() verifies first
        size = sum(p.stat().st_size for p in ckpt.step_dir(step).rglob("*") if p.is_file())
        ckpt.close()
    best = {k: min(v) for k, v in times.items()}
    return {"state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
            "checkpoint_bytes": size, "repeats": REPEATS, "seconds": best,
            "hash_mb_per_s": size / best["seal"] / 1e6,
            "seal_vs_save": best["seal"] / best["save"], "verify_vs_restore": best["verify"] / best["restore"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(argv, __doc__, DEFAULT_OUT, "the smoke preset only")

    load_start = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as scratch:
        presets = {name: bench_preset(name, Path(scratch)) for name in (("smoke",) if args.quick else PRESETS)}
    results = {"quick": args.quick, "presets": presets, **environment(load_start)}
    write_json_atomic(args.out, results)
    print("| preset | checkpoint MB | save s | seal s | seal/save | restore s | verify s | verify/restore |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in presets.items():
        s = r["seconds"]
        print(f"| {name} | {r['checkpoint_bytes'] / 1e6:.1f} | {s['save']:.3f} | {s['seal']:.3f} | "
              f"{r['seal_vs_save']:.2f} | {s['restore']:.3f} | {s['verify']:.3f} | {r['verify_vs_restore']:.2f} |")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
