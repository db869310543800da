"""Figures of the context-rot study (experiments/context_rot.py), one function per figure.

Each takes the aggregated rows of one evaluation (seed means `X` and error bars `X_err`) and writes PNG + PDF
through research/study.py. Lengths beyond the training length test length generalisation, not context rot,
so every figure with a length axis separates them: a grey band (line plots) or a labelled line (heatmap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from configs.context_rot import Study
from research.study import save_figure as save

Row = dict[str, Any]
LINESTYLES = ("-", "--", ":", "-.")
ANNOTATE_CELLS = 100  # heatmaps with more cells than this are too dense to print the values in


def select(rows: Sequence[Row], **where: Any) -> list[Row]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def ordered(rows: Sequence[Row], column: str) -> list:
    """The column's distinct values: conditions in the order they first appear, numbers sorted."""
    values = list(dict.fromkeys(r[column] for r in rows))
    return values if isinstance(values[0], str) else sorted(values)


def errorbar(ax, rows: Sequence[Row], x: str, y: str, **style: Any) -> None:
    rows = sorted(rows, key=lambda r: r[x])
    ax.errorbar([r[x] for r in rows], [r[y] for r in rows], yerr=[r[f"{y}_err"] for r in rows], marker="o",
                markersize=3, capsize=2, linewidth=1.2, **style)


def length_axis(ax, lengths: Sequence[int], train_length: int) -> None:
    """log2 x axis ticked at the tested lengths, with the lengths beyond the training length shaded."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths], fontsize=7)
    ax.minorticks_off()
    lo, hi = lengths[0] / 1.4, lengths[-1] * 1.4
    beyond = [n for n in lengths if n > train_length]
    if beyond:
        within = [n for n in lengths if n <= train_length]
        # Halfway (in log space) between the last length within and the first beyond: neither sits on the edge.
        start = np.sqrt(within[-1] * beyond[0]) if within else lo
        ax.axvspan(start, hi, color="0.88", zorder=0, label="beyond trained length")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("context length (tokens)")


def style_legend(ax, colours: dict[str, str], styles: dict[str, str], **kwargs: Any) -> None:
    """One legend for two encodings: colour (solid lines) and line style (grey lines), plus the grey band."""
    handles = [Line2D([], [], color=c, label=label) for label, c in colours.items()]
    handles += [Line2D([], [], color="0.4", linestyle=s, label=label) for label, s in styles.items()]
    handles += [h for h, label in zip(*ax.get_legend_handles_labels()) if label == "beyond trained length"]
    ax.legend(handles=handles, fontsize=7, **kwargs)


def niah_heatmap(rows: Sequence[Row], study: Study, out: Path) -> list[str]:
    """Figure 1: accuracy over context length x needle depth, one panel per condition (Kamradt's layout)."""
    conditions, lengths, depths = ordered(rows, "condition"), ordered(rows, "length"), ordered(rows, "depth")
    fig, axes = plt.subplots(1, len(conditions), figsize=(1.2 + 0.55 * len(lengths) * len(conditions),
                                                          1.2 + 0.28 * len(depths)),
                             squeeze=False, layout="constrained")
    within = sum(n <= study.train_length for n in lengths)
    for ax, condition in zip(axes[0], conditions):
        grid = np.full((len(depths), len(lengths)), np.nan)  # a missing cell stays blank
        for r in select(rows, condition=condition):
            grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        if grid.size <= ANNOTATE_CELLS:
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
        if within < len(lengths):
            ax.axvline(within - 0.5, color="k", linewidth=2.5)
            ax.text(within - 0.5, -0.6, "trained length", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}" for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(condition, fontsize=9, pad=14)
    axes[0, 0].set_ylabel("needle depth (% of the context)")
    fig.colorbar(image, ax=axes[0], label="accuracy (mean over seeds)")
    fig.suptitle(f"Needle in a haystack (trained at {study.train_length} tokens)", fontsize=10)
    return save(fig, out, "1_niah_heatmap")


def distractors(rows: Sequence[Row], study: Study, out: Path) -> list[str]:
    """Figure 2: accuracy against length per distractor count; which value the wrong answers gave."""
    conditions, counts = ordered(rows, "condition"), ordered(rows, "distractors")
    fig, (ax, ax_bar) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    colours = {f"{c} distractors": f"C{i}" for i, c in enumerate(counts)}
    styles = {condition: LINESTYLES[i % len(LINESTYLES)] for i, condition in enumerate(conditions)}
    for condition in conditions:
        for count, colour in zip(counts, colours.values()):
            errorbar(ax, select(rows, condition=condition, distractors=count), "length", "accuracy", color=colour,
                     linestyle=styles[condition])
    length_axis(ax, ordered(rows, "length"), study.train_length)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("accuracy (mean ± error over seeds)")
    style_legend(ax, colours, styles)
    sources = ("near_miss", "stale", "other")
    x, ticks = 0, []
    for condition in conditions:
        start = x
        for count in counts:
            wrong = {s: sum(r[f"answered_{s}"] for r in select(rows, condition=condition, distractors=count))
                     for s in sources}
            total, bottom = sum(wrong.values()), 0.0
            for i, source in enumerate(sources):
                share = wrong[source] / total if total else 0.0
                ax_bar.bar(x, share, bottom=bottom, color=f"C{i + 4}", label=source if x == 0 else None)
                bottom += share
            # The count behind each bar: a share of 2 wrong answers says little.
            ax_bar.text(x, 1.01, f"{total:.0f}", ha="center", va="bottom", fontsize=6)
            ticks.append((x, str(count)))
            x += 1
        ax_bar.text((start + x - 1) / 2, 1.01, condition, ha="center", va="bottom", fontsize=8,
                    transform=ax_bar.get_xaxis_transform())
        x += 1  # a gap between conditions
    ax_bar.set_xticks(*zip(*ticks), fontsize=7)
    ax_bar.set_ylim(0, 1.1)
    ax_bar.set_ylabel("share of the wrong answers (all lengths)")
    ax_bar.set_xlabel("distractors, per condition (above a bar: its wrong answers, summed seed means)")
    ax_bar.legend(title="answered value", fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle("Distractors: accuracy (left) and where the wrong answers came from (right)", fontsize=10)
    return save(fig, out, "2_distractors")


def lost_in_the_middle(rows: Sequence[Row], study: Study, out: Path) -> list[str]:
    """Figure 3: accuracy against the gold fact's position, one panel per k, closed-book and oracle lines."""
    context = select(rows, setting="context")
    conditions, items = ordered(rows, "condition"), ordered(context, "items")
    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 3.4), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, k in zip(axes[0], items):
        cells = select(context, items=k)
        for i, condition in enumerate(conditions):
            errorbar(ax, select(cells, condition=condition), "position", "accuracy", color=f"C{i}", label=condition)
            for setting, style in (("closed_book", "--"), ("oracle", ":")):
                for r in select(rows, condition=condition, setting=setting):
                    ax.axhline(r["accuracy"], color=f"C{i}", linestyle=style, linewidth=1)
                    ax.axhspan(r["accuracy"] - r["accuracy_err"], r["accuracy"] + r["accuracy_err"], color=f"C{i}",
                               alpha=0.08, linewidth=0)
        length = cells[0]["length"]
        where = "within" if length <= study.train_length else "BEYOND"
        ax.set_title(f"k = {k} facts, {length} tokens ({where} trained length {study.train_length})", fontsize=8)
        ax.set_xticks(ordered(cells, "position"))
        ax.set_xlabel("position of the gold fact (1 = first)")
    axes[0, 0].set_ylim(-0.03, 1.03)
    axes[0, 0].set_ylabel("accuracy (mean ± error over seeds)")
    style_legend(axes[0, 0], {c: f"C{i}" for i, c in enumerate(conditions)},
                 {"closed-book": "--", "oracle": ":"})
    fig.suptitle("Lost in the middle: accuracy by the gold fact's position among k facts", fontsize=10)
    return save(fig, out, "3_lost_in_the_middle")


def dilution(rows: Sequence[Row], study: Study, out: Path) -> list[str]:
    """Figure 4: needle attention mass and attention entropy per layer, and accuracy, against length."""
    conditions, layers, lengths = ordered(rows, "condition"), ordered(rows, "layer"), ordered(rows, "length")
    styles = {condition: LINESTYLES[i % len(LINESTYLES)] for i, condition in enumerate(conditions)}
    colours = {f"layer {layer}": f"C{layer}" for layer in layers}
    fig, (ax_mass, ax_entropy, ax_acc) = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    for condition in conditions:
        for layer in layers:
            cells = select(rows, condition=condition, layer=layer)
            for ax, column in ((ax_mass, "needle_mass"), (ax_entropy, "entropy")):
                errorbar(ax, cells, "length", column, color=f"C{layer}", linestyle=styles[condition])
        # Accuracy is the same for every layer's row: draw it once.
        errorbar(ax_acc, select(rows, condition=condition, layer=layers[0]), "length", "accuracy", color="k",
                 linestyle=styles[condition])
    ax_entropy.plot(lengths, np.log(lengths), color="0.5", linewidth=3, alpha=0.6, label="log n (uniform)")
    for ax, label in ((ax_mass, "(a) attention mass on the needle"), (ax_entropy, "(b) attention entropy (nats)"),
                      (ax_acc, "(c) accuracy")):
        length_axis(ax, lengths, study.train_length)
        ax.set_ylabel(label)
    ax_mass.set_ylim(bottom=0)
    ax_acc.set_ylim(-0.03, 1.03)
    style_legend(ax_mass, colours, styles)
    ax_entropy.legend(fontsize=7)
    style_legend(ax_acc, {}, styles)
    fig.suptitle("Attention dilution: the answering query's attention, mean over heads and episodes", fontsize=10)
    return save(fig, out, "4_attention_dilution")


def haystack_similarity(rows: Sequence[Row], study: Study, out: Path) -> list[str]:
    """Figure 5: coherent vs shuffled haystack x same vs paraphrased needle, one panel per condition."""
    conditions = ordered(rows, "condition")
    colours, styles = {"coherent": "C0", "shuffled": "C1"}, {"same": "-", "paraphrase": "--"}
    fig, axes = plt.subplots(1, len(conditions), figsize=(4.5 * len(conditions), 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, condition in zip(axes[0], conditions):
        for haystack, colour in colours.items():
            for needle, style in styles.items():
                errorbar(ax, select(rows, condition=condition, haystack=haystack, needle=needle), "length", "accuracy",
                         color=colour, linestyle=style)
        length_axis(ax, ordered(rows, "length"), study.train_length)
        ax.set_title(condition, fontsize=9)
    axes[0, 0].set_ylim(-0.03, 1.03)
    axes[0, 0].set_ylabel("accuracy (mean ± error over seeds)")
    style_legend(axes[0, 0], {f"{h} haystack": c for h, c in colours.items()},
                 {f"{n} needle wording": s for n, s in styles.items()})
    fig.suptitle("Haystack structure and needle-question similarity", fontsize=10)
    return save(fig, out, "5_haystack_similarity")


def effective_length(rows: Sequence[Row], study: Study, out: Path) -> list[str]:
    """Figure 6: RULER's effective length of every curve, with the training length."""
    conditions = ordered(rows, "condition")
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.24 * len(rows)), layout="constrained")
    top = max(study.lengths)
    for y, r in enumerate(rows):
        n = r["effective_length"]
        ax.barh(y, n, color=f"C{conditions.index(r['condition'])}")
        # 0: the curve is already below the threshold at the shortest length; the longest tested is a lower bound.
        label = "0 (fails at the shortest length)" if n == 0 else (f">= {n}" if n >= top else str(n))
        ax.text(n, y, f" {label}", va="center", fontsize=7)
    ax.axvline(study.train_length, color="k", linestyle="--", linewidth=1.2, label="trained length")
    ax.axvspan(study.train_length, top * 1.25, color="0.88", zorder=0, label="beyond trained length")
    ax.set_yticks(range(len(rows)), [f"{r['condition']} | {r['curve']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xticks(study.lengths, [str(n) for n in study.lengths], fontsize=7)
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel(f"effective length (tokens): longest length scoring >= {study.effective_fraction:g} x the "
                  "shortest length's accuracy")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Effective context length (RULER's definition, relative threshold)", fontsize=10)
    return save(fig, out, "6_effective_length")


FIGURES = (("niah", niah_heatmap), ("distractors", distractors), ("lost_in_the_middle", lost_in_the_middle),
           ("dilution", dilution), ("haystack_similarity", haystack_similarity),
           ("effective_length", effective_length))


def make_figures(tables: dict[str, list[Row]], study: Study, out: Path) -> list[str]:
    """Every figure whose table has rows; returns the PNG paths."""
    return [path for name, figure in FIGURES if tables.get(name) for path in figure(tables[name], study, out)]
