"""Figures of the routing-collapse study (experiments/routing_collapse.py), one function per figure.

Each takes the analysed runs (dicts from `routing_collapse.analyse_run`) and writes PNG + PDF into a
folder, through a temp file and a rename so that an interrupted study never leaves half a figure.
Curves are smoothed with a trailing moving average (per-step routing statistics are noisy at batch 16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np

from research.study import save_figure as save

Run = dict[str, Any]
SMOOTH = 10  # steps in the moving average of the curves


def smooth(y: np.ndarray, window: int = SMOOTH) -> np.ndarray:
    """Trailing mean over up to `window` points along axis 0 (the first points average what exists)."""
    y = np.asarray(y, float)
    c = np.cumsum(np.concatenate([np.zeros((1,) + y.shape[1:]), y]), axis=0)
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo).reshape((-1,) + (1,) * (y.ndim - 1))


def first_seed(runs: Sequence[Run]) -> dict[str, Run]:
    """One run per condition (the lowest seed), in the order the conditions first appear."""
    chosen: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        chosen.setdefault(run["condition"], run)
    order = list(dict.fromkeys(r["condition"] for r in runs))
    return {c: chosen[c] for c in order}


def grid_of_axes(n: int, width: float = 3.6, height: float = 2.6, cols: int = 4):
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharex=True,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def expert_fractions_vs_step(runs: Sequence[Run], out: Path) -> list[str]:
    """Figure 1: stacked per-expert token fractions against step, last MoE layer, one panel per condition."""
    chosen = first_seed(runs)
    fig, axes = grid_of_axes(len(chosen))
    for ax, (condition, run) in zip(axes, chosen.items()):
        layer = run["layers"][-1]
        fractions = smooth(run["curves"]["expert_fraction"][layer])  # [steps, E]
        ax.stackplot(run["curves"]["step"], fractions.T, linewidth=0)
        ax.set_title(condition, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
    axes[0].set_ylabel(f"fraction of tokens per expert\n({runs[0]['layers'][-1]})")
    fig.suptitle("Token share of each expert during training (seed 0; colours = experts)", fontsize=10)
    return save(fig, out, "1_expert_fraction_vs_step")


def sorted_final_load(runs: Sequence[Run], out: Path) -> list[str]:
    """Figure 2: final per-expert load, sorted, averaged over layers and seeds, with the uniform share."""
    conditions = list(dict.fromkeys(r["condition"] for r in runs))
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    num_experts = len(runs[0]["sorted_load"])
    ranks = np.arange(1, num_experts + 1)
    for condition in conditions:
        loads = np.array([r["sorted_load"] for r in runs if r["condition"] == condition])
        ax.plot(ranks, loads.mean(0), marker="o", label=f"{condition} (n={len(loads)})")
    ax.axhline(1 / num_experts, color="k", linestyle="--", linewidth=1, label="uniform 1/E")
    ax.set_xlabel("expert rank (busiest first)")
    ax.set_ylabel("fraction of tokens (final 10% of steps)")
    ax.set_xticks(ranks)
    ax.legend(fontsize=8)
    ax.set_title("Final expert load, sorted (mean over layers and seeds)", fontsize=10)
    return save(fig, out, "2_sorted_final_load")


def curve_pair(runs: Sequence[Run], left: tuple[str, str], right: tuple[str, str], title: str):
    """Two panels of per-step curves (mean over layers, seed 0), one line per condition.

    left/right: (curve name in run["curves"], y label). Returns (fig, left axes, right axes).
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    for condition, run in first_seed(runs).items():
        for ax, (name, _) in zip(axes, (left, right)):
            ax.plot(run["curves"]["step"], smooth(run["curves"][name]), label=condition)
    for ax, (_, label) in zip(axes, (left, right)):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    return fig, axes[0], axes[1]


def balance_vs_step(runs: Sequence[Run], out: Path) -> list[str]:
    """Figure 3: CV of load and max/mean load (MaxVio on the right axis) against step."""
    fig, ax_cv, ax_max = curve_pair(runs, ("load_cv", "CV of expert load"), ("max_load", "max / mean load"),
                                    "Load balance during training (seed 0, mean over layers)")
    ax_max.axhline(1, color="k", linestyle="--", linewidth=1)
    ax_max.secondary_yaxis("right", functions=(lambda x: x - 1, lambda x: x + 1)).set_ylabel("MaxVio")
    ax_cv.set_ylim(bottom=0)
    ax_max.set_ylim(bottom=0)
    ax_cv.legend(fontsize=8)
    return save(fig, out, "3_balance_vs_step")


def alpha_tradeoff(runs: Sequence[Run], out: Path) -> list[str]:
    """Figure 5: MaxVio against validation loss, one point per run: Switch alphas, bias rates, none."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    styles = {"switch": ("o", "C0"), "bias": ("s", "C3"), "none": ("x", "k")}
    seen = set()
    for run in runs:
        kind = run["condition"].split()[0]
        if kind not in styles:
            continue
        marker, color = styles[kind]
        ax.scatter(run["val_loss"], run["max_violation"], marker=marker, color=color,
                   label=None if kind in seen else {"switch": "Switch loss (alpha)", "bias": "aux-free bias (u)",
                                                     "none": "no balancing"}[kind])
        seen.add(kind)
        if kind != "none":
            ax.annotate(run["condition"].split()[1], (run["val_loss"], run["max_violation"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("validation loss (nats/token)")
    ax.set_ylabel("MaxVio (final 10% of steps, mean over layers)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Balance vs quality: Switch alpha and the bias rate u", fontsize=10)
    return save(fig, out, "5_alpha_tradeoff")


def capacity_effect(runs: Sequence[Run], dropless: Sequence[Run], out: Path) -> list[str]:
    """Figure 6: dropped fraction and validation loss against the capacity factor (dropless at the right)."""
    fig, (ax_drop, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for base in dict.fromkeys(r["condition"].split(",")[0] for r in runs):
        points = []
        for run in runs:
            name, _, capacity = run["condition"].partition(",capacity ")
            if name == base:
                points.append((float(capacity), run["dropped_fraction"], run["val_loss"]))
        points += [(np.inf, r["dropped_fraction"], r["val_loss"]) for r in dropless if r["condition"] == base]
        points.sort()
        labels = ["dropless" if np.isinf(p[0]) else f"{p[0]:g}" for p in points]
        x = np.arange(len(points))
        ax_drop.plot(x, [p[1] for p in points], marker="o", label=base)
        ax_loss.plot(x, [p[2] for p in points], marker="o", label=base)
        for ax in (ax_drop, ax_loss):
            ax.set_xticks(x, labels)
    ax_drop.set_ylabel("dropped token fraction (train, final 10%)")
    ax_loss.set_ylabel("validation loss")
    for ax in (ax_drop, ax_loss):
        ax.set_xlabel("capacity factor (train = eval)")
        ax.legend(fontsize=8)
    fig.suptitle("Capacity factor: dropped tokens and loss (seed 0)", fontsize=10)
    return save(fig, out, "6_capacity_factor")


def layer_expert_heatmap(runs: Sequence[Run], out: Path) -> list[str]:
    """Figure 7: token share of each expert in each layer (final 10% of steps), one panel per condition."""
    chosen = first_seed(runs)
    fig, axes = grid_of_axes(len(chosen), width=3.4, height=1.2 + 0.4 * len(runs[0]["layers"]))
    for ax, (condition, run) in zip(axes, chosen.items()):
        share = np.array([run["final_fraction"][layer] for layer in run["layers"]])
        image = ax.imshow(share, vmin=0, vmax=max(0.5, share.max()), cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(run["layers"])), run["layers"], fontsize=7)
        ax.set_xticks(range(share.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(condition, fontsize=9)
    fig.colorbar(image, ax=axes, label="token share")
    fig.suptitle("Layer x expert token share (seed 0)", fontsize=10)
    return save(fig, out, "7_layer_expert_heatmap")


def routed_text(samples: dict[str, dict[str, Any]], out: Path, width: int = 80) -> list[str]:
    """Figure 8: a held-out text with each token's background coloured by its expert, per layer.

    samples: condition -> {"pieces": [str], "experts": {layer: [expert id per token]}, "num_experts": E}.
    """
    rows = []
    for condition, sample in samples.items():
        for layer, experts in sample["experts"].items():
            rows.append((f"{condition} / {layer}", sample["pieces"], experts, sample["num_experts"]))
    lines_per_row = [2 + sum(len(p) for p in pieces) // width for _, pieces, _, _ in rows]
    char = 0.6 * 8 / 72  # inches per character of an 8-point monospace font
    margin = 0.2
    fig = plt.figure(figsize=(width * char + 2 * margin, 0.2 * sum(lines_per_row) + 0.4))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    total = sum(lines_per_row) + 1
    line = 0.5
    for title, pieces, experts, num_experts in rows:
        cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20")
        ax.text(0.01, 1 - line / total, title, fontsize=8, weight="bold", va="center", transform=ax.transAxes)
        line += 1
        col = 0
        for piece, expert in zip(pieces, experts):
            text = piece.replace("\n", " ")
            if col + len(text) > width:
                line, col = line + 1, 0
            ax.text((margin + col * char) / (width * char + 2 * margin), 1 - line / total, text, family="monospace", fontsize=8,
                    va="center", transform=ax.transAxes,
                    bbox={"facecolor": cmap(expert % cmap.N), "alpha": 0.55, "pad": 0.05, "edgecolor": "none"})
            col += len(text)
        line += 1
    return save(fig, out, "8_routed_text")


def router_health_vs_step(runs: Sequence[Run], out: Path) -> list[str]:
    """Figure 9: router entropy and router logsumexp against step."""
    fig, ax_h, _ = curve_pair(runs, ("router_entropy", "router entropy (nats)"),
                              ("router_logsumexp", "router logsumexp"),
                              "Router entropy and logit scale during training (seed 0, mean over layers)")
    ax_h.axhline(np.log(len(runs[0]["sorted_load"])), color="k", linestyle="--", linewidth=1, label="log E (uniform)")
    ax_h.legend(fontsize=8)
    return save(fig, out, "9_router_entropy_logsumexp")
