"""What constrained decoding costs: a constrained decode step against a plain one, compile time and bytes.

    python -m experiments.benchmark_constrained [--out FILE] [--quick]

One process, one run:
  step      per-step decode time (the whole compiled loop, divided by its steps) with the `tiny` model shape
            at vocabulary 32,768, for greedy at batch 1 and 8 and beam search of width 4: constrained by a
            realistic JSON schema (SCHEMA) against the same call unconstrained, timed round-robin, best of
            REPEATS; the ratio is the headline (target <= 1.10);
  compile   the schema's automaton over vocabularies of 32,768 and 2,048 tokens: our compile time and table
            bytes beside outlines-core's own index build for the same regex and vocabulary (ours includes it:
            the difference is what our table export adds);
  strings   the state count and bytes of a string field with maxLength 20 and 200 (the known blow-up), and
            what the default budget does with them.
The 32,768-token vocabulary is the 256 bytes plus the corpus's most frequent substrings (no tokenizer of
that size can be downloaded or trained here: SentencePiece stops near 11k on the embedded corpus); the
2,048-token one is the `tiny` preset's SentencePiece BPE. `--quick` shrinks everything for the tests.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import outlines_core

from configs import get_config
from decoding.beam_search import BeamConfig, beam_search
from decoding.constraint import END, Budget, ConstraintError, compile_regex, constrain
from decoding.generate import generate
from decoding.json_schema import schema_to_regex
from experiments.bench_common import bench_args, environment, interleaved_best, resolved_config
from models.transformer import init_params, unbox
from research.corpus import embedded_corpus_path
from research.input_pipeline import build_datasets
from research.run_record import write_json_atomic

DEFAULT_OUT = Path("experiments/results/benchmark_constrained.json")
TARGET = 1.10  # constrained / unconstrained step time
REPEATS = 5
SCHEMA = {  # an API-style record: nested object, array with bounds, enum, formats, optional fields
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "created": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                      "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "email", "role", "active"],
    "additionalProperties": False,
}


def substring_vocabulary(size: int, cache_dir: str) -> list[bytes | None]:
    """Specials (pad, bos, eos), the 256 bytes, then the corpus's most frequent 2..8-byte substrings."""
    data = embedded_corpus_path(cache_dir).read_bytes()[:1_000_000]
    counts: collections.Counter = collections.Counter()
    for n in range(2, 9):
        counts.update(data[i:i + n] for i in range(0, len(data) - n, 1 + n // 3))
    vocab: list[bytes | None] = [None, None, None] + [bytes([b]) for b in range(256)]
    vocab += [piece for piece, _ in counts.most_common(size - len(vocab))]
    return vocab + [None] * (size - len(vocab))


def compile_row(regex: str, vocab: list[bytes | None], eos: int) -> dict[str, Any]:
    automaton = compile_regex(regex, vocab, len(vocab), eos_id=eos)
    by_bytes: dict[bytes, list[int]] = {}
    for token, piece in enumerate(vocab):
        if piece and token != eos:
            by_bytes.setdefault(piece, []).append(token)
    start = time.perf_counter()
    outlines_core.Index(regex, outlines_core.Vocabulary(eos, by_bytes))
    outlines_seconds = time.perf_counter() - start
    return {"vocab_size": len(vocab), "states": automaton.num_states, "token_classes": automaton.num_classes,
            "table_bytes": automaton.nbytes, "compile_seconds": automaton.compile_seconds,
            "outlines_index_seconds": outlines_seconds,
            "export_seconds": automaton.compile_seconds - outlines_seconds}


def step_runners(cfg: Any, params: Any, processor: Any, batch: int, beam: int, steps: int,
                 eos: int) -> dict[str, Callable[[], Any]]:
    """Plain and constrained calls of one decode mode, each returning its loop's step count."""
    prompt = np.full((batch, 4), 7, np.int32)
    lengths = np.full((batch,), 4, np.int32)

    def run(processors: tuple) -> Callable[[], int]:
        def call() -> int:
            kwargs = dict(max_new_tokens=steps, processors=processors, stop_tokens=(eos,) if processors else (),
                          pad_id=0)
            out = (beam_search(params, cfg, prompt, lengths, beam=BeamConfig(num_beams=beam), **kwargs) if beam
                   else generate(params, cfg, prompt, lengths, **kwargs))
            return int(np.max(jax.device_get(out.lengths)))
        return call

    return {"plain": run(()), "constrained": run((processor,))}


def time_steps(runners: dict[str, Callable[[], int]], repeats: int) -> dict[str, Any]:
    counts = {name: fn() for name, fn in runners.items()}  # compiles, and the steps each loop runs
    best = interleaved_best(runners, repeats)
    per_step = {name: best[name] / counts[name] for name in runners}
    return {"steps": counts, "seconds": best, "seconds_per_step": per_step,
            "ratio": per_step["constrained"] / per_step["plain"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(argv, __doc__, DEFAULT_OUT, "small vocabulary and few steps (for the tests)")
    load_start = os.getloadavg()

    base = get_config("tiny")
    size = 1024 if args.quick else 32768
    vocab = substring_vocabulary(size, base.data.cache_dir)
    eos = 2
    regex = schema_to_regex(SCHEMA)
    tokenizer = build_datasets(base.data, base.model.vocab_size, base.seed)[0]
    compile_rows = {"substrings": compile_row(regex, vocab, eos),
                    "tiny_sentencepiece": compile_row(regex, tokenizer.token_bytes(), tokenizer.eos_id)}

    cfg = dataclasses.replace(base.model, vocab_size=size)
    params = unbox(init_params(cfg, jax.random.key(0), seq_len=8))
    automaton = compile_regex(regex, vocab, size, eos_id=eos)
    processor = constrain([automaton], (eos,))
    steps = 8 if args.quick else 96
    modes = {"greedy_b1": (1, 0), "greedy_b8": (8, 0), "beam4_b1": (1, 4)}
    repeats = 2 if args.quick else REPEATS
    timing = {name: time_steps(step_runners(cfg, params, processor, b, w, steps, eos), repeats)
              for name, (b, w) in modes.items()}

    strings = {}
    for limit in (20, 200):
        pattern = schema_to_regex({"type": "object", "properties": {"s": {"type": "string", "maxLength": limit}},
                                   "required": ["s"]})
        try:
            a = compile_regex(pattern, vocab, size, eos_id=eos, budget=Budget(max_states=10 ** 7, max_bytes=2 ** 40))
            row = {"states": a.num_states, "token_classes": a.num_classes, "table_bytes": a.nbytes,
                   "compile_seconds": a.compile_seconds}
            try:
                compile_regex(pattern, vocab, size, eos_id=eos)
                row["default_budget"] = "accepted"
            except ConstraintError as err:
                row["default_budget"] = f"refused: {err}"
        except ConstraintError as err:
            row = {"error": str(err)}
        strings[f"maxLength_{limit}"] = row

    results = {"quick": args.quick, "target_ratio_max": TARGET, "schema": SCHEMA, "regex_chars": len(regex),
               "end_marker": END, "model": resolved_config(dataclasses.replace(base, model=cfg))["model"],
               "repeats": repeats, "max_new_tokens": steps, "step": timing, "compile": compile_rows,
               "strings": strings, **environment(load_start)}
    write_json_atomic(args.out, results)
    print("| mode | plain ms/step | constrained ms/step | ratio |")
    print("|---|---|---|---|")
    for name, r in timing.items():
        s = r["seconds_per_step"]
        print(f"| {name} | {1e3 * s['plain']:.2f} | {1e3 * s['constrained']:.2f} | {r['ratio']:.3f} |")
    for name, r in compile_rows.items():
        print(f"compile ({name}, V={r['vocab_size']}): {r['states']} states, {r['token_classes']} classes, "
              f"{r['table_bytes'] / 1024:.0f} KiB, {r['compile_seconds']:.2f} s (outlines-core index "
              f"{r['outlines_index_seconds']:.2f} s)")
    for name, r in strings.items():
        print(f"{name}: {r}")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
