"""Context rot: needle in a haystack, distractors, lost in the middle and attention dilution, in one command.

    python -m experiments.context_rot --preset smoke|quick|full [--out DIR] [--checkpoint DIR] [--jobs N]

Without --checkpoint the study trains its own retrieval models (configs/context_rot.py: the `retrieval`
preset with attention-logit scaling none / logn / learned, several seeds; runs are reused and resumed like
any sweep), then evaluates each one on episodes built from held-out corpus prose (research/needles.py):

  niah                 accuracy over context length x needle depth
  distractors          accuracy against length for 0/1/4/8 distractors, and whose value a wrong answer gave
  lost_in_the_middle   accuracy against the gold fact's position among k facts; closed-book and oracle lines
  dilution             per-layer attention mass on the needle and attention entropy against length
  haystack_similarity  coherent vs sentence-shuffled haystack, needle worded like the question or paraphrased
  effective_length     RULER's: the longest length scoring at least 85% of the shortest length's accuracy

With --checkpoint DIR (any run of ours, including a Hugging Face model converted by research.convert) the
same evaluations run on that model with its tokenizer; nothing is trained.

DIR receives runs/ (the sweep), evals/ (each model's rows, reused when the study is run again), one CSV per
evaluation (seed means and error bars: the std over seeds, or the binomial standard error for one seed),
figures/ (PNG + PDF), summary.json and report.md. Lengths up to the training length are "within"; longer
ones test length generalisation, which is not context rot, and every figure keeps the two apart.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from configs.context_rot import Study, get_study
from experiments import context_rot_evals as evals
from experiments import context_rot_plots as plots
from experiments.context_rot_report import write_report
from models.config import ConfigError
from research.cli import ArgumentParser
from research.config import DataConfig, config_hash
from research.data import DataError
from research.input_pipeline import split_text
from research.needles import Pieces
from research.run_record import write_json_atomic
from research.runs import RunError, load_run, read_run_config
from research.study import record_header, seed_stats, write_text
from research.sweep import load_runs, run_counts, run_sweep

# The coordinates that name a cell of each evaluation's rows (everything else is measured).
KEYS = {"niah": ("length", "depth"), "distractors": ("length", "distractors"),
        "lost_in_the_middle": ("setting", "items", "length", "position"),
        "haystack_similarity": ("length", "haystack", "needle"), "dilution": ("length", "layer")}


def run_data(run_dir: Path) -> tuple[DataConfig, int]:
    """The run's data config and the length it trained on: the retrieval task's seq_len, or for any other
    model (one converted from Hugging Face, an LM run) its context window, model.max_seq_len."""
    cfg = read_run_config(run_dir)
    return cfg.data, cfg.data.seq_len if cfg.data.task == "retrieval" else cfg.model.max_seq_len


def load_model(run_dir: Path, logn_length: int = 0) -> evals.Model:
    """The run's model; with `logn_length`, evaluated with log-n attention scaling anchored there (it is 1
    within that length, so weights trained without it are the weights it would have trained)."""
    cfg, params, tokenizer = load_run(run_dir)
    if logn_length:
        cfg = dataclasses.replace(cfg, attention_logit_scaling="logn", logit_scaling_length=logn_length)
    if tokenizer is None:
        raise RunError(f"{run_dir}: no tokenizer saved with the checkpoint; the needles need the model's tokenizer")
    prefix = np.array([tokenizer.bos_id] if tokenizer.add_bos_default else [], np.int32)
    _, train, val = split_text(run_data(run_dir)[0])  # haystacks from text the model never trained on
    return evals.Model(cfg, params, Pieces(tokenizer, val, train), prefix)


def evaluate(run_dir: Path, study: Study, cache: Path, logn_length: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Every evaluation's rows for one model, from `cache` when this study already evaluated it."""
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").is_dir() else []
    key = config_hash({**{k: v for k, v in vars(study).items() if k != "sweep"}, "run": str(run_dir.resolve()),
                       "checkpoints": checkpoints, "logn": logn_length})
    if cache.exists():
        found = json.loads(cache.read_text())
        if found.get("key") == key:
            return found["rows"]
    model = load_model(run_dir, logn_length)
    rows = {name: fn(model, study) for name, fn in evals.EVALUATIONS.items()}
    write_json_atomic(cache, {"key": key, "rows": rows})
    return rows


def aggregate(per_model: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """One row per (condition, cell) of evaluation `name`: every measured column's mean over seeds and its error
    (std over seeds; for one seed, the binomial standard error of an accuracy, else 0)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for model in per_model:
        for row in model["rows"][name]:
            groups.setdefault((model["condition"], *(row[k] for k in KEYS[name])), []).append(row)
    out = []
    for (condition, *cell), rows in groups.items():
        agg = {"condition": condition, **dict(zip(KEYS[name], cell)), "seeds": len(rows), "n": rows[0]["n"]}
        for column in rows[0]:
            if column in KEYS[name] or column == "n" or isinstance(rows[0][column], str):
                continue
            stats = seed_stats([r[column] for r in rows])
            p = stats["mean"]
            err = stats["std"] if len(rows) > 1 else (
                float(np.sqrt(p * (1 - p) / rows[0]["n"])) if column == "accuracy" else 0.0)
            agg[column], agg[f"{column}_err"] = p, err
        out.append(agg)
    return out


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def curves(tables: dict[str, list[dict[str, Any]]]) -> dict[str, dict[int, float]]:
    """Accuracy against length of every condition x manipulation, for effective lengths."""
    out: dict[str, dict[int, list[float]]] = {}

    def add(name: str, length: int, acc: float) -> None:
        out.setdefault(name, {}).setdefault(length, []).append(acc)

    for row in tables["niah"]:
        add(f"{row['condition']} | niah (mean over depths)", row["length"], row["accuracy"])
    for row in tables["distractors"]:
        add(f"{row['condition']} | {row['distractors']} distractors", row["length"], row["accuracy"])
    for row in tables["haystack_similarity"]:
        add(f"{row['condition']} | {row['haystack']} haystack, {row['needle']} needle", row["length"], row["accuracy"])
    return {name: {n: float(np.mean(v)) for n, v in sorted(by_length.items())} for name, by_length in out.items()}


def effective_lengths(tables: dict[str, list[dict[str, Any]]], fraction: float) -> list[dict[str, Any]]:
    """RULER's effective length of each curve: the longest length such that it and every shorter length score
    at least `fraction` x the shortest length's accuracy (0 when the shortest itself scores 0)."""
    rows = []
    for name, curve in curves(tables).items():
        lengths, accs = list(curve), list(curve.values())
        threshold = fraction * accs[0]
        effective = 0
        if accs[0] > 0:
            for n, a in zip(lengths, accs):
                if a < threshold:
                    break
                effective = n
        condition, manipulation = name.split(" | ")
        rows.append({"condition": condition, "curve": manipulation, "shortest_accuracy": accs[0],
                     "threshold": threshold, "effective_length": effective})
    return rows


def models_to_evaluate(args: argparse.Namespace, study: Study, out: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(condition, seed, dir, logn_length) of every model: the sweep's finished runs, or the one --checkpoint;
    each one trained without logit scaling a second time with log-n scaling at the trained length."""
    if args.checkpoint:
        trained, counts = [{"condition": "checkpoint", "seed": 0, "dir": args.checkpoint}], {}
    else:
        rows = run_sweep(study.sweep, out, args.jobs, args.overrides, progress=not args.no_progress)
        trained, counts = [{k: run[k] for k in ("condition", "seed", "dir")} for run in load_runs(out)], run_counts(rows)
    models = []
    for run in trained:
        models.append({**run, "logn_length": 0})
        if read_run_config(run["dir"]).model.attention_logit_scaling == "none":
            logn = "logn" if run["condition"] == "none" else f"{run['condition']} + logn"
            models.append({**run, "condition": logn, "logn_length": run_data(Path(run["dir"]))[1]})
    return models, counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="experiments.context_rot", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quick", help="smoke | quick | full (configs/context_rot.py)")
    parser.add_argument("--out", default=None, help="output folder (default runs/context_rot_<preset>)")
    parser.add_argument("--checkpoint", default=None, help="evaluate this run directory instead of training")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained (then models evaluated) in parallel processes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every training run, e.g. --set steps=200")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out or f"runs/context_rot_{args.preset}")
    try:
        study = get_study(args.preset)
        if args.jobs < 1:  # checked here too: with --checkpoint no sweep runs to check it
            raise ConfigError(f"--jobs={args.jobs}: expected a positive number of parallel runs")
        if args.checkpoint and not Path(args.checkpoint).is_dir():
            raise RunError(f"--checkpoint {args.checkpoint}: not a directory")
        if args.checkpoint and args.overrides:
            raise ConfigError("--set changes training runs; with --checkpoint nothing is trained")
        models, counts = models_to_evaluate(args, study, out)
        if models:  # within and beyond are relative to the length the models trained on (--set may change it)
            study = dataclasses.replace(study, train_length=run_data(Path(models[0]["dir"]))[1])
        if not models:
            print(f"error: no run of the sweep finished; see {out / 'sweep.json'}", file=sys.stderr)
            return 1
        tasks = [(Path(m["dir"]), study, out / "evals" / f"{m['condition'].replace(' + ', '+')}_seed{m['seed']}.json",
                  m["logn_length"]) for m in models]
        if args.jobs > 1 and len(tasks) > 1:  # one model per process: evaluation is compile- and single-core-bound
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(evaluate, *zip(*tasks)))
        else:
            results = [evaluate(*task) for task in tasks]
        for model, rows in zip(models, results):
            model["rows"] = rows
    except (ConfigError, DataError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tables = {name: aggregate(models, name) for name in evals.EVALUATIONS}
    tables["effective_length"] = effective_lengths(tables, study.effective_fraction)
    for name, rows in tables.items():
        write_text(out / f"{name}.csv", to_csv(rows))
    figures = plots.make_figures(tables, study, out / "figures")
    learned = {row["condition"]: row for row in tables["niah"] if row["length"] == study.lengths[0]}
    in_distribution = {c: float(np.mean([r["accuracy"] for r in tables["niah"]
                                         if r["condition"] == c and r["length"] == study.lengths[0]]))
                       for c in learned}
    record = {**record_header("context_rot", args.preset, argv, time.perf_counter() - start),
              "jobs": args.jobs, "runs": counts, "checkpoint": args.checkpoint,
              "train_length": study.train_length, "lengths": list(study.lengths),
              "examples_per_cell": study.examples, "models": [{k: m[k] for k in ("condition", "seed", "dir", "logn_length")}
                                                              for m in models],
              "in_distribution_accuracy": in_distribution,
              "learned": {c: a >= study.learned_bar for c, a in in_distribution.items()},
              "learned_bar": study.learned_bar, "tables": tables,
              "figures": [str(Path(p).relative_to(out)) for p in figures]}
    write_json_atomic(out / "summary.json", record)
    write_report(out / "report.md", record, study)
    for condition, acc in in_distribution.items():
        print(f"{condition}: accuracy {acc:.3f} at length {study.lengths[0]} "
              f"({'learned' if acc >= study.learned_bar else 'NOT learned'}; bar {study.learned_bar})")
    print(f"wrote {out / 'summary.json'}, {out / 'report.md'} and {len(figures)} figures in "
          f"{record['wall_seconds']:.0f} s")
    if counts.get("failed"):
        print(f"error: {counts['failed']} run(s) failed; see {out / 'sweep.json'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
