"""Convert Hugging Face checkpoints (Llama, Mistral, Qwen2, Mixtral) to our run directories and back.

    python -m research.convert --from-hf HF_DIR --out RUN_DIR [--dtype auto|float32|bfloat16]
    python -m research.convert --to-hf RUN_DIR --out HF_DIR [--step STEP] [--dtype auto|float32|bfloat16]
        [--max-shard-size 5GB]

--from-hf reads a local model folder: config.json, model.safetensors (or model.safetensors.index.json and
its shards) and, when present, tokenizer.json or tokenizer.model with tokenizer_config.json. It writes a
run directory that `python -m decoding.generate --checkpoint RUN_DIR` reads: run.json (a TrainConfig with
the mapped model config, and the source config.json under "hf"), checkpoints/0 (params only, orbax) and
tokenizer/ (the Hugging Face tokenizer files). dtype auto keeps bf16 checkpoints in bf16, else float32.
--to-hf writes config.json and model.safetensors (shards of at most --max-shard-size, with an index) from a
run directory (any run whose model a family computes: research/hf_config.py `export_family`), plus the
tokenizer files when the run's tokenizer came from Hugging Face. dtype auto is the run's param dtype.

Both write into a temporary sibling of --out and rename it into place when complete, so a failure leaves
nothing behind; --out must not exist. Errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, NoReturn

import jax
from jax.sharding import Mesh

from models.config import ModelConfig
from models.sharding import logical_shardings
from models.transformer import unbox
from research.checkpoint import Checkpointer
from research.config import MeshConfig, TrainConfig, from_dict, to_dict
from research.hf_checkpoint import abstract_params, load_params, read_hf_config, save_weights
from research.hf_config import ConversionError, export_family, family_of, hf_config_from_model, model_config_from_hf
from research.hf_tokenizer import HFTokenizer, copy_hf_files, is_hf_tokenizer
from research.mesh import make_mesh
from research.run_record import run_record, write_json_atomic

DTYPES = ("auto", "float32", "bfloat16")
UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9}


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` if the block succeeds and removed if it fails."""
    if out.exists():
        raise ConversionError(f"--out {out} already exists; pick a new path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_hf(hf_dir: Path, out: Path, dtype: str = "auto", mesh: Mesh | None = None) -> ModelConfig:
    """Writes the run directory `out` from a Hugging Face model folder; returns the model config."""
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf, dtype)
    tokenizer = HFTokenizer.load(hf_dir) if is_hf_tokenizer(hf_dir) else None
    with staged(Path(out)) as tmp:
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


def load_run_params(run_dir: Path, step: int | None = None, mesh: Mesh | None = None) -> tuple[dict, Any]:
    """(run.json, params) of a run directory: a training run's or a converted one."""
    record_path = Path(run_dir) / "run.json"
    if not record_path.is_file():
        raise ConversionError(f"{run_dir}: no run.json (expected a run directory)")
    record = json.loads(record_path.read_text())
    cfg = from_dict(TrainConfig, record["config"]).model
    mesh = mesh or make_mesh(MeshConfig(data=1), jax.devices()[:1])
    boxed = abstract_params(cfg)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unbox(boxed),
                            logical_shardings(boxed, mesh))
    ckpt = Checkpointer(Path(run_dir) / "checkpoints")
    try:
        steps = ckpt.all_steps()
        if not steps or (step is not None and step not in steps):
            raise ConversionError(f"{run_dir}: no checkpoints saved" if not steps else
                                  f"--step {step}: not among the saved checkpoints {steps}")
        params = ckpt.restore_params(max(steps) if step is None else step, abstract)
    finally:
        ckpt.close()
    return record, params


def export_hf(run_dir: Path, out: Path, step: int | None = None, dtype: str = "auto",
              max_shard_bytes: int = 0) -> dict[str, Any]:
    """Writes the Hugging Face folder `out` from a run directory; returns its config.json."""
    run_dir = Path(run_dir)
    record, params = load_run_params(run_dir, step)
    cfg = from_dict(TrainConfig, record["config"]).model
    export_family(cfg)  # fail before writing anything
    dtype = cfg.param_dtype if dtype == "auto" else dtype
    tokenizer_dir = run_dir / "tokenizer"
    hf_tokenizer = tokenizer_dir.is_dir() and is_hf_tokenizer(tokenizer_dir)
    base = record.get("hf", {}).get("config")
    ids = None
    if base is None and hf_tokenizer:
        tok = HFTokenizer.load(tokenizer_dir)
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    hf = hf_config_from_model(cfg, dtype, base, ids)
    with staged(Path(out)) as tmp:
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line and exit status 2, instead of the usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m research.convert", description=__doc__.split("\n")[0])
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", type=Path, metavar="HF_DIR", help="Hugging Face model folder to import")
    way.add_argument("--to-hf", type=Path, metavar="RUN_DIR", help="run directory to export")
    p.add_argument("--out", type=Path, required=True, help="directory to create (must not exist)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="parameter dtype of the result")
    p.add_argument("--step", type=int, default=None, help="--to-hf: checkpoint step (default: the latest)")
    p.add_argument("--max-shard-size", type=parse_size, default=0,
                   help="--to-hf: split model.safetensors into shards of at most this size (default: one file)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.from_hf is not None:
            cfg = import_hf(args.from_hf, args.out, args.dtype)
            print(f"wrote {args.out}: {cfg.param_count():,} params ({cfg.param_dtype}); "
                  f"python -m decoding.generate --checkpoint {args.out} --prompt ...")
        else:
            hf = export_hf(args.to_hf, args.out, args.step, args.dtype, args.max_shard_size)
            print(f"wrote {args.out}: {hf['architectures'][0]} ({hf['dtype']})")
    except (ValueError, OSError) as err:  # ConversionError and ConfigError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
