"""The outputs of the constrained-decoding study (experiments/constrained_decoding.py): summary.json,
table.csv / table.md, figures/ (PNG + PDF) and report.md, every number taken from the study's record."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import matplotlib.patches
import numpy as np

from experiments.routing_collapse_plots import plt, save
from research.run_record import write_json_atomic

Record = dict[str, Any]
METHODS = (  # (label, how to get its retry-cost dict from a constraint's result)
    ("unconstrained (text before EOS)", lambda r: r["unconstrained"]),
    ("unconstrained (first line, stripped)", lambda r: r["unconstrained"]["first_line"]),
    ("constrained", lambda r: r["constrained"]),
)


def pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def num(value: float | None, cost: Record, scale: float = 1.0) -> str:
    """An expected cost per valid output (times `scale`); "none valid" where no sample was: unbounded by the
    run, not measured as infinite."""
    return f"none valid in {cost['samples']}" if value is None else f"{scale * value:.3g}"


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f} ms"


# (CSV name, markdown heading, value for the CSV, text for the markdown) per column, so the two agree.
Column = tuple[str, str, Callable[[str, Record], Any], Callable[[str, Record], str]]
COLUMNS: tuple[Column, ...] = (
    ("constraint", "constraint", lambda n, r: n, lambda n, r: f"`{n}`"),
    ("kind", "kind", lambda n, r: r["kind"], lambda n, r: r["kind"]),
    ("samples", "N", lambda n, r: r["unconstrained"]["samples"], lambda n, r: str(r["unconstrained"]["samples"])),
    ("unconstrained_valid_rate", "unconstr. valid [95% CI]", lambda n, r: r["unconstrained"]["valid_rate"],
     lambda n, r: f"{pct(r['unconstrained']['valid_rate'])} [{pct(r['unconstrained']['valid_rate_ci95'][0])}, "
                  f"{pct(r['unconstrained']['valid_rate_ci95'][1])}]"),
    ("unconstrained_ended_rate", "ended (EOS)", lambda n, r: r["unconstrained"]["ended_rate"],
     lambda n, r: pct(r["unconstrained"]["ended_rate"])),
    ("first_line_valid_rate", "first line valid", lambda n, r: r["unconstrained"]["first_line"]["valid_rate"],
     lambda n, r: pct(r["unconstrained"]["first_line"]["valid_rate"])),
    ("unconstrained_expected_attempts", "attempts / valid", lambda n, r: r["unconstrained"]["expected_attempts"],
     lambda n, r: num(r["unconstrained"]["expected_attempts"], r["unconstrained"])),
    ("unconstrained_tokens_per_valid", "unconstr. tokens / valid", lambda n, r: r["unconstrained"]["tokens_per_valid"],
     lambda n, r: num(r["unconstrained"]["tokens_per_valid"], r["unconstrained"])),
    ("unconstrained_seconds_per_valid", "unconstr. ms / valid", lambda n, r: r["unconstrained"]["seconds_per_valid"],
     lambda n, r: num(r["unconstrained"]["seconds_per_valid"], r["unconstrained"], 1e3)),
    ("constrained_complete_rate", "constr. complete", lambda n, r: r["constrained"]["complete_rate"],
     lambda n, r: pct(r["constrained"]["complete_rate"])),
    ("constrained_valid_rate", "constr. valid", lambda n, r: r["constrained"]["valid_rate"],
     lambda n, r: pct(r["constrained"]["valid_rate"])),
    ("constrained_mean_tokens", "constr. tokens / output", lambda n, r: r["constrained"]["mean_tokens"],
     lambda n, r: f"{r['constrained']['mean_tokens']:.3g}"),
    ("constrained_seconds_per_output", "constr. ms / output", lambda n, r: r["constrained"]["seconds_per_attempt"],
     lambda n, r: f"{1e3 * r['constrained']['seconds_per_attempt']:.3g}"),
    ("constrained_tokens_per_valid", "constr. tokens / valid", lambda n, r: r["constrained"]["tokens_per_valid"],
     lambda n, r: num(r["constrained"]["tokens_per_valid"], r["constrained"])),
    ("disagreements", "disagreements", lambda n, r: r["constrained"]["disagreements"],
     lambda n, r: str(r["constrained"]["disagreements"])),
    ("automaton_states", "states / classes", lambda n, r: r["automaton"]["states"],
     lambda n, r: f"{r['automaton']['states']} / {r['automaton']['token_classes']}"),
)


def table(record: Record) -> tuple[str, str]:
    """(CSV, markdown) with a row per constraint; in the CSV an unbounded cost is `inf`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([name for name, *_ in COLUMNS])
    md = ["| " + " | ".join(head for _, head, *_ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, result in record["constraints"].items():
        values = [value(name, result) for _, _, value, _ in COLUMNS]
        writer.writerow(["inf" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in values])
        md.append("| " + " | ".join(text(name, result) for *_, text in COLUMNS) + " |")
    return buffer.getvalue(), "\n".join(md) + "\n"


# ---- figures ----------------------------------------------------------------------------------------------

def grouped_axes(record: Record, ylabel: str, title: str):
    names = list(record["constraints"])
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2.5, 4.0), layout="constrained")
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig, ax, names, 0.8 / len(METHODS)


def legend_below(fig: plt.Figure, extra: tuple = ()) -> None:
    """The methods' colours (plain patches: a bar may be hatched) under the axes, where it hides no bar."""
    handles = [matplotlib.patches.Patch(color=f"C{i}", label=label) for i, (label, _) in enumerate(METHODS)]
    fig.legend(handles=[*handles, *extra], loc="outside lower center", ncols=2, fontsize=8, frameon=False)


def validity_figure(record: Record, out: Path) -> list[str]:
    """Bar per constraint and method: the share of valid outputs, with its 95% Wilson interval."""
    fig, ax, names, width = grouped_axes(record, "valid outputs", f"Valid outputs of {record['num_samples']} "
                                         "samples at temperature 1 (95% Wilson intervals)")
    for i, (label, cost_of) in enumerate(METHODS):
        costs = [cost_of(record["constraints"][n]) for n in names]
        rates = np.array([c["valid_rate"] for c in costs])
        spans = np.array([[r - c["valid_rate_ci95"][0], c["valid_rate_ci95"][1] - r] for r, c in zip(rates, costs)])
        ax.bar(np.arange(len(names)) + (i - 1) * width, rates, width, yerr=spans.T, capsize=2, color=f"C{i}")
    ax.set_ylim(0, 1.05)
    legend_below(fig)
    return save(fig, out, "validity_rate")


def tokens_figure(record: Record, out: Path) -> list[str]:
    """Log-scale bar per constraint and method: expected generated tokens per valid output. Where no sample
    was valid the cost is unbounded: a hatched, faded bar up to its 95% lower bound, marked "none valid"."""
    fig, ax, names, width = grouped_axes(record, "generated tokens per valid output",
                                         "Expected tokens per valid output (retry until valid)")
    for i, (label, cost_of) in enumerate(METHODS):
        costs = [cost_of(record["constraints"][n]) for n in names]
        bars = ax.bar(np.arange(len(names)) + (i - 1) * width,
                      [c["tokens_per_valid"] or c["mean_tokens"] * c["attempts_lower_95"] for c in costs], width,
                      color=f"C{i}")
        for bar, cost in zip(bars, costs):
            if cost["tokens_per_valid"] is None:
                bar.set(hatch="//", alpha=0.45)
                ax.text(bar.get_x() + width / 2, np.sqrt(bar.get_height()), f"none valid in {cost['samples']}",
                        rotation=90, ha="center", va="center", fontsize=7)
    ax.set_yscale("log")
    bound = matplotlib.patches.Patch(facecolor="white", edgecolor="grey", hatch="//",
                                     label="none valid: bar = 95% lower bound (unbounded)")
    legend_below(fig, (bound,))
    return save(fig, out, "tokens_per_valid")


# ---- report -----------------------------------------------------------------------------------------------

def rates_of(record: Record, cost_of: Callable[[Record], Record]) -> str:
    return ", ".join(f"{name} {pct(cost_of(r)['valid_rate'])}" for name, r in record["constraints"].items())


def findings(record: Record) -> list[str]:
    results = record["constraints"]
    n, m = record["num_samples"], record["max_new_tokens"]
    constrained = [r["constrained"] for r in results.values()]
    complete = sum(round(c["complete_rate"] * c["samples"]) for c in constrained)
    total = sum(c["samples"] for c in constrained)
    disagreements = sum(c["disagreements"] for c in constrained)
    host = sum(r["unconstrained"]["host_disagreements"] for r in results.values())
    per_constraint = ", ".join(f"{k} {pct(r['constrained']['complete_rate'])}" for k, r in results.items())
    lines = [
        f"**Constrained decoding**: {complete} of {total} outputs ({pct(complete / total)}) completed within "
        f"{m} new tokens across the {len(results)} constraints (per constraint: {per_constraint}). "
        + ("Every complete output passed the validator, the regex and the automaton's host check: "
           "0 disagreements." if disagreements == 0 else
           f"**{disagreements} output(s) where the device, the host check and the validator disagree** "
           "(summary.json lists them): a bug to fix before any other number here counts.")
        + (" An incomplete output is a row cut off by max_new_tokens, not an invalid one."
           if complete < total and disagreements == 0 else ""),
    ]
    none = [k for k, r in results.items() if r["unconstrained"]["valid"] == 0]
    some = {k: r["unconstrained"] for k, r in results.items() if r["unconstrained"]["valid"] > 0}
    ended = np.mean([r["unconstrained"]["ended_rate"] for r in results.values()])
    lines.append(
        f"**Unconstrained sampling** (text before EOS): {rates_of(record, METHODS[0][1])}. "
        + (f"No sample of {n} was valid for {', '.join(none)}: the expected number of attempts is unbounded by "
           f"this run; the 95% Wilson bound on the rate only says it is more than "
           f"{min(results[k]['unconstrained']['attempts_lower_95'] for k in none):.0f} attempts. " if none else "")
        + ("".join(f"{k}: {c['expected_attempts']:.3g} attempts, {c['tokens_per_valid']:.3g} tokens and "
                   f"{c['seconds_per_valid']:.3g} s per valid output. " for k, c in some.items()))
        + f"On average {pct(ended)} of the samples ended with EOS within {m} tokens; an output that is right "
          "but keeps going is invalid, as a strict validator counts it"
        + (" (training here packs documents with an EOS only at their end: the model stops where a document "
           "would)." if record["model"]["trained_here"] else "."))
    lines.append(f"**Lenient reading** (the first line, stripped: what a newline stop string and `.strip()` would "
                 f"give): {rates_of(record, METHODS[1][1])}.")
    ratios = [(k, plain / forced) for k, r in results.items()
              if (plain := r["unconstrained"]["tokens_per_valid"]) and (forced := r["constrained"]["tokens_per_valid"])]
    if ratios:
        lines.append("**Tokens per valid output**, unconstrained retries over constrained: "
                     + ", ".join(f"{k} {x:.3g}x" for k, x in ratios) + ".")
    step = record["step_timing"]
    per = step["seconds_per_step"]
    lines.append(
        f"**Per-step cost**: {ms(per['constrained'])} per loop step constrained against {ms(per['unconstrained'])} "
        f"unconstrained ({step['ratio']:.3f}x; {step['rows']} rows, {step['steps']} steps, best of "
        f"{step['rounds']} rounds after a warm-up; the whole compiled loop, prefill included, over its steps).")
    lines.append("The automaton's host check, used as a validator of the unconstrained outputs, agreed with every "
                 "regex and accepted nothing a schema rejects (0 disagreements)." if host == 0 else
                 f"**The automaton's host check and the validator disagreed on {host} unconstrained output(s).**")
    return lines


def caveats(record: Record) -> list[str]:
    model, load = record["model"], record["load_average_start_end"]
    trained = (f", {model['steps']} training steps, validation loss {model['val_loss']:.3f}"
               if model.get("val_loss") is not None else "")
    what = (f"`{model['config']}` ({model['params']:,} parameters, {model['tokenizer']} tokenizer of "
            f"{model['vocab_size']} ids{trained})")
    return [
        (f"The model is tiny and was trained here: {what}, on the repository's procedurally generated corpus."
         if model["trained_here"] else f"The model is the run in `{model['run_dir']}`: {what}.")
        + " The unconstrained rates say how far this model is from each format; they do not predict how a "
          "larger or instruction-tuned model does (not measured here).",
        "There is no published reference for this exact setup (model, prompts, constraints), so no number here "
        "is compared with a paper's.",
        "The prompt boundary: most word tokens carry their leading space (\" red\"), which the patterns do not "
        "allow, so after a prompt like \"she found a\" constrained decoding must spell the word with space-less "
        "tokens the model rarely saw there, and the strict unconstrained reading rejects the space (the "
        "first-line reading strips it). Prompts end with a space only before digits, where the tokenizer "
        "writes the space as its own token. Schema constraints produce compact JSON (`[0,4,8]`, the "
        "`schema_to_regex` default) while the corpus writes `[0, 4, 8]` and multi-line objects; the "
        "unconstrained outputs are judged by `jsonschema`, which accepts any whitespace.",
        f"Seconds are wall time on {record['cpu_count']} CPU cores shared with other work (load average "
        f"{load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end), a batched call of {record['num_samples']} "
        "samples divided by the samples; a call runs until its slowest row ends, so an unconstrained attempt "
        "costs about max_new_tokens steps whenever one of the batch never emits EOS.",
        "Temperature 1, no top-k/top-p; one seed. Rates carry 95% Wilson intervals (table.md); a difference "
        "inside them is not resolved by this run.",
    ]


def write_report(path: Path, record: Record, table_md: str) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = [
        f"# Constrained decoding against generate-validate-retry: `{record['preset']}` preset\n",
        f"Command: `{record['command']}`. Wall time {record['wall_seconds']:.0f} s. {record['num_samples']} samples "
        f"per constraint and method, temperature {record['temperature']}, at most {record['max_new_tokens']} new "
        f"tokens. Schemas are validated with "
        f"{'`jsonschema`' if record['jsonschema_validation'] else 'their regex (jsonschema is not installed)'}. "
        f"Versions: {versions}.\n",
        "## Findings (measured here)\n",
        *[f"- {line}" for line in findings(record)],
        "\n## Table\n",
        "Costs per valid output are per-attempt means divided by the valid rate (retry until valid); "
        "\"none valid in N\" means unbounded by this run, not measured.\n",
        table_md,
        "## Constraints and sample outputs\n",
        *[constraint_lines(name, r) for name, r in record["constraints"].items()],
        "## Caveats\n",
        *[f"- {line}" for line in caveats(record)],
        "\n## Figures\n",
        "![validity rate](figures/validity_rate.png)\n",
        "![tokens per valid output](figures/tokens_per_valid.png)\n",
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def shown(text: str, limit: int = 60) -> str:
    """An output as the report quotes it: repr, cut at `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def constraint_lines(name: str, result: Record) -> str:
    what = f"regex `{result['pattern']}`" if result["schema"] is None else f"schema `{json.dumps(result['schema'])}`"
    a = result["automaton"]
    samples, forced = (", ".join(shown(e["text"]) for e in result[method]["examples"])
                       for method in ("unconstrained", "constrained"))
    return (f"- `{name}`: {what}, prompt {result['prompt']!r}; automaton {a['states']} states, {a['token_classes']} "
            f"token classes, {a['table_bytes'] / 1024:.1f} KiB, compiled in {a['compile_seconds']:.2f} s.\n"
            f"  Unconstrained: {samples}\n  Constrained: {forced}\n")


def write_outputs(out: Path, record: Record) -> str:
    """Writes every output into `out` (summary.json last, with the figures' paths); returns table.md's text."""
    figures = validity_figure(record, out / "figures") + tokens_figure(record, out / "figures")
    record["figures"] = [str(Path(p).relative_to(out)) for p in figures]
    csv_text, md_text = table(record)
    for name, text in (("table.csv", csv_text), ("table.md", md_text)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    write_report(out / "report.md", record, md_text)
    write_json_atomic(out / "summary.json", record)
    return md_text
