"""Constrained decoding against "generate, validate, retry": one command from a model to a report.

    python -m experiments.constrained_decoding --preset smoke|quick [--out DIR] [--checkpoint RUN_DIR]
        [--cache-dir DIR]

For each constraint (regexes and JSON schemas, `CONSTRAINTS`), N samples at temperature 1 from a prompt
that fits it, once unconstrained and once through the constraint's token automaton (decoding/constraint.py):
  - unconstrained: the validity rate p (valid = the text before EOS, from `tokenizer.token_bytes()`, full-
    matches the regex; for a schema, parses as JSON and passes `jsonschema.validate` when it is installed);
    an output that hit max_new_tokens without EOS is unfinished, hence invalid. The naive approach retries
    until valid: 1/p attempts, mean tokens (and seconds) per attempt / p per valid output. "First line" is
    a lenient reading (the text up to the first newline, stripped, as a newline stop string would cut it);
  - constrained: the complete rate (`DecodeOutput.complete`) and the same costs; every output is checked
    with the same validator and `Automaton.check` on the host, and any disagreement is reported;
  - the per-step cost: the whole compiled loop divided by its steps, unconstrained and constrained on the
    same prompt and rows, no stop token (both run max_new_tokens steps), best of a few rounds after a warm-up.
Seconds per attempt are a batched call's wall time / N (all N samples of a prompt run as one batch).

The model: --checkpoint RUN_DIR, or one the preset trains into DIR/model (reused when already there).
DIR (default runs/constrained_decoding_<preset>) receives summary.json, table.csv, table.md, figures/
(PNG + PDF) and report.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from configs import get_config
from decoding.constraint import Automaton, ConstraintError, compile_regex, constrain
from decoding.generate import generate
from decoding.json_schema import SchemaError, schema_to_regex
from decoding.sampling import make_sampler
from experiments.bench_common import interleaved_best
from models.config import ConfigError
from research.cli import ArgumentParser
from research.data import DataError
from research.run_record import device_info, library_versions
from research.runs import RunError

try:  # the schema validator of the naive approach; without it, schemas are checked by their regex
    import jsonschema
except ImportError:  # pragma: no cover - installed in the dev environment
    jsonschema = None


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One output format: a regex, or a JSON schema (constrained through `schema_to_regex`)."""

    name: str
    prompt: str
    regex: str | None = None
    schema: dict | None = None

    @property
    def kind(self) -> str:
        return "regex" if self.schema is None else "schema"

    def pattern(self) -> str:
        # Compact JSON, the library's default: with whitespace="flexible" (up to 16 characters per place) the
        # smoke model wanders in whitespace and a third of its objects do not close within 40 tokens.
        return self.regex if self.schema is None else schema_to_regex(self.schema)


# From formats the story/facts corpus (research/corpus.py) shows the model (a population, a short list)
# to ones it never saw (ISO dates, JSON objects with these keys). A prompt ends with a space only where the
# tokenizer writes that space as a token of its own (before digits, in SentencePiece); elsewhere the
# space belongs to the next word's token, which the patterns do not allow (see the report's caveats).
CONSTRAINTS = {c.name: c for c in (
    Constraint("date", "Date: ", regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
    Constraint("yes_no", "Answer yes or no:", regex=r"(yes|no)"),
    Constraint("word", "One morning, she found a", regex=r"[a-z]{3,8}"),
    Constraint("sentence", "Alice was a kind baker.", regex=r"[A-Z][a-z]+( [a-z]+){2,5}\."),
    Constraint("population", "type: town\npopulation: ", regex=r"[1-9][0-9]{0,6}"),
    Constraint("int_array", "values = [i * 4 for i in range(3)]\nprint(values)  #",
               schema={"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                       "minItems": 1, "maxItems": 3}),
    Constraint("json_object", "town =",
               schema={"type": "object",
                       "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                       "required": ["name", "age"], "additionalProperties": False}),
)}
# The per-step timing needs a constraint that never has to stop: with no stop token both loops then run
# exactly max_new_tokens steps. It is stacked with the study's automata, so it shares their program.
TIMING_PATTERN = r"[A-Za-z ,.]+"


@dataclasses.dataclass(frozen=True)
class Preset:
    config: str  # configs.get_config name of the model trained when no --checkpoint is given
    num_samples: int
    max_new_tokens: int  # capped by what the model's context leaves after the prompts
    constraints: tuple[str, ...]
    timing_rounds: int


PRESETS = {
    # The test's: a 20-step model (~10 s), a few samples; about a minute in all.
    "smoke": Preset("smoke", 32, 40, ("date", "yes_no", "word", "json_object"), 2),
    # The tiny model (~6-7 min on 2 cores) then ~2 min of sampling and timing.
    "quick": Preset("tiny", 200, 64, tuple(CONSTRAINTS), 3),
}
SEED = 0


@dataclasses.dataclass(frozen=True)
class Model:
    cfg: Any  # ModelConfig
    params: Any
    tokenizer: Any
    record: dict[str, Any]  # what the report says about it


def train_or_load(preset: Preset, out: Path, checkpoint: str | None, cache_dir: str | None) -> Model:
    """The --checkpoint run, or the preset's model trained into out/model (resume=True reuses a finished one)."""
    from research.runs import load_run, read_run_config
    from research.train import train

    if checkpoint is None:
        cfg = get_config(preset.config)
        data = cfg.data if cache_dir is None else dataclasses.replace(cfg.data, cache_dir=cache_dir)
        cfg = dataclasses.replace(cfg, data=data, sample_tokens=0)
        run_dir = out / "model"
        train(cfg, run_dir, resume=True, progress=False)
    else:
        run_dir = Path(checkpoint)
    model_cfg, params, tokenizer = load_run(run_dir)
    if tokenizer is None:
        raise RunError(f"{run_dir}: no tokenizer/ (constraints need the tokenizer's token bytes)")
    summary = run_dir / "summary.json"
    trained = json.loads(summary.read_text()) if summary.is_file() else {}
    record = {"run_dir": str(run_dir), "trained_here": checkpoint is None, "config": read_run_config(run_dir).name,
              "params": model_cfg.param_count(), "vocab_size": model_cfg.vocab_size,
              "tokenizer": tokenizer.kind, "steps": trained.get("step"), "val_loss": trained.get("val_loss")}
    return Model(model_cfg, params, tokenizer, record)


# ---- validation -------------------------------------------------------------------------------------------

def validator(constraint: Constraint) -> Callable[[str], bool]:
    """What the naive approach checks: a full regex match, or JSON valid under the schema."""
    if constraint.schema is None or jsonschema is None:
        pattern = re.compile(constraint.pattern())
        return lambda text: pattern.fullmatch(text) is not None

    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), constraint.schema)
        except (ValueError, jsonschema.ValidationError):  # json.JSONDecodeError is a ValueError
            return False
        return True

    return valid


def joined(tokens: Sequence[int], pieces: Sequence[bytes | None]) -> bytes | None:
    """The bytes of `tokens`; None where a token has none (bos, pad, unused ids: never text)."""
    data = [pieces[t] if 0 <= t < len(pieces) else None for t in tokens]
    return None if any(piece is None for piece in data) else b"".join(data)


def text_of(tokens: Sequence[int], pieces: Sequence[bytes | None]) -> str | None:
    """The UTF-8 text of `tokens` (none of them a stop token); None where it is no text."""
    data = joined(tokens, pieces)
    try:
        return None if data is None else data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def first_line(tokens: Sequence[int], pieces: Sequence[bytes | None], eos: int) -> tuple[str | None, int]:
    """(the text before the first newline, stripped; the tokens a "\\n" stop string would have let through):
    the lenient reading of an unconstrained output."""
    end = next((i + 1 for i, t in enumerate(tokens) if t == eos or b"\n" in (joined([t], pieces) or b"")),
               len(tokens))
    data = joined([t for t in tokens[:end] if t != eos], pieces)
    try:
        return (None if data is None else data.split(b"\n")[0].decode("utf-8").strip()), end
    except UnicodeDecodeError:
        return None, end


# ---- statistics -------------------------------------------------------------------------------------------

def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate: sensible at 0 or N successes, where the normal one collapses."""
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def retry_cost(valid: np.ndarray, tokens: np.ndarray, seconds_per_attempt: float | None) -> dict[str, Any]:
    """Retrying until valid: the expected attempts, tokens and seconds per valid output (None where no
    attempt was valid; `attempts_lower_95` is then 1 / the rate's upper 95% bound)."""
    n, k = len(valid), int(np.sum(valid))
    p = k / n
    low, high = wilson(k, n)
    mean_tokens = float(np.mean(tokens))

    def per_valid(cost: float | None) -> float | None:
        return None if cost is None or k == 0 else cost / p

    return {"samples": n, "valid": k, "valid_rate": p, "valid_rate_ci95": [low, high],
            "mean_tokens": mean_tokens, "seconds_per_attempt": seconds_per_attempt,
            "expected_attempts": per_valid(1.0), "attempts_lower_95": 1 / high,
            "tokens_per_valid": per_valid(mean_tokens), "seconds_per_valid": per_valid(seconds_per_attempt)}


# ---- decoding ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decoder:
    """N samples at temperature 1 from one prompt row; every call shares one of two compiled programs
    (unconstrained, constrained with the stacked automata): the prompt width and shapes never change."""

    model: Model
    num_samples: int
    max_new_tokens: int
    width: int

    def prompt(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.model.tokenizer.encode(text)
        row = np.full((1, self.width), self.model.tokenizer.pad_id, np.int32)
        row[0, :len(ids)] = ids
        return row, np.array([len(ids)], np.int32)

    def __call__(self, text: str, key: jax.Array, processors: tuple = (), stop: bool = True) -> tuple[Any, float]:
        """(the DecodeOutput on the host, wall seconds of the call)."""
        sampler, sampling = make_sampler(1, "sample", temperature=1.0)
        tok = self.model.tokenizer
        start = time.perf_counter()
        out = generate(self.model.params, self.model.cfg, *self.prompt(text), key, max_new_tokens=self.max_new_tokens,
                       sampler=sampler, sampling=sampling, processors=processors,
                       stop_tokens=(tok.eos_id,) if stop else (), pad_id=tok.pad_id, num_samples=self.num_samples)
        out = jax.device_get(out)
        return out, time.perf_counter() - start


def decoder_for(model: Model, preset: Preset, prompts: Sequence[str]) -> Decoder:
    width = max(len(model.tokenizer.encode(p)) for p in prompts)
    max_new_tokens = min(preset.max_new_tokens, model.cfg.max_seq_len - width)
    if max_new_tokens < 1:
        raise ConfigError(f"the prompts take {width} tokens, the model's whole context (max_seq_len="
                          f"{model.cfg.max_seq_len})")
    return Decoder(model, preset.num_samples, max_new_tokens, width)


def outputs(out: Any) -> list[list[int]]:
    """Each sample's generated tokens, the stop token included (DecodeOutput of one prompt)."""
    return [out.tokens[0, n, :out.lengths[0, n]].tolist() for n in range(out.tokens.shape[1])]


def unconstrained_result(constraint: Constraint, automaton: Automaton, out: Any, seconds: float,
                         pieces: Sequence[bytes | None], eos: int) -> dict[str, Any]:
    valid_text = validator(constraint)
    rows = outputs(out)
    ended = np.array([bool(r) and r[-1] == eos for r in rows])
    texts = [text_of(r[:-1] if e else r, pieces) for r, e in zip(rows, ended)]
    valid = np.array([bool(e) and t is not None and valid_text(t) for e, t in zip(ended, texts)])
    # The automaton as a validator: its language is within a schema's valid documents, and is a regex's.
    host = np.array([bool(e) and automaton.check(r, [eos]) == "complete" for r, e in zip(rows, ended)])
    wrong = host & ~valid
    if constraint.kind == "regex":
        wrong |= host != valid
    lines = [first_line(r, pieces, eos) for r in rows]
    lenient = np.array([t is not None and valid_text(t) for t, _ in lines])
    seconds_per_attempt = seconds / len(rows)
    return {**retry_cost(valid, np.array([len(r) for r in rows]), seconds_per_attempt),
            "ended_rate": float(ended.mean()), "host_disagreements": int(wrong.sum()),
            "first_line": retry_cost(lenient, np.array([n for _, n in lines]), None),
            "examples": examples(rows, pieces, valid)}


def constrained_result(constraint: Constraint, automaton: Automaton, out: Any, seconds: float,
                       pieces: Sequence[bytes | None], eos: int) -> dict[str, Any]:
    valid_text, pattern = validator(constraint), re.compile(automaton.pattern)
    rows = outputs(out)
    complete = np.asarray(out.complete[0], bool)
    verdicts = [automaton.check(r, [eos]) for r in rows]
    texts = [text_of(r[:-1] if r and r[-1] == eos else r, pieces) for r in rows]
    checked = np.array([t is not None and valid_text(t) and pattern.fullmatch(t) is not None for t in texts])
    problems = []  # every way the device, the host walk and the validator could disagree
    for n, (c, verdict, ok, text) in enumerate(zip(complete, verdicts, checked, texts)):
        if c != (verdict == "complete") or verdict == "invalid" or (c and not ok):
            problems.append({"sample": n, "device_complete": bool(c), "host": verdict, "validator": bool(ok),
                             "text": text})
    return {**retry_cost(complete & checked, np.array([len(r) for r in rows]), seconds / len(rows)),
            "complete_rate": float(complete.mean()), "disagreements": len(problems), "problems": problems[:5],
            "examples": examples(rows, pieces, complete & checked)}


def examples(rows: Sequence[Sequence[int]], pieces: Sequence[bytes | None], valid: np.ndarray,
             count: int = 3) -> list[dict[str, Any]]:
    """The first few outputs as the report shows them (tokens without bytes dropped, bad UTF-8 replaced):
    what the model wrote, not only how often it was valid."""
    return [{"text": b"".join(pieces[t] or b"" for t in row if 0 <= t < len(pieces)).decode("utf-8", "replace"),
             "valid": bool(ok)} for row, ok in zip(rows[:count], valid)]


def step_timing(sample: Decoder, prompt: str, processor: Any, rounds: int) -> dict[str, Any]:
    """Seconds per loop step, unconstrained and constrained, same prompt and rows, no stop token (both loops
    run max_new_tokens steps), best of `rounds` taken round-robin after one warm-up call each."""
    key = jax.random.key(SEED)
    runners = {"unconstrained": lambda: sample(prompt, key, (), stop=False),
               "constrained": lambda: sample(prompt, key, (processor,), stop=False)}
    first = {}
    for name, run in runners.items():  # compiles: the study's calls below share these programs
        start = time.perf_counter()
        run()
        first[name] = time.perf_counter() - start
    best = interleaved_best(runners, rounds)
    per_step = {name: best[name] / sample.max_new_tokens for name in runners}
    return {"rows": sample.num_samples, "steps": sample.max_new_tokens, "rounds": rounds,
            "first_call_seconds": first, "seconds_per_step": per_step,
            "ratio": per_step["constrained"] / per_step["unconstrained"]}


def run_study(model: Model, preset: Preset) -> dict[str, Any]:
    tok = model.tokenizer
    pieces, eos = tok.token_bytes(), tok.eos_id
    constraints = [CONSTRAINTS[name] for name in preset.constraints]
    automata = [compile_regex(c.pattern(), pieces, model.cfg.vocab_size, eos_id=eos) for c in constraints]
    timing = compile_regex(TIMING_PATTERN, pieces, model.cfg.vocab_size, eos_id=eos)
    stacked = automata + [timing]  # one processor shape for every call: one compiled program
    sample = decoder_for(model, preset, [c.prompt for c in constraints])
    steps = step_timing(sample, constraints[0].prompt, constrain(stacked, (), which=[len(automata)]),
                        preset.timing_rounds)
    key = jax.random.key(SEED)
    results = {}
    for k, (constraint, automaton) in enumerate(zip(constraints, automata)):
        plain = sample(constraint.prompt, jax.random.fold_in(key, 2 * k))
        constrained = sample(constraint.prompt, jax.random.fold_in(key, 2 * k + 1),
                             (constrain(stacked, (eos,), which=[k]),))
        results[constraint.name] = {
            "kind": constraint.kind, "prompt": constraint.prompt, "pattern": automaton.pattern,
            "schema": constraint.schema,
            "automaton": {"states": automaton.num_states, "token_classes": automaton.num_classes,
                          "table_bytes": automaton.nbytes, "compile_seconds": automaton.compile_seconds},
            "unconstrained": unconstrained_result(constraint, automaton, *plain, pieces, eos),
            "constrained": constrained_result(constraint, automaton, *constrained, pieces, eos)}
    return {"num_samples": sample.num_samples, "max_new_tokens": sample.max_new_tokens, "temperature": 1.0,
            "prompt_width": sample.width, "timing_pattern": TIMING_PATTERN, "step_timing": steps,
            "constraints": results}


# ---- command line -----------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    found = {**library_versions(), "backend": jax.default_backend()}
    for name in ("outlines_core", "jsonschema", "matplotlib"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="experiments.constrained_decoding", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="smoke | quick")
    parser.add_argument("--out", default=None, help="output folder (default runs/constrained_decoding_<preset>)")
    parser.add_argument("--checkpoint", default=None, metavar="RUN_DIR",
                        help="study this run instead of training the preset's model into DIR/model")
    parser.add_argument("--cache-dir", default=None,
                        help="tokenizers and corpora of the trained model (default: the preset config's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from experiments.constrained_decoding_report import write_outputs

    args = parse_args(argv)
    start, load_start = time.perf_counter(), os.getloadavg()
    preset = PRESETS[args.preset]
    out = Path(args.out or f"runs/constrained_decoding_{args.preset}")
    try:
        model = train_or_load(preset, out, args.checkpoint, args.cache_dir)
        study = run_study(model, preset)
    except (ConfigError, DataError, RunError, ConstraintError, SchemaError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = {"preset": args.preset, "preset_settings": dataclasses.asdict(preset),
              "command": " ".join(["python -m experiments.constrained_decoding",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "model": model.record, "jsonschema_validation": jsonschema is not None, **study,
              "wall_seconds": time.perf_counter() - start, "versions": versions(), "devices": device_info(),
              "cpu_count": os.cpu_count(), "load_average_start_end": [load_start, os.getloadavg()]}
    table_md = write_outputs(out, record)
    print(table_md)
    print(f"wrote {out / 'summary.json'}, {out / 'report.md'}, table.csv/md and figures/ in "
          f"{record['wall_seconds']:.0f} s")
    disagreements = sum(r["constrained"]["disagreements"] + r["unconstrained"]["host_disagreements"]
                        for r in record["constraints"].values())
    if disagreements:
        print(f"error: {disagreements} output(s) where the device, the automaton's host check and the validator "
              f"disagree; see {out / 'summary.json'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
