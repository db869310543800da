"""Convert Hugging Face checkpoints (Llama, Mistral, Qwen2, Mixtral) to our run directories and back.

    python -m research.convert --from-hf HF_DIR --out RUN_DIR [--dtype auto|float32|bfloat16] [--scan-layers]
        [--overwrite]
    python -m research.convert --to-hf RUN_DIR --out HF_DIR [--step STEP] [--dtype auto|float32|bfloat16]
        [--max-shard-size 5GB] [--overwrite]

--from-hf reads a local model folder: config.json, model.safetensors (or model.safetensors.index.json and
its shards) and, when present, tokenizer.json or tokenizer.model with tokenizer_config.json. It writes a
run directory that `python -m decoding.generate --checkpoint RUN_DIR` reads: run.json (a TrainConfig with
the mapped model config, and the source config.json under "hf"), checkpoints/0 (params only, orbax) and
tokenizer/ (the Hugging Face tokenizer files). dtype auto keeps bf16 checkpoints in bf16, else float32.
--scan-layers writes a model that scans its blocks (model.scan_layers; params stacked per layer, models/layers.py).
--to-hf writes config.json and model.safetensors (shards of at most --max-shard-size, with an index) from a
run directory (any run whose model a family computes: research/hf_config.py `export_family`, in either layout),
plus the tokenizer files when the run's tokenizer came from Hugging Face. dtype auto is the run's param dtype.

Both write into a temporary sibling of --out and rename it into place when complete, so a failure leaves
nothing behind. --out must not exist, unless --overwrite: then it is replaced once the new one is complete
(the old one is renamed aside, the new one renamed in, the old one deleted), and only if it is an empty
folder or what this direction writes: a run directory (run.json) for --from-hf, a Hugging Face folder
(config.json and model.safetensors or its index) for --to-hf; never the input or a folder holding it.
Errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from jax.sharding import Mesh

from models.config import ModelConfig
from research.checkpoint import Checkpointer
from research.cli import ArgumentParser
from research.config import TrainConfig, to_dict
from research.hf_checkpoint import load_params, read_hf_config, save_weights
from research.hf_config import ConversionError, export_family, family_of, hf_config_from_model, model_config_from_hf
from research.hf_tokenizer import HFTokenizer, copy_hf_files, is_hf_tokenizer
from research.run_record import run_record, write_json_atomic
from research.runs import is_run_dir, load_run, read_run_config, read_run_record

DTYPES = ("auto", "float32", "bfloat16")
UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9}


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder as --to-hf writes it: config.json and the weights (one file or an index)."""
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def check_out(out: Path, overwrite: bool, replaceable: Callable[[Path], bool], what: str,
              source: Path | None = None) -> None:
    """Fails unless `out` may be written: it does not exist, or --overwrite and it is an empty folder or
    `replaceable` (a previous result), and it is neither the input nor a folder holding it."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise ConversionError(f"--out {out} already exists; pick a new path or pass --overwrite to replace it")
    if out.is_symlink() or not out.is_dir():
        raise ConversionError(f"--out {out} is not a directory; --overwrite replaces only a previous {what}")
    if source is not None and Path(source).resolve().is_relative_to(out.resolve()):
        raise ConversionError(f"--out {out} is or holds the input {source}; --overwrite would delete it")
    if any(out.iterdir()) and not replaceable(out):
        raise ConversionError(f"--out {out} is not a {what} (nothing replaced); --overwrite replaces only a "
                              f"previous {what} or an empty folder")


def replace_dir(new: Path, out: Path) -> None:
    """Moves the complete directory `new` to `out`, replacing `out` if it exists: the old one is renamed aside
    (same folder, so each rename is atomic), the new one renamed in, then the old one deleted. If the second
    rename fails the old one is put back. `out` is never half-written: it is the old result or the new one
    (a process killed between the two renames leaves the old one whole as .NAME.*.old beside it)."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(out: Path, overwrite: bool = False, replaceable: Callable[[Path], bool] = is_run_dir,
           what: str = "run directory", source: Path | None = None) -> Iterator[Path]:
    """A temporary sibling of `out`, moved to `out` if the block succeeds (replacing it, with `overwrite`,
    when `check_out` allows) and removed if it fails."""
    out = Path(out)
    check_out(out, overwrite, replaceable, what, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        check_out(out, overwrite, replaceable, what, source)  # again: something may have appeared meanwhile
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_hf(hf_dir: Path, out: Path, dtype: str = "auto", mesh: Mesh | None = None,
              overwrite: bool = False, scan_layers: bool = False) -> ModelConfig:
    """Writes the run directory `out` from a Hugging Face model folder; returns the model config.
    `overwrite` replaces an existing run directory `out` (research.runs.load_run reads the result).
    `scan_layers`: the model scans its blocks, and its params are written in that layout."""
    hf_dir = Path(hf_dir)
    check_out(Path(out), overwrite, is_run_dir, "run directory", hf_dir)  # before any work
    hf = read_hf_config(hf_dir)
    cfg = dataclasses.replace(model_config_from_hf(hf, dtype), scan_layers=scan_layers)
    tokenizer = HFTokenizer.load(hf_dir) if is_hf_tokenizer(hf_dir) else None
    with staged(Path(out), overwrite, is_run_dir, "run directory", hf_dir) as tmp:
        params = load_params(hf_dir, cfg, mesh)
        ckpt = Checkpointer(tmp / "checkpoints")
        try:
            ckpt.save(0, {"params": params})
            ckpt.wait()
        finally:
            ckpt.close()
        del params
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        train_cfg = TrainConfig(name=f"hf-{family_of(hf)}", model=cfg)
        write_json_atomic(tmp / "run.json", run_record(to_dict(train_cfg), seed=0,
                                                       hf={"config": hf, "source": str(hf_dir.resolve())}))
    if tokenizer is None:
        print(f"note: {hf_dir} has no tokenizer.json or tokenizer.model; decoding.generate needs a tokenizer/",
              file=sys.stderr)
    return cfg


def export_hf(run_dir: Path, out: Path, step: int | None = None, dtype: str = "auto",
              max_shard_bytes: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Writes the Hugging Face folder `out` from a run directory; returns its config.json. `overwrite`
    replaces an existing Hugging Face folder `out`."""
    run_dir = Path(run_dir)
    export_family(read_run_config(run_dir).model)  # fail before reading or writing anything
    check_out(Path(out), overwrite, is_hf_folder, "Hugging Face model folder", run_dir)
    cfg, params, tokenizer = load_run(run_dir, step)
    dtype = cfg.param_dtype if dtype == "auto" else dtype
    tokenizer_dir = run_dir / "tokenizer"
    hf_tokenizer = isinstance(tokenizer, HFTokenizer)
    base = read_run_record(run_dir).get("hf", {}).get("config")
    ids = None
    if base is None and hf_tokenizer:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    hf = hf_config_from_model(cfg, dtype, base, ids)
    with staged(Path(out), overwrite, is_hf_folder, "Hugging Face model folder", run_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_weights(tmp, params, cfg, dtype, max_shard_bytes)
        if hf_tokenizer:
            copy_hf_files(tokenizer_dir, tmp)
    if not hf_tokenizer:
        why = "is not a Hugging Face one" if tokenizer_dir.is_dir() else "is missing"
        print(f"note: {run_dir}'s tokenizer {why}; {out} has no tokenizer files", file=sys.stderr)
    return hf


def parse_size(text: str) -> int:
    """'5GB', '500MB', '123' (bytes) -> bytes (decimal units, as transformers' max_shard_size)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 500MB or a byte count")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m research.convert", description=__doc__.split("\n")[0])
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", type=Path, metavar="HF_DIR", help="Hugging Face model folder to import")
    way.add_argument("--to-hf", type=Path, metavar="RUN_DIR", help="run directory to export")
    p.add_argument("--out", type=Path, required=True, help="directory to create (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out once the new one is complete (only a previous result of the "
                        "same direction, or an empty folder)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="parameter dtype of the result")
    p.add_argument("--scan-layers", action="store_true",
                   help="--from-hf: a model that scans its blocks (params stacked on a leading layers axis)")
    p.add_argument("--step", type=int, default=None, help="--to-hf: checkpoint step (default: the latest)")
    p.add_argument("--max-shard-size", type=parse_size, default=0,
                   help="--to-hf: split model.safetensors into shards of at most this size (default: one file)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.from_hf is not None:
            cfg = import_hf(args.from_hf, args.out, args.dtype, overwrite=args.overwrite,
                            scan_layers=args.scan_layers)
            print(f"wrote {args.out}: {cfg.param_count():,} params ({cfg.param_dtype}); "
                  f"python -m decoding.generate --checkpoint {args.out} --prompt ...")
        else:
            hf = export_hf(args.to_hf, args.out, args.step, args.dtype, args.max_shard_size, args.overwrite)
            print(f"wrote {args.out}: {hf['architectures'][0]} ({hf['dtype']})")
    except (ValueError, OSError) as err:  # ConversionError and ConfigError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
