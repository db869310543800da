"""Sweeps: a grid of training runs declared as data, run (or resumed) cell by cell.

A `Sweep` names a base preset, overrides shared by every cell, and a union of named `Grid`s. A grid
is the product of its axes; an axis is a list of options; an option is a label plus the overrides it
sets (several keys at once when they must move together: a zip). Every cell is repeated over the
grid's seeds. Cells are keyed by the hash of their resolved `TrainConfig`, so a finished run is found
and reused by any sweep that asks for the same config, and two grids naming the same config share one
run (the grid names let a study pick its cells: e.g. the headline conditions, or a capacity sweep).

    runs/<hash>/        research.train's run directory (run.json, metrics.jsonl, checkpoints/, summary.json)
    runs/<hash>/failed.json   why the last attempt failed (removed when a later attempt finishes)
    sweep.json          the cells: grid, condition, seed, overrides, hash, status

A run counts as finished when its summary.json exists (written last, atomically). An interrupted run
resumes from its latest checkpoint; a failed run is recorded, the sweep goes on, and the next
invocation tries it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import multiprocessing.connection
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from models.config import ConfigError
from research.config import TrainConfig, apply_overrides, config_hash, from_dict, to_dict
from research.run_record import write_json_atomic

Option = tuple[str, tuple[str, ...]]  # (label, overrides); an empty label is left out of the condition name


def axis(key: str, values: Sequence[Any], label: str | None = None) -> tuple[Option, ...]:
    """One key over several values: options labelled `label=value` (`label` defaults to the key's last part)."""
    name = label if label is not None else key.rsplit(".", 1)[-1]
    return tuple((f"{name}={v}" if name else "", (f"{key}={v}",)) for v in values)


def zip_axis(labels: Sequence[str], **columns: Sequence[Any]) -> tuple[Option, ...]:
    """Several keys moving together: option i sets every key to its i-th value. Keys use `__` for dots."""
    lengths = {len(v) for v in columns.values()} | {len(labels)}
    if len(lengths) != 1:
        raise ConfigError(f"zip_axis: labels and columns must have equal lengths, got {sorted(lengths)}")
    keys = [k.replace("__", ".") for k in columns]
    return tuple((label, tuple(f"{k}={col[i]}" for k, col in zip(keys, columns.values())))
                 for i, label in enumerate(labels))


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    axes: tuple[tuple[Option, ...], ...]
    seeds: tuple[int, ...] = (0,)


@dataclasses.dataclass(frozen=True)
class Cell:
    grid: str
    condition: str  # the labels of its options: cells differing only in seed share a condition
    seed: int
    overrides: tuple[str, ...]
    config: TrainConfig

    @property
    def key(self) -> str:
        return config_hash(self.config)


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    base: str  # preset name (configs/presets.py)
    overrides: tuple[str, ...] = ()  # applied to the base before each cell's own
    grids: tuple[Grid, ...] = ()

    def cells(self, extra_overrides: Sequence[str] = ()) -> list[Cell]:
        """Each grid's cells, in declaration order; `extra_overrides` (e.g. from --set) apply to all."""
        # configs names things in research (its sweeps are built from this module), so research imports it
        # only here, where a sweep's base preset is looked up.
        from configs import get_config

        base = apply_overrides(get_config(self.base), [*self.overrides, *extra_overrides])
        cells, seen = [], set()
        for grid in self.grids:
            for options in itertools.product(*grid.axes):
                condition = ",".join(label for label, _ in options if label) or "base"
                overrides = tuple(o for _, group in options for o in group)
                for seed in grid.seeds:
                    cfg = apply_overrides(base, [*overrides, f"seed={seed}"])
                    cell = Cell(grid.name, condition, seed, overrides, cfg)
                    if (grid.name, cell.key) not in seen:
                        seen.add((grid.name, cell.key))
                        cells.append(cell)
        return cells


def run_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / "runs" / cell.key


def is_finished(directory: Path) -> bool:
    return (directory / "summary.json").is_file()


def train_cell(config: dict[str, Any], directory: str) -> dict[str, Any]:
    """Trains (or resumes) one cell; a top-level function so worker processes can run it."""
    from research.train import train  # imported here: the parent process of a parallel sweep never trains

    directory_path = Path(directory)
    summary = train(from_dict(TrainConfig, config), directory_path, resume=True, progress=False)
    (directory_path / "failed.json").unlink(missing_ok=True)
    return summary


Failure = tuple[str, str]  # (one line: "ErrorType: message", the traceback)


def failure(error: BaseException) -> Failure:
    return (f"{type(error).__name__}: {error}".splitlines()[0], "".join(traceback.format_exception(error)))


def prepare_data(cells: Sequence[Cell]) -> dict[str, Failure]:
    """Builds each distinct tokenizer and token cache once, before workers could race to write them;
    returns the cells whose data could not be prepared (by key), so that only those fail."""
    from research.input_pipeline import build_datasets

    results: dict[Any, Failure | None] = {}
    failed = {}
    for cell in cells:
        key = (cell.config.data, cell.config.model.vocab_size, cell.config.seed)
        if key not in results:
            try:
                build_datasets(*key)
                results[key] = None
            except Exception as error:  # noqa: BLE001 -- this cell's failure, not the sweep's
                results[key] = failure(error)
        if results[key] is not None:
            failed[cell.key] = results[key]
    return failed


def _serve(train_fn: Callable[[dict[str, Any], str], Any], conn: Connection) -> None:
    """A worker process: trains the cells it is sent, one at a time, answering None or a Failure."""
    while (task := conn.recv()) is not None:
        try:
            train_fn(*task)
            conn.send(None)
        except Exception as error:  # noqa: BLE001 -- reported to the parent as this cell's failure
            conn.send(failure(error))


class _Worker:
    """One spawned process (JAX does not survive fork) and the cell it is training."""

    def __init__(self, context: Any, train_fn: Callable[[dict[str, Any], str], Any]):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(train_fn, child), daemon=True)
        self.process.start()
        child.close()
        self.cell: Cell | None = None

    def died(self) -> Failure:
        self.process.join()
        code = self.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        hint = "; out of memory?" if code == -signal.SIGKILL else ""  # what the OOM killer sends
        return (f"WorkerDied: the worker process training this cell died ({how}{hint})", "")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()


def run_parallel(cells: Sequence[Cell], out: Path, jobs: int, train_fn: Callable[[dict[str, Any], str], Any],
                 finish: Callable[[Cell, Failure | None], None]) -> None:
    """Trains `cells` in `jobs` worker processes. A worker that dies (os._exit, the OOM killer) fails only
    the cell it held; a fresh worker takes its place and the other cells go on."""
    context = multiprocessing.get_context("spawn")
    waiting, workers = list(cells), []
    try:
        while waiting or any(w.cell for w in workers):
            while waiting and (len(workers) < jobs or any(w.cell is None for w in workers)):
                worker = next((w for w in workers if w.cell is None), None)
                if worker is None:
                    worker = _Worker(context, train_fn)
                    workers.append(worker)
                cell = waiting.pop(0)
                try:
                    worker.conn.send((to_dict(cell.config), str(run_dir(out, cell))))
                    worker.cell = cell
                except OSError:  # it died while idle: not this cell's fault, so the cell waits for another
                    worker.process.join()
                    workers.remove(worker)
                    waiting.insert(0, cell)
            busy = {w.conn: w for w in workers if w.cell is not None}
            for conn in multiprocessing.connection.wait(list(busy)):
                worker = busy[conn]
                try:
                    result = conn.recv()
                except (EOFError, OSError):
                    result = worker.died()
                    workers.remove(worker)
                cell, worker.cell = worker.cell, None
                finish(cell, result)
    finally:
        for worker in workers:
            worker.stop()


def run_sweep(sweep: Sweep, out: str | Path, jobs: int = 1, extra_overrides: Sequence[str] = (),
              progress: bool = True, train_fn: Callable[[dict[str, Any], str], Any] = train_cell,
              prepare: Callable[[Sequence[Cell]], dict[str, Failure]] | None = prepare_data) -> list[dict[str, Any]]:
    """Runs every unfinished cell of `sweep` into `out`; returns (and writes to sweep.json) their status.

    jobs > 1 trains cells in that many worker processes (`run_parallel`), after `prepare` has built what
    they would otherwise race to write (tokenizers, token caches). Any cell may fail (bad data, divergence,
    a dead worker) without stopping the others; sweep.json and the run's failed.json say why.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs={jobs}: expected a positive number of parallel runs")
    out = Path(out)
    cells = sweep.cells(extra_overrides)
    status = {cell.key: "reused" if is_finished(run_dir(out, cell)) else "pending" for cell in cells}
    errors: dict[str, str] = {}

    def record() -> list[dict[str, Any]]:
        rows = [{"grid": c.grid, "condition": c.condition, "seed": c.seed, "overrides": list(c.overrides), "key": c.key,
                 "status": status[c.key], **({"error": errors[c.key]} if c.key in errors else {})}
                for c in cells]
        write_json_atomic(out / "sweep.json", {"name": sweep.name, "base": sweep.base,
                                               "overrides": [*sweep.overrides, *extra_overrides], "cells": rows})
        return rows

    todo = list({c.key: c for c in cells if status[c.key] == "pending"}.values())  # a config shared by grids runs once
    record()
    unique = len(status)
    bar = tqdm(total=unique, initial=unique - len(todo), desc=sweep.name, unit="run",
               disable=not progress or None, file=sys.stderr)

    def finish(cell: Cell, failed: Failure | None) -> None:
        if failed is None:
            status[cell.key] = "done"
        else:
            status[cell.key] = "failed"
            errors[cell.key] = failed[0]
            write_json_atomic(run_dir(out, cell) / "failed.json", {"error": failed[0], "traceback": failed[1]})
            bar.write(f"run {cell.key} ({cell.condition}, seed {cell.seed}) failed: {failed[0]}")
        bar.update(1)
        bar.set_postfix(failed=sum(s == "failed" for s in status.values()))
        record()

    try:
        if jobs == 1:
            for cell in todo:
                try:
                    train_fn(to_dict(cell.config), str(run_dir(out, cell)))
                    finish(cell, None)
                except Exception as error:  # noqa: BLE001 -- one failed run must not stop the sweep
                    finish(cell, failure(error))
        else:
            unprepared = prepare(todo) if todo and prepare is not None else {}
            for cell in todo:
                if cell.key in unprepared:
                    finish(cell, unprepared[cell.key])
            run_parallel([c for c in todo if c.key not in unprepared], out, jobs, train_fn, finish)
    finally:
        bar.close()
    return record()


def run_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many of `run_sweep`'s cells were trained now, reused, or failed (a run shared by cells counts once)."""
    status = {r["key"]: r["status"] for r in rows}
    return {s: sum(v == s for v in status.values()) for s in ("done", "reused", "failed")}


def load_runs(out: str | Path) -> list[dict[str, Any]]:
    """The finished cells of a sweep directory, each with its summary, config and metrics records."""
    out = Path(out)
    runs = []
    for row in json.loads((out / "sweep.json").read_text())["cells"]:
        directory = out / "runs" / row["key"]
        if row["status"] in ("done", "reused") and is_finished(directory):
            metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line]
            runs.append({**row, "dir": directory, "summary": json.loads((directory / "summary.json").read_text()),
                         "config": json.loads((directory / "run.json").read_text())["config"], "metrics": metrics})
    return runs
