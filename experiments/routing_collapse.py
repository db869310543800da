"""Routing collapse in sparse MoE and its remedies: one command from the sweep to figures and a report.

    python -m experiments.routing_collapse --preset smoke|quick|full [--out DIR] [--jobs N] [--set KEY=VALUE]

The sweep (configs/routing_collapse.py) trains small MoE LMs on the embedded corpus with no balancing,
the Switch loss, Shazeer's noisy gating and losses, the router z-loss, the auxiliary-loss-free bias and
several capacity factors. Running the command again reuses finished runs and resumes interrupted ones.
DIR receives runs/<hash>/ (each run's metrics, resolved config, checkpoints), sweep.json, summary.json,
table.csv / table.md (Shazeer Table 6's columns), figures/ (PNG + PDF) and report.md.

"Final" statistics average the last 10% of training steps. max share is the busiest expert's share of
that window's mean load; max/mean load and MaxVio are per step (Shazeer's and DeepSeek's definitions)
then averaged; both are averaged over the MoE layers.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from configs.routing_collapse import HEADLINE, NONE, get_sweep
from experiments import routing_collapse_plots as plots
from experiments.routing_collapse_report import write_report
from models.config import ConfigError
from research.cli import ArgumentParser
from research.data import DataError
from research.run_record import write_json_atomic
from research.study import record_header, seed_stats, write_text
from research.sweep import load_runs, run_counts, run_sweep

FINAL_FRACTION = 0.1  # the last 10% of steps make the "final" statistics
# Per-run statistics that the summary aggregates over seeds, in table order.
METRICS = ("val_loss", "val_ppl", "importance_cv", "load_cv", "max_share", "max_share_x_uniform", "max_load",
           "max_violation", "dropped_fraction", "router_entropy", "router_logsumexp")
BALANCED_MAX_LOAD = 2.0  # the study's bar for a remedy (max/mean load)
COLLAPSED_SHARE = 2.5  # ... and for collapse (busiest expert's share over the uniform share)


def analyse_run(run: dict[str, Any]) -> dict[str, Any]:
    """Curves and final statistics of one finished run (a `research.sweep.load_runs` entry)."""
    records = [m for m in run["metrics"] if "loss" in m]  # per-step training records
    layers = sorted({k.split("/")[1] for k in records[0] if k.startswith("moe/")}, key=lambda n: int(n.split("_")[-1]))
    window = records[-max(1, int(len(records) * FINAL_FRACTION)):]

    def series(rows: Sequence[dict[str, Any]], name: str) -> np.ndarray:
        """[steps, layers, ...] of one statistic."""
        return np.array([[row[f"moe/{layer}/{name}"] for layer in layers] for row in rows], float)

    final_fraction = series(window, "expert_fraction").mean(0)  # [layers, E]
    result = {key: run[key] for key in ("grid", "condition", "seed", "key", "dir")}
    result.update(
        layers=layers,
        curves={"step": np.array([m["step"] for m in records]),
                "expert_fraction": dict(zip(layers, np.moveaxis(series(records, "expert_fraction"), 1, 0))),
                **{name: series(records, name).mean(1) for name in
                   ("load_cv", "max_load", "router_entropy", "router_logsumexp")}},
        final_fraction=dict(zip(layers, final_fraction.tolist())),
        sorted_load=np.sort(final_fraction, axis=1)[:, ::-1].mean(0).tolist(),
        max_share=float(final_fraction.max(1).mean()),
        max_share_x_uniform=float(final_fraction.max(1).mean() * final_fraction.shape[1]),
        val_loss=run["summary"]["val_loss"], val_ppl=run["summary"]["val_ppl"],
        **{name: float(series(window, name).mean()) for name in
           ("importance_cv", "load_cv", "max_load", "max_violation", "dropped_fraction", "router_entropy",
            "router_logsumexp")})
    return result


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """grid -> condition -> metric -> mean, std (over seeds; 0 for one seed), min, max, and the seeds."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        out.setdefault(run["grid"], {}).setdefault(run["condition"], []).append(run)
    for grid, conditions in out.items():
        for condition, members in conditions.items():
            stats = {"seeds": sorted(r["seed"] for r in members)}
            stats.update({name: seed_stats([r[name] for r in members]) for name in METRICS})
            conditions[condition] = stats
    return out


def check_acceptance(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The study's bars on the headline grid: collapse without balancing, balance with each remedy."""
    headline = summary.get("headline", {})
    result: dict[str, Any] = {}
    if NONE in headline:
        share = headline[NONE]["max_share_x_uniform"]["mean"]
        result["none_collapses"] = {"max_share_x_uniform": share, "bar": COLLAPSED_SHARE, "met": share > COLLAPSED_SHARE}
    for condition, stats in headline.items():
        if condition != NONE:
            load = stats["max_load"]["mean"]
            result[f"{condition} balances"] = {"max_load": load, "bar": BALANCED_MAX_LOAD, "met": load < BALANCED_MAX_LOAD}
    return result


def table(summary: dict[str, dict[str, Any]], grid: str = "headline") -> tuple[str, str]:
    """Shazeer Table 6's columns for one grid, as (CSV, markdown); cells are mean ± std over seeds."""
    columns = ("val_loss", "val_ppl", "importance_cv", "load_cv", "max_load", "max_violation", "max_share")
    heads = ("condition", "seeds", "val loss", "val PPL", "CV(importance)", "CV(load)", "max/mean load", "MaxVio",
             "busiest expert share")
    rows = summary.get(grid, {})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["condition", "seeds", *[f"{c}_{s}" for c in columns for s in ("mean", "std")]])
    md = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for condition, stats in rows.items():
        writer.writerow([condition, len(stats["seeds"]),
                         *[f"{stats[c][s]:.4g}" for c in columns for s in ("mean", "std")]])
        md.append(f"| {condition} | {len(stats['seeds'])} | " + " | ".join(
            f"{stats[c]['mean']:.3g} ± {stats[c]['std']:.2g}" for c in columns) + " |")
    return buffer.getvalue(), "\n".join(md) + "\n"


def route_sample(run_dir: Path, num_tokens: int = 64) -> dict[str, Any]:
    """The expert each token of a held-out sequence goes to, per MoE layer, from the run's last checkpoint."""
    from models.transformer import Transformer
    from research.input_pipeline import build_datasets
    from research.runs import load_run, read_run_config

    model_cfg, params, tokenizer = load_run(run_dir)
    cfg = read_run_config(run_dir)  # the run's data config picks the held-out sequence
    _, _, val = build_datasets(cfg.data, model_cfg.vocab_size, cfg.seed)
    ids = next(val.eval_batches(1))[0, :num_tokens]
    _, state = Transformer(model_cfg).apply({"params": params}, ids[None], mutable=["intermediates"])
    # A token's text is what it adds to the decoded prefix; a byte-level token that ends mid-character
    # decodes to U+FFFD until the character completes, so those are dropped.
    texts = [tokenizer.decode(ids[:i].tolist()) for i in range(len(ids) + 1)]
    experts = {name: np.asarray(block["moe"]["experts"][0])[0, :, 0].tolist()  # top-1 choice, [T]
               for name, block in sorted(state["intermediates"].items(), key=lambda kv: int(kv[0].split("_")[-1]))
               if "moe" in block}  # every block also sows its attention probe; dense blocks have no router
    return {"pieces": [b[len(os.path.commonprefix([a, b])):].replace("\ufffd", "") for a, b in zip(texts, texts[1:])],
            "experts": experts, "num_experts": model_cfg.moe.num_experts}


def make_figures(runs: Sequence[dict[str, Any]], out: Path) -> list[str]:
    by_grid: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_grid.setdefault(run["grid"], []).append(run)
    headline = by_grid.get("headline", [])
    paths: list[str] = []
    if headline:
        paths += plots.expert_fractions_vs_step(headline, out)
        paths += plots.sorted_final_load(headline, out)
        paths += plots.balance_vs_step(headline, out)
        paths += plots.alpha_tradeoff(headline + by_grid.get("alpha", []), out)
        paths += plots.layer_expert_heatmap(headline, out)
        samples = {run["condition"]: route_sample(Path(run["dir"])) for run in plots.first_seed(headline).values()
                   if run["condition"] in (NONE, HEADLINE[1][0])}
        paths += plots.routed_text(samples, out)
        paths += plots.router_health_vs_step(headline, out)
    if by_grid.get("capacity"):
        paths += plots.capacity_effect([r for r in by_grid["capacity"] if r["seed"] == 0],
                                       [r for r in headline if r["seed"] == 0], out)
    return paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="experiments.routing_collapse", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quick", help="smoke | quick | full (configs/routing_collapse.py)")
    parser.add_argument("--out", default=None, help="output folder (default runs/routing_collapse_<preset>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every run, e.g. --set steps=200")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out or f"runs/routing_collapse_{args.preset}")
    try:
        sweep = get_sweep(args.preset)
        rows = run_sweep(sweep, out, args.jobs, args.overrides, progress=not args.no_progress)
    except (ConfigError, DataError) as err:  # a bad preset or override; data the runs cannot use
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = [analyse_run(run) for run in load_runs(out)]
    if not runs:
        print(f"error: no run of the sweep finished; see {out / 'sweep.json'}", file=sys.stderr)
        return 1
    summary = summarize(runs)
    acceptance = check_acceptance(summary)
    figures = make_figures(runs, out / "figures")
    csv_text, md_text = table(summary)
    for name, text in (("table.csv", csv_text), ("table.md", md_text)):
        write_text(out / name, text)
    record = {**record_header("routing_collapse", args.preset, argv, time.perf_counter() - start), "jobs": args.jobs,
              "runs": run_counts(rows), "acceptance": acceptance,
              "conditions": summary, "figures": [str(Path(p).relative_to(out)) for p in figures]}
    write_json_atomic(out / "summary.json", record)
    write_report(out / "report.md", record, md_text)
    print(md_text)
    for name, verdict in acceptance.items():
        print(f"{'met' if verdict['met'] else 'NOT met'}: {name} {verdict}")
    print(f"wrote {out / 'summary.json'}, {out / 'report.md'} and {len(figures)} figures in "
          f"{record['wall_seconds']:.0f} s ({record['runs']})")
    failed = record["runs"]["failed"]
    if failed:
        print(f"error: {failed} run(s) failed; see {out / 'sweep.json'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
