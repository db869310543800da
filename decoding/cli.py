"""Generate text from a training run's checkpoint, streaming it as it is decoded.

    python -m decoding.generate --checkpoint RUN_DIR --prompt "Once upon" [--strategy greedy|sample|beam]
        [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R] [--num-samples N]
        [--num-beams W] [--num-return N] [--max-new-tokens M] [--min-new-tokens N] [--seed S] [--step STEP]
        [--stream-every N] [--no-stream] [--regex PATTERN | --json-schema FILE] [--cache-dir DIR]

RUN_DIR is what `python -m research.train --out RUN_DIR` wrote: run.json (the config), tokenizer/ and
checkpoints/ (only the params are read), or a Hugging Face checkpoint converted by `python -m research.convert`.
Greedy and single-sample output is streamed: a host callback inside the compiled loop hands the tokens so far
to the printer every --stream-every steps (experiments/benchmark_decode.py measures its cost). Beam search
prints the n-best with their length-normalised scores at the end (beams reorder, so there is no stable
prefix to print early).

--regex / --json-schema constrain every strategy's output to a full match (decoding/constraint.py; the JSON
schema subset: decoding/json_schema.py), with the automaton's tables on the device; its size and compile
time are printed, and it is cached under --cache-dir. An output that reaches --max-new-tokens before the
match is complete is reported as incomplete on stderr and the exit status is 3.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from decoding.beam_search import BeamConfig, beam_search
from decoding.constraint import check_regex, compile_regex, constrain
from decoding.generate import generate
from decoding.json_schema import SchemaError, schema_to_regex
from decoding.processors import RepetitionPenalty
from decoding.sampling import SamplerConfig, SamplingParams, make_sampler
from decoding.steps import check_prompt
from research.cli import ArgumentParser


DEFAULT_MAX_NEW_TOKENS = 64
INT32_MAX = 2 ** 31 - 1  # token counts and steps are int32 in the compiled loop


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m decoding.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory written by research.train")
    p.add_argument("--prompt", required=True)
    p.add_argument("--strategy", default="greedy", choices=("greedy", "sample", "beam"))
    p.add_argument("--temperature", type=float, default=1.0, help="sample: 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample: keep the k most probable tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample: nucleus mass in (0, 1] (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="sample: drop tokens below min_p x the top one")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    p.add_argument("--num-samples", type=int, default=1, help="sample: continuations per prompt")
    p.add_argument("--num-beams", type=int, default=4, help="beam: beam width")
    p.add_argument("--num-return", type=int, default=1, help="beam: hypotheses printed, best first")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {DEFAULT_MAX_NEW_TOKENS}, or what fits the model's context after the prompt")
    p.add_argument("--min-new-tokens", type=int, default=0, help="no end of text before this many tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--stream-every", type=int, default=4, help="steps between printed updates")
    p.add_argument("--no-stream", action="store_true", help="print only when generation is done")
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--regex", default=None, help="constrain the output to a full match of PATTERN")
    constraint.add_argument("--json-schema", default=None, metavar="FILE",
                            help="constrain the output to JSON valid under the schema in FILE")
    p.add_argument("--cache-dir", default=".cache", help="where compiled constraints are cached")
    return p.parse_args(argv)


class TextStream:
    """Prints row 0's text as it grows: re-decodes the row and prints what is new, holding back a
    trailing incomplete character (U+FFFD) until the bytes that complete it arrive."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.printed = ""

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.write(self.decode(tokens[0, :lengths[0]].tolist()).rstrip("\ufffd"))

    def finish(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.write(self.decode(tokens[0, :lengths[0]].tolist()))
        sys.stdout.write("\n")

    def write(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def default_max_new_tokens(prompt_tokens: int, context: int) -> int:
    """DEFAULT_MAX_NEW_TOKENS, or what the context leaves after the prompt (saying so on stderr)."""
    room = context - prompt_tokens
    if room < 1:
        raise ValueError(f"--prompt: {prompt_tokens} tokens leave no room for new ones in "
                         f"model.max_seq_len={context}")
    if room < DEFAULT_MAX_NEW_TOKENS:
        print(f"--max-new-tokens defaults to {room}: what fits model.max_seq_len={context} after the "
              f"{prompt_tokens}-token prompt", file=sys.stderr)
    return min(room, DEFAULT_MAX_NEW_TOKENS)


def constraint_pattern(args: argparse.Namespace) -> str | None:
    """The regex that --regex or --json-schema asks for (None: unconstrained); schema errors are one line."""
    if args.json_schema is None:
        if args.regex is not None:
            check_regex(args.regex)
        return args.regex
    try:
        schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"--json-schema {args.json_schema}: {err.strerror or err}") from None
    except ValueError as err:  # not JSON, not UTF-8
        raise ValueError(f"--json-schema {args.json_schema}: not valid JSON ({err})") from None
    try:
        return schema_to_regex(schema)
    except SchemaError as err:
        raise ValueError(f"--json-schema {args.json_schema}: {err}") from None


def check_args(args: argparse.Namespace) -> tuple[BeamConfig | None, SamplerConfig, SamplingParams]:
    """(beam config or None, sampler, sampling values) from the flags, every value checked, whether the
    strategy uses it or not, so that a bad one fails before the run is loaded or anything compiles."""
    counts = {"--max-new-tokens": (args.max_new_tokens, 1), "--min-new-tokens": (args.min_new_tokens, 0),
              "--num-samples": (args.num_samples, 1), "--stream-every": (args.stream_every, 1)}
    for flag, (value, low) in counts.items():
        if value is not None and not low <= value <= INT32_MAX:
            bound = f">= {low}" if value < low else f"<= {INT32_MAX}"
            raise ValueError(f"{flag}={value}: expected an integer {bound}")
    if args.max_new_tokens is not None and args.min_new_tokens > args.max_new_tokens:
        raise ValueError(f"--min-new-tokens={args.min_new_tokens}: expected <= --max-new-tokens={args.max_new_tokens}")
    if not 0 < args.repetition_penalty < math.inf:
        raise ValueError(f"--repetition-penalty={args.repetition_penalty}: expected a finite value > 0 (1 is off)")
    if not -2 ** 63 <= args.seed < 2 ** 63:  # what a PRNG key holds
        raise ValueError(f"--seed={args.seed}: expected a 64-bit integer")
    beam = BeamConfig(num_beams=args.num_beams, num_return=args.num_return)
    sampler, sampling = make_sampler(1, "greedy" if args.strategy == "beam" else args.strategy,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     min_p=args.min_p)
    return (beam if args.strategy == "beam" else None), sampler, sampling


def run(args: argparse.Namespace) -> int:
    beam, sampler, sampling = check_args(args)
    pattern = constraint_pattern(args)
    # Imported once the flags are known to be good: loading a run brings in orbax and the rest of the
    # research harness, which --help and a mistyped flag do not need.
    from research.runs import load_run

    cfg, params, tokenizer = load_run(Path(args.checkpoint), args.step)
    if tokenizer is None:
        raise ValueError(f"--checkpoint {args.checkpoint}: no tokenizer/ (the model folder it was converted "
                         "from had no tokenizer files)")
    processors = (RepetitionPenalty(np.float32(args.repetition_penalty)),) if args.repetition_penalty != 1 else ()
    stop_tokens = tuple(t for t in (tokenizer.eos_id,) if t is not None and t >= 0)
    decode = tokenizer.decode
    if pattern is not None:
        pieces = tokenizer.token_bytes()
        automaton = compile_regex(pattern, pieces, cfg.vocab_size, eos_id=stop_tokens[0] if stop_tokens else None,
                                  cache_dir=args.cache_dir)
        print(automaton.describe(), file=sys.stderr)
        processors += (constrain([automaton], stop_tokens),)
        # The text is the bytes the automaton matched (a tokenizer's decode may drop a leading space).
        decode = lambda ids: b"".join(pieces[t] or b"" for t in ids if t < len(pieces)).decode("utf-8", "replace")
    # As the model saw text in training: with bos where its tokenizer adds one (Llama's, Mistral's).
    ids = tokenizer.encode(args.prompt) or [tokenizer.bos_id]
    prompt, lengths = np.asarray([ids], np.int32), np.asarray([len(ids)], np.int32)
    max_new_tokens = args.max_new_tokens or default_max_new_tokens(len(ids), cfg.max_seq_len)
    check_prompt(cfg, len(ids), max_new_tokens)  # before the prompt is echoed to stdout
    common = dict(max_new_tokens=max_new_tokens, min_new_tokens=args.min_new_tokens, processors=processors,
                  stop_tokens=stop_tokens, pad_id=tokenizer.pad_id)

    streamed = beam is None and args.num_samples == 1 and not args.no_stream
    stream = TextStream(decode) if streamed else None
    start = time.perf_counter()
    if beam is not None:
        out = beam_search(params, cfg, prompt, lengths, beam=beam, **common)
    else:
        if stream is not None:
            sys.stdout.write(args.prompt)
            sys.stdout.flush()
        out = generate(params, cfg, prompt, lengths, jax.random.key(args.seed), sampler=sampler,
                       sampling=sampling, num_samples=args.num_samples, stream=stream,
                       stream_every=args.stream_every, **common)
    out = jax.device_get(out)
    seconds = time.perf_counter() - start
    if stream is not None:
        stream.finish(out.tokens[:, 0], out.lengths[:, 0])
    else:
        for n in range(out.tokens.shape[1]):
            text = args.prompt + decode(out.tokens[0, n, :out.lengths[0, n]].tolist())
            label = f"[score {out.scores[0, n]:.3f}] " if beam is not None else ""
            print(f"{label}{text}" if out.tokens.shape[1] == 1 else f"--- {n + 1}: {label}{text}")
    print(f"{int(out.lengths.sum())} tokens in {seconds:.1f} s (compilation included)", file=sys.stderr)
    incomplete = np.flatnonzero(~np.asarray(out.complete[0]))
    for n in incomplete:
        print(f"output {n + 1}: incomplete: --max-new-tokens={max_new_tokens} ran out before the constraint "
              "was matched", file=sys.stderr)
    return 3 if len(incomplete) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # ConfigError, RunError and ConstraintError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
