"""Train a language model from a named config.

    python -m research.train --config tiny [--set model.d_model=256 ...] [--out DIR] [--resume]

Writes to DIR: run.json (resolved config, git commit, versions, seed, devices), metrics.jsonl (one
record per step, plus eval records), checkpoints/ (orbax), tokenizer/, and summary.json at the end.

As one of several processes (research/launch.py locally; a cluster's scheduler elsewhere; flags or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID): every process computes, each feeds only
its own devices' shards of the batch, and process 0 alone builds the tokenizer (the others wait, then
read it from data.cache_dir), writes the files above and prints. DIR and data.cache_dir must be on a file
system every process sees; orbax writes each process's shards and commits the checkpoint once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from decoding.generate import check_prompt, generate
from models.config import ConfigError
from research.checkpoint import Checkpointer, CheckpointError, one_line
from research.cli import ArgumentParser
from research.config import TrainConfig, apply_overrides, to_dict
from research.data import DataError
from research.flops import mfu_peak, train_flops_per_token
from research.input_pipeline import build_datasets
from research.mesh import (barrier, from_main_process, initialize_distributed, is_main_process, make_mesh,
                           put_batch)
from research.metrics import perplexity
from research.run_record import run_record, write_json_atomic
from research.train_step import Steps, TrainState, build_steps


class DivergedError(RuntimeError):
    """A training quantity (the loss, the gradient norm, a parameter) became NaN or inf; the last good
    checkpoint is kept."""


# The quantities a divergence names, most telling first; any other metric (e.g. an MoE statistic) follows.
QUANTITIES = {"loss": "loss", "total_loss": "loss with auxiliary losses", "grad_norm": "gradient norm",
              "param_norm": "parameter norm"}


def divergence(step: int, metrics: dict[str, Any], state: TrainState, mesh: Mesh) -> str:
    """What went non-finite at `step`, in one line; for the parameters, which ones."""
    bad = [k for k in [*QUANTITIES, *sorted(metrics)] if k in metrics and not np.isfinite(metrics[k]).all()]
    name = bad[0]
    what = f"non-finite {QUANTITIES.get(name, name)} ({np.asarray(metrics[name]).ravel()[0]}) at step {step}"
    if name != "loss":
        what += f" (loss {float(metrics['loss']):.4g})"
    if name == "param_norm":  # which arrays, as of the newest state (a later step: NaNs spread as it trains)
        # Reduced where the parameters live, to one replicated flag per array: works across processes.
        finite = jax.jit(lambda p: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), p),
                         out_shardings=NamedSharding(mesh, PartitionSpec()))(state.params)
        leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(finite))[0]
        names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, ok in leaves if not ok]
        what += (f"; at step {int(state.step)}, {len(names)} of {len(leaves)} parameter arrays are non-finite: "
                 + ", ".join(names[:3]) + (" ..." if len(names) > 3 else ""))
    return what


def state_bytes(abstract_state: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def check_out_dir(out: Path, need_bytes: int) -> None:
    """Creates --out and checks it can hold a checkpoint: a write probe (read-only file systems, a file in
    the way) and the free space, before any training; a ConfigError naming the path otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        try:
            with probe.open("wb") as f:
                f.write(bytes(4096))
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: not writable ({one_line(err)})") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise ConfigError(f"--out {out}: {free / 1e6:.1f} MB free, a checkpoint needs about {need_bytes / 1e6:.1f} MB")


# A resumed run may change where it pauses, and how it is laid out over devices: orbax reshards the
# checkpoint onto the new mesh, and the math is the same up to the order of float sums.
RESUMABLE_CHANGES = ("stop_after", "mesh")


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_dict.items() if k not in RESUMABLE_CHANGES}


class MetricsLog:
    """Appends JSON records to metrics.jsonl; on resume, drops records past the restored step. Only the main
    process writes (`enabled`); the others' logs do nothing, so each record appears once."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self._file = path, None
        if not enabled:
            return
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        elif path.exists():
            path.unlink()
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def evaluate(steps: Steps, state: TrainState, dataset, max_batches: int) -> dict[str, float]:
    total, count = 0.0, 0.0
    for batch in dataset.eval_batches(max_batches):
        nll, n = steps.eval(state.params, put_batch(batch, steps.batch_sharding))
        total, count = total + float(nll), count + float(n)
    loss = total / count
    return {"val_loss": loss, "val_ppl": float(perplexity(loss))}


def sample_text(cfg: TrainConfig, params: Any, tokenizer) -> str:
    prompt = tokenizer.encode(cfg.sample_prompt) or [tokenizer.bos_id]
    check_prompt(cfg.model, len(prompt), cfg.sample_tokens)
    out = generate(params, cfg.model, np.asarray([prompt], np.int32), np.asarray([len(prompt)], np.int32),
                   jax.random.PRNGKey(cfg.seed), max_new_tokens=cfg.sample_tokens,
                   stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
    return cfg.sample_prompt + tokenizer.decode(np.asarray(out.tokens[0, 0, :int(out.lengths[0, 0])]).tolist())


def _setup(cfg: TrainConfig, out: Path, resume: bool):
    """The checks that may refuse a run (config, data, --out, checkpoints), the initial or restored state,
    then the first write into `out` (the tokenizer)."""
    record_path = out / "run.json"
    if resume and record_path.exists():
        saved = json.loads(record_path.read_text())["config"]
        if _comparable(saved) != _comparable(to_dict(cfg)):
            diff = sorted(k for k in set(saved) | set(to_dict(cfg))
                          if k not in RESUMABLE_CHANGES and saved.get(k) != to_dict(cfg).get(k))
            raise ConfigError(f"--resume: config differs from the run in {out} (in {', '.join(diff)})")
    main = is_main_process()
    if main:  # the tokenizer and token caches are built once (cache_dir must be shared), then read by all
        datasets = build_datasets(cfg.data, cfg.model.vocab_size, cfg.seed)
    barrier("datasets")
    tokenizer, train_data, val_data = datasets if main else build_datasets(cfg.data, cfg.model.vocab_size, cfg.seed)
    mesh = make_mesh(cfg.mesh)
    steps = build_steps(cfg, mesh)
    check_out_dir(out, state_bytes(steps.abstract_state))
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    try:
        start_step = None
        if resume and main:  # verifies, and moves failing checkpoints aside: once, then every process agrees
            start_step = ckpt.latest_verified(report=lambda line: print(line, file=sys.stderr))
        elif not resume and ckpt.all_steps():
            raise ConfigError(f"--out {out} already holds checkpoints {ckpt.all_steps()}: pass --resume or pick "
                              "a new --out")
        if resume:
            found = int(from_main_process(-1 if start_step is None else start_step))
            start_step = None if found < 0 else found
        state = steps.init() if start_step is None else ckpt.restore(start_step, steps.abstract_state)
        if main:
            tokenizer.save(out / "tokenizer")
    except BaseException:
        ckpt.close()
        raise
    return tokenizer, train_data, val_data, steps, ckpt, start_step, state


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) training; returns the summary that is also written to summary.json.

    Everything that can refuse the run (config, data, --out, checkpoints) is checked before training, and a
    refused run leaves no --out folder behind when it created one.
    """
    out = Path(out_dir)
    created = not out.exists()
    try:
        tokenizer, train_data, val_data, steps, ckpt, start_step, state = _setup(cfg, out, resume)
    except BaseException:
        if created and is_main_process():
            shutil.rmtree(out, ignore_errors=True)
        raise
    main = is_main_process()
    device_peak, peak_source = mfu_peak(cfg.model.dtype)
    # A vendor peak is per chip: the run's is all of them. A measured one is the machine's (fake CPU devices
    # share its cores). Process 0's, so that every process reports the same MFU.
    peak = float(from_main_process(device_peak * (jax.device_count() if peak_source != "measured" else 1)))
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    if main:
        write_json_atomic(out / "run.json", run_record(
            to_dict(cfg), cfg.seed, resumed_from=start_step, matmul_peak_flops=peak, peak_source=peak_source,
            # What "auto" ran as on this backend (models/config.py: resolve_*_impl).
            implementations={name: getattr(cfg.model.resolved(), name) for name in ("attention_impl", "matmul_impl")},
            param_count=cfg.model.param_count(), train_tokens=train_data.num_tokens,
            val_tokens=val_data.num_tokens))
    log = MetricsLog(out / "metrics.jsonl", start_step, enabled=main)

    first = int(state.step)
    last = min(cfg.steps, cfg.stop_after or cfg.steps)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    timer_step, timer = first, time.perf_counter()
    throughput: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=first, disable=not (progress and main) or None, desc=cfg.name,
               file=sys.stderr)

    def flush(step: int) -> None:
        """Fetches pending metrics, checks they are finite, logs them with throughput and MFU."""
        nonlocal pending, timer_step, timer, throughput
        for s, metrics in jax.device_get(pending):
            if not all(np.isfinite(v).all() for v in metrics.values()):
                what = divergence(s, metrics, state, steps.mesh)
                ckpt.wait()  # a save in flight holds an earlier, finite state: let it count as good
                where = f"step {ckpt.last_good} in {ckpt.directory}" if ckpt.last_good is not None else "none"
                raise DivergedError(f"{what}; last good checkpoint: {where}")
            # Vector statistics (e.g. MoE per-expert fractions) are logged as lists.
            log.write({"step": s, **{k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
                                     for k, v in metrics.items()}})
        pending = []
        elapsed = time.perf_counter() - timer
        if step > timer_step and step > first + 1:  # the first interval holds compilation
            tok_s = (step - timer_step) * tokens_per_step / elapsed
            throughput = {"tokens_per_s": tok_s, "mfu": tok_s * flops_per_token / peak}
            log.write({"step": step, **throughput})
        log.flush()
        timer_step, timer = step, time.perf_counter()

    try:
        for step in range(first, last):
            state, metrics = steps.train(state, put_batch(train_data.batch(step), steps.batch_sharding))
            ckpt.poll()  # a failed asynchronous save stops the run at the next step, not the next save
            pending.append((step + 1, metrics))
            done = step + 1
            if done == first + 1 or done % cfg.log_every == 0 or done == last:
                flush(done)
                loss = float(jax.device_get(metrics["loss"]))
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{throughput.get('tokens_per_s', 0):,.0f}",
                                mfu=f"{100 * throughput.get('mfu', 0):.1f}%")
            if done % cfg.eval_every == 0 or done == last:
                flush(done)
                ev = evaluate(steps, state, val_data, cfg.eval_batches)
                log.write({"step": done, **ev})
                if main:
                    bar.write(f"step {done}: val_loss {ev['val_loss']:.4f}  val_ppl {ev['val_ppl']:.2f}")
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == last:
                flush(done)  # only finite states are saved
                ckpt.save(done, state)
            bar.update(1)
        ckpt.wait()
    except BaseException:  # report the first error: what follows may fail too (e.g. on a full disk)
        with contextlib.suppress(CheckpointError):
            ckpt.wait()  # seal a save in flight (e.g. at Ctrl-C)
        with contextlib.suppress(OSError):
            log.close()
        raise
    finally:
        bar.close()
        log.close()
        ckpt.close()

    summary: dict[str, Any] = {"step": int(state.step), **throughput, **evaluate(steps, state, val_data,
                                                                                  cfg.eval_batches)}
    if cfg.sample_tokens and jax.process_count() == 1:  # decoding reads the params on one host
        summary["sample"] = sample_text(cfg, state.params, tokenizer)
    if main:
        write_json_atomic(out / "summary.json", summary)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m research.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", help="preset name (see configs/presets.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable, e.g. --set model.d_model=256")
    parser.add_argument("--out", default=None, help="run directory (default runs/<config>)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("multi-process runs (default: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                                      "JAX_PROCESS_ID, or what jax detects on SLURM / TPU slices)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)
    return parser.parse_args(argv)


def resolve_config(name: str, overrides: list[str]) -> TrainConfig:
    """The preset `name` (configs/presets.py) with `overrides` applied."""
    # configs names things in research, so research imports it only here, for the command line.
    from configs import get_config

    return apply_overrides(get_config(name), overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args.config, args.overrides)
        several = initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        summary = train(cfg, args.out or f"runs/{cfg.name}", args.resume, progress=not args.no_progress)
    except (ConfigError, DataError, DivergedError, CheckpointError, OSError) as err:
        where = f"[process {jax.process_index()}] " if jax.distributed.is_initialized() else ""
        print(f"{where}error: {err}", file=sys.stderr)
        if jax.distributed.is_initialized():  # leave now: a clean shutdown would wait for peers that wait for us
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    if is_main_process():
        print(f"final: val_loss {summary['val_loss']:.4f}  val_ppl {summary['val_ppl']:.2f}  "
              f"tokens/s {summary.get('tokens_per_s', 0):,.0f}  MFU {100 * summary.get('mfu', 0):.1f}%"
              + (f"  ({jax.process_count()} processes)" if several else ""))
        if "sample" in summary:
            print(f"sample: {summary['sample']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
