"""report.md of the context-rot study: the measured numbers in sentences, the papers' beside them.

Every number in the findings comes from `record` (summary.json). Findings are written only for conditions
that learned the task (in-distribution accuracy at the shortest length at least the study's bar): the
length behaviour of a model that cannot retrieve at all says nothing about context rot. A difference is
called resolved only when it exceeds its error bar (the two errors added in quadrature).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from configs.context_rot import Study
from research.study import write_text

Row = dict[str, Any]

PUBLISHED = """- **Needle in a haystack** (Kamradt 2023): one fact hidden in essays at every context length x depth,
  retrieval accuracy as a heatmap; the GPT-4-128K run was a 15 x 15 grid.
- **Lost in the Middle** (Liu et al. 2023), GPT-3.5-Turbo, 20 documents: accuracy 75.8 / 57.2 / 53.8 / 55.4 /
  63.2% with the answer's document at position 1 / 5 / 10 / 15 / 20 (a U); closed-book 56.1%, oracle 88.3%.
- **Context Rot** (Hong, Troynikov, Huber 2025, Chroma), 18 models: lower needle-question similarity degrades
  faster with length; one distractor hurts, four hurt more; a shuffled haystack beat the coherent one for
  all 18 models.
- **RULER** (Hsieh et al. 2024): effective length = the longest length scoring above a threshold, Llama-2-7B's
  85.6% at 4K; GPT-4 claims 128K and has an effective 64K.
- **log-n scaling** (Chiang & Cholak 2022): scaling attention logits by log n let a 2-layer model trained at
  n <= 50 generalise to n = 1000. Qwen multiplies by log_{L_train}(n) past L_train. Scalable-Softmax
  (arXiv 2501.19399) learns s in s * log n.

No tiny-model reference exists for any of these: the numbers above are frontier models on natural-language
tasks, ours are new measurements on a small model trained here on a synthetic task, not replications.
"""

FIGURES = (
    ("1_niah_heatmap", "Accuracy over context length x needle depth, per condition."),
    ("2_distractors", "Accuracy against length per distractor count; the values the wrong answers gave."),
    ("3_lost_in_the_middle", "Accuracy against the gold fact's position among k facts, closed-book and oracle."),
    ("4_attention_dilution", "Needle attention mass and attention entropy per layer, and accuracy, against length."),
    ("5_haystack_similarity", "Coherent vs shuffled haystack x needle worded like the question or paraphrased."),
    ("6_effective_length", "RULER's effective length of every curve, with the training length."),
)
CSVS = ("niah", "distractors", "lost_in_the_middle", "dilution", "haystack_similarity", "effective_length")


def select(rows: Sequence[Row], **where: Any) -> list[Row]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def pooled(rows: Sequence[Row], column: str = "accuracy") -> tuple[float, float]:
    """Mean of the cells' means and its error (the cells' errors taken as independent)."""
    errors = np.array([r.get(f"{column}_err", 0.0) for r in rows])
    return float(np.mean([r[column] for r in rows])), float(np.sqrt((errors ** 2).sum()) / len(rows))


def fmt(value: tuple[float, float]) -> str:
    return f"{value[0]:.2f} ± {value[1]:.2f}"


def verdict(a: tuple[float, float], b: tuple[float, float], expected: str) -> str:
    """Whether `a` > `b` (the published direction) replicated, given the error bars."""
    if abs(a[0] - b[0]) <= np.hypot(a[1], b[1]):
        return "not resolved (the difference is within the error bars)"
    return f"{expected}: replicated" if a[0] > b[0] else f"{expected}: did not replicate (the opposite direction)"


def niah(rows: Sequence[Row], trained: int) -> str:
    within, beyond = [r for r in rows if r["length"] <= trained], [r for r in rows if r["length"] > trained]
    depths = sorted({r["depth"] for r in within})
    worst = min(depths, key=lambda d: pooled(select(within, depth=d))[0])
    text = (f"NIAH (figure 1): accuracy {fmt(pooled(within))} within the trained length (mean over lengths and "
            f"depths; worst depth {100 * worst:.0f}% at {fmt(pooled(select(within, depth=worst)))})")
    return text + (f" and {fmt(pooled(beyond))} beyond it." if beyond else "; no longer length was tested.")


def distractors(rows: Sequence[Row], trained: int) -> str:
    within = [r for r in rows if r["length"] <= trained]
    counts = sorted({r["distractors"] for r in within})
    accuracy = {c: pooled(select(within, distractors=c)) for c in counts}
    none, most = accuracy[counts[0]], accuracy[counts[-1]]
    text = (f"Distractors (figure 2), within the trained length: accuracy "
            + ", ".join(f"{fmt(a)} with {c}" for c, a in accuracy.items())
            + f"; from {counts[0]} to {counts[-1]} distractors it moves by {most[0] - none[0]:+.2f}"
            + f" ({verdict(none, most, 'distractors hurt, as Chroma found')}).")
    wrong = {s: sum(r[f"answered_{s}"] for r in within if r["distractors"] > 0)
             for s in ("near_miss", "stale", "other")}
    total = sum(wrong.values())
    if not total:
        return text + " No answer was wrong with distractors present."
    names = {"near_miss": "the near-miss key's value", "stale": "the stale value", "other": "neither"}
    shares = ", ".join(f"{names[s]} {100 * v / total:.0f}%" for s, v in wrong.items())
    return text + (f" Of the wrong answers with distractors, most gave {names[max(wrong, key=wrong.get)]} "
                   f"({shares}).")


def lost_in_the_middle(rows: Sequence[Row]) -> list[str]:
    lines = []
    for k in sorted({r["items"] for r in select(rows, setting="context")}):
        cells = sorted(select(rows, setting="context", items=k), key=lambda r: r["position"])
        accs = ", ".join(f"{r['accuracy']:.2f} at {r['position']}" for r in cells)
        if len(cells) < 3:
            lines.append(f"Lost in the middle (figure 3), k = {k} facts: {accs}; only the first and last positions "
                         "were measured, so no U can be tested.")
            continue
        # A U: the worse end above the best middle position, by more than their error bars.
        end = min(cells[0], cells[-1], key=lambda r: r["accuracy"])
        middle = max(cells[1:-1], key=lambda r: r["accuracy"])
        gap = end["accuracy"] - middle["accuracy"]
        if gap > np.hypot(end["accuracy_err"], middle["accuracy_err"]):
            shape = "first and last above every middle position: the published U-shape replicated"
        elif gap > 0:
            shape = "first and last above the middle ones, but within the error bars: a U is not resolved"
        else:
            shape = ("the first and last positions are not both above the middle ones: the published U-shape did "
                     "not replicate")
        lines.append(f"Lost in the middle (figure 3), k = {k} facts ({cells[0]['length']} tokens): {accs}; {shape}.")
    book, oracle = select(rows, setting="closed_book"), select(rows, setting="oracle")
    if book and oracle:
        context = [r["accuracy"] for r in select(rows, setting="context")]
        between = book[0]["accuracy"] <= min(context) and max(context) <= oracle[0]["accuracy"]
        lines.append(f"Closed-book {fmt(pooled(book))} (a random value cannot be guessed: near 0 is expected) and "
                     f"oracle {fmt(pooled(oracle))}; every position {'lies' if between else 'does NOT lie'} "
                     "between the two.")
    return lines


def dilution(rows: Sequence[Row]) -> list[str]:
    lengths = sorted({r["length"] for r in rows})
    lo, hi = lengths[0], lengths[-1]
    lines = []
    for layer in sorted({r["layer"] for r in rows}):
        a, b = select(rows, layer=layer, length=lo)[0], select(rows, layer=layer, length=hi)[0]
        lines.append(f"Dilution (figure 4), layer {layer}: needle attention mass {a['needle_mass']:.3f} at {lo} tokens "
                     f"and {b['needle_mass']:.3f} at {hi}; entropy rises {b['entropy'] - a['entropy']:+.2f} nats "
                     f"while log(length) rises {np.log(hi / lo):.2f} (uniform attention would follow it exactly).")
    return lines


def scalings_beyond(tables: dict[str, list[Row]], conditions: Sequence[str], trained: int) -> str | None:
    """How logit scaling compares with none beyond the trained length (NIAH accuracy, last layer's mass)."""
    beyond = [r for r in tables["niah"] if r["length"] > trained]
    if not beyond or len(conditions) < 2:
        return None
    dilution = tables["dilution"]
    last = max(r["layer"] for r in dilution) if dilution else None
    parts = []
    for c in conditions:
        mass = [r for r in select(dilution, condition=c, layer=last) if r["length"] > trained]
        parts.append(f"{c} {fmt(pooled(select(beyond, condition=c)))}"
                     + (f" (last layer's needle mass {pooled(mass, 'needle_mass')[0]:.3f})" if mass else ""))
    text = "Beyond the trained length, NIAH accuracy: " + "; ".join(parts) + "."
    if "none" not in conditions:
        return text + " No comparison with `none`: it did not learn the task (or was not run)."
    base = pooled(select(beyond, condition="none"))
    claim = "logit scaling helps, as Chiang & Cholak found"
    return text + "".join(f" {c} vs none: {verdict(pooled(select(beyond, condition=c)), base, claim)}."
                          for c in conditions if c != "none")


def haystack(rows: Sequence[Row], trained: int) -> list[str]:
    within = [r for r in rows if r["length"] <= trained]
    coherent, shuffled = pooled(select(within, haystack="coherent")), pooled(select(within, haystack="shuffled"))
    lines = [f"Haystack (figure 5), within the trained length: coherent {fmt(coherent)}, shuffled {fmt(shuffled)}; "
             f"{verdict(shuffled, coherent, 'shuffled beat coherent, as for all 18 Chroma models')}."]
    lengths = sorted({r["length"] for r in within})
    if len(lengths) < 2:
        return lines + ["Needle wording: only one length within the trained length, so no degradation is measured."]
    drop = {n: loss(select(within, needle=n), lengths[0], lengths[-1]) for n in ("same", "paraphrase")}
    return lines + [f"Needle wording, accuracy lost from {lengths[0]} to {lengths[-1]} tokens: "
                    f"same {fmt(drop['same'])}, paraphrase {fmt(drop['paraphrase'])}; "
                    f"{verdict(drop['paraphrase'], drop['same'], 'the paraphrase degraded faster, as Chroma found')}."]


def loss(rows: Sequence[Row], short: int, long: int) -> tuple[float, float]:
    """Accuracy at `short` minus at `long` tokens, and its error."""
    a, b = pooled(select(rows, length=short)), pooled(select(rows, length=long))
    return a[0] - b[0], float(np.hypot(a[1], b[1]))


def effective(rows: Sequence[Row], trained: int) -> str:
    kept = sum(r["effective_length"] >= trained for r in rows)
    return (f"Effective lengths (figure 6): " + "; ".join(f"{r['curve']} {r['effective_length']}" for r in rows)
            + f" ({kept} of {len(rows)} curves keep at least the trained length {trained}).")


def findings(tables: dict[str, list[Row]], condition: str, trained: int) -> list[str]:
    """One learned condition's sentences, for the evaluations that have its rows."""
    rows = {name: select(tables.get(name, []), condition=condition) for name in CSVS}
    lines = []
    if rows["niah"]:
        lines.append(niah(rows["niah"], trained))
    if rows["distractors"]:
        lines.append(distractors(rows["distractors"], trained))
    if rows["lost_in_the_middle"]:
        lines += lost_in_the_middle(rows["lost_in_the_middle"])
    if rows["dilution"]:
        lines += dilution(rows["dilution"])
    if rows["haystack_similarity"]:
        lines += haystack(rows["haystack_similarity"], trained)
    if rows["effective_length"]:
        lines.append(effective(rows["effective_length"], trained))
    return lines


def findings_section(record: dict[str, Any], learned: Sequence[str], trained: int) -> list[str]:
    if not learned:
        return ["No condition learned the task: there are no findings to report.\n"]
    parts = [f"### {c}\n\n" + "\n".join(f"- {line}" for line in findings(record["tables"], c, trained)) + "\n"
             for c in learned]
    comparison = scalings_beyond(record["tables"], learned, trained)
    return parts + ([f"### Logit scaling beyond the trained length\n\n- {comparison}\n"] if comparison else [])


def learned_section(record: dict[str, Any]) -> list[str]:
    lines = []
    for c, acc in record["in_distribution_accuracy"].items():
        if record["learned"][c]:
            lines.append(f"- **{c}**: accuracy {acc:.3f} at the shortest length ({record['lengths'][0]} tokens), "
                         f"at least the bar {record['learned_bar']}: the task was learned.")
        else:
            lines.append(f"- **{c}**: accuracy {acc:.3f} at the shortest length ({record['lengths'][0]} tokens), "
                         f"below the bar {record['learned_bar']}: **the model did not learn the task**, so nothing "
                         "else is claimed for it (its rows are still in the CSVs and figures).")
    return lines


def scale(record: dict[str, Any], study: Study) -> str:
    if record["checkpoint"]:
        return (f"The model is the checkpoint `{record['checkpoint']}`; 'within' and 'beyond' are relative to "
                f"{study.train_length} tokens: the retrieval task's training length for a run of this study, "
                "otherwise the model's context window (model.max_seq_len), which is not necessarily the length "
                "it was trained on.")
    cfg = study.sweep.cells()[0].config
    return (f"The models are {cfg.model.num_layers}-layer, d_model {cfg.model.d_model} transformers trained for "
            f"{cfg.steps} steps of {cfg.data.batch_size} x {cfg.data.seq_len} tokens (the preset, before any --set "
            "in the command).")


def write_report(path: Path, record: dict[str, Any], study: Study) -> None:
    trained = record["train_length"]
    learned = [c for c, ok in record["learned"].items() if ok]
    figures = {Path(f).stem for f in record["figures"]}
    models = "; ".join(f"{c}: seeds {', '.join(str(m['seed']) for m in record['models'] if m['condition'] == c)}"
                       for c in dict.fromkeys(m["condition"] for m in record["models"]))
    runs = record["runs"]
    parts = [
        f"# Context rot: `{record['preset']}` preset\n",
        f"Command: `{record['command']}`. Wall time of this invocation: {record['wall_seconds']:.0f} s"
        + (f" (runs trained / reused / failed: {runs.get('done', 0)} / {runs.get('reused', 0)} / "
           f"{runs.get('failed', 0)}; {record['jobs']} job(s))" if runs else "")
        + f". Versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}.\n",
        f"Models: {models}. "
        + f"Trained length: {trained} tokens; tested lengths: "
        f"{', '.join(map(str, record['lengths']))}; {record['examples_per_cell']} episodes per cell. Error bars: "
        "the std over seeds (the binomial standard error for one seed).\n",
        "## Did the model learn the task?\n",
        *learned_section(record),
        "\n## Findings (measured here, learned conditions only)\n",
        *findings_section(record, learned, trained),
        "\n## Published results, for comparison\n",
        PUBLISHED,
        "## What this scale can and cannot show\n",
        f"- {scale(record, study)}\n"
        "- It can show the retrieval mechanism and how it behaves with length: whether attention still finds the "
        "needle as the haystack grows, how distractors and the gold fact's position change the answer, and what "
        "logit scaling does to attention entropy.\n"
        "- It cannot give frontier-model numbers: the papers' models, tasks and lengths are orders of magnitude "
        "apart. RULER's threshold is absolute (85.6%); ours is relative "
        f"({study.effective_fraction:g} x the shortest length's accuracy), for lack of an anchor model.\n"
        "- Failure beyond the trained length is length generalisation (positions and attention scales never seen "
        "in training), not context rot; context rot is a decline within the lengths the model was trained on.\n",
        "## Figures\n",
        *[f"### {name.split('_', 1)[0]}. {caption}\n\n![{name}](figures/{name}.png)\n"
          for name, caption in FIGURES if name in figures],
        "The numbers behind the figures (seed means and error bars) are "
        + ", ".join(f"`{name}.csv`" for name in CSVS) + "; each model's rows are under `evals/`.\n",
    ]
    write_text(path, "\n".join(parts))
