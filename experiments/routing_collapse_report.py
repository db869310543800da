"""report.md of the routing-collapse study: the measured numbers in sentences, the papers' beside them.

Every number in the findings comes from `record` (summary.json); the published ones are quoted from
the papers (see ../shared/REFERENCES.md in the development notes) and marked as such.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PUBLISHED = """| source | setting | no balancing | with balancing |
|---|---|---|---|
| Shazeer et al. 2017, Table 6 | 256 experts, top-4, LM | CV(load) 3.01, max/mean 17.8, test PPL 39.8 | CV(load) 0.02-0.17, max/mean 1.07-1.47, PPL 35.6-35.7 (loss weights 0.1) |
| Fedus et al. (Switch) | top-1 | - | alpha = 1e-2 chosen from 1e-1 .. 1e-5; with the loss, dropped tokens typically < 1%; capacity 1.0 / 1.25 / 2.0 nearly flat in quality per step |
| Zoph et al. (ST-MoE) | router z-loss | - | coefficient 1e-3 keeps router logits small, quality not hurt |
| Wang et al. (DeepSeek, aux-loss-free) | 1B params | - | MaxVio 0.04 with the bias (u = 1e-3) vs 0.72 with alpha = 1e-3; PPL 9.50 vs 9.56; u = 1e-4 slow early, 1e-2 oscillates late |
"""

FIGURES = (
    ("1_expert_fraction_vs_step", "Token share of each expert against step (last MoE layer, seed 0)."),
    ("2_sorted_final_load", "Final per-expert load, sorted, with the uniform share."),
    ("3_balance_vs_step", "CV of load and max/mean load (MaxVio on the right axis) against step."),
    ("5_alpha_tradeoff", "MaxVio against validation loss for the Switch alphas and the bias rates."),
    ("6_capacity_factor", "Dropped-token fraction and validation loss against the capacity factor."),
    ("7_layer_expert_heatmap", "Layer x expert token share at the end of training."),
    ("8_routed_text", "A held-out text coloured by the expert each token went to, per layer."),
    ("9_router_entropy_logsumexp", "Router entropy and router logsumexp against step."),
)


def _mean(stats: dict[str, Any], name: str) -> float:
    return stats[name]["mean"]


def findings(record: dict[str, Any]) -> list[str]:
    conditions = record["conditions"]
    headline = conditions.get("headline", {})
    lines = []
    none = headline.get("none")
    if none:
        share, ratio = _mean(none, "max_share"), _mean(none, "max_share_x_uniform")
        uniform = share / ratio
        verdict = record["acceptance"]["none_collapses"]
        lines.append(
            f"**Without balancing the router collapses onto a few experts**: at the end of training the busiest "
            f"expert takes {100 * share:.0f}% of the tokens, {ratio:.1f}x the uniform {100 * uniform:.1f}% "
            f"(mean of {len(none['seeds'])} seed(s) and every MoE layer; the study's bar is > 2.5x: "
            f"{'met' if verdict['met'] else 'NOT met'}). CV(load) is {_mean(none, 'load_cv'):.2f} and max/mean load "
            f"per step {_mean(none, 'max_load'):.2f}.")
    for condition, stats in headline.items():
        if condition == "none":
            continue
        verdict = record["acceptance"].get(f"{condition} balances", {})
        lines.append(
            f"**{condition}**: max/mean load {_mean(stats, 'max_load'):.2f} (MaxVio {_mean(stats, 'max_violation'):.2f}, "
            f"CV(load) {_mean(stats, 'load_cv'):.2f}; bar < 2: {'met' if verdict.get('met') else 'NOT met'}), "
            f"validation loss {_mean(stats, 'val_loss'):.3f} ± {stats['val_loss']['std']:.3f}"
            + (f" against {_mean(none, 'val_loss'):.3f} ± {none['val_loss']['std']:.3f} without balancing." if none else "."))
    tradeoff = {**conditions.get("alpha", {}), **{c: s for c, s in headline.items() if c.split()[0] in ("switch", "bias")}}
    if tradeoff:
        points = "; ".join(f"{c}: MaxVio {_mean(s, 'max_violation'):.2f}, val loss {_mean(s, 'val_loss'):.3f}"
                           for c, s in sorted(tradeoff.items()))
        lines.append(f"**Trade-off** (figure 5): {points}.")
    capacity = conditions.get("capacity", {})
    if capacity:
        points = "; ".join(f"{c}: dropped {100 * _mean(s, 'dropped_fraction'):.1f}%, val loss {_mean(s, 'val_loss'):.3f}"
                           for c, s in capacity.items())
        lines.append(f"**Capacity factor** (figure 6, train = eval capacity): {points}.")
    spreads = [s["val_loss"]["std"] for s in headline.values() if len(s["seeds"]) > 1]
    if spreads:
        lines.append(f"Seed spread of the validation loss is up to {max(spreads):.3f} nats here: loss differences "
                     f"between conditions smaller than that are not resolved by this run.")
    return lines


def write_report(path: Path, record: dict[str, Any], table_md: str) -> None:
    figures = set(Path(f).stem for f in record["figures"])
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    parts = [
        f"# Routing collapse in sparse MoE: `{record['preset']}` preset\n",
        f"Command: `{record['command']}`. Wall time of this invocation: {record['wall_seconds']:.0f} s "
        f"(runs trained / reused / failed: {record['runs']['done']} / {record['runs']['reused']} / "
        f"{record['runs']['failed']}; {record['jobs']} job(s)). Versions: {versions}.\n",
        "## Findings (measured here)\n",
        *[f"- {line}" for line in findings(record)],
        "\n## Table (Shazeer et al. Table 6's columns; mean ± std over seeds, final 10% of steps)\n",
        table_md,
        "## Published numbers, for comparison\n",
        PUBLISHED,
        "## What a CPU-scale run can and cannot show\n",
        "- It can show the routing dynamics: whether the router piles tokens onto a few experts without a "
        "balancing term, how fast each remedy flattens the load, how many tokens a capacity factor drops, and "
        "how the router's entropy and logit scale move.\n"
        "- It cannot show the papers' quality differences: their gaps (e.g. 0.06 PPL at 1B parameters) come from "
        "billions of tokens through hundreds of experts; here a 2-layer, d=64 model sees a few hundred thousand "
        "tokens through 8 experts, so loss differences near the seed spread are noise, and absolute numbers "
        "(PPL, CV) are not comparable with the papers'. The noisy-gating condition uses both of Shazeer's "
        "losses at weight 0.1, his LM setting.\n",
        "## Figures\n",
        *[f"### {name.split('_', 1)[0]}. {caption}\n\n![{name}](figures/{name}.png)\n"
          for name, caption in FIGURES if name in figures],
        "The table (figure 4) is `table.csv` / `table.md`; every run's metrics and resolved config are under `runs/`.\n",
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
