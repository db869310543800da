"""Reading a run directory back: the one loader of a model, its parameters and its tokenizer.

    from research.runs import load_run
    cfg, params, tokenizer = load_run("runs/tiny")           # the latest checkpoint
    cfg, params, tokenizer = load_run("runs/tiny", step=200)

A run directory is what `python -m research.train --out DIR` writes (run.json, checkpoints/ with whole train
states, tokenizer/) or what `python -m research.convert --from-hf HF_DIR --out DIR` writes (run.json,
checkpoints/0 with the params only, tokenizer/ with the Hugging Face files when the model folder had them).
Only the params are read from a checkpoint. The decoding command line, the converter's export and the
studies all load runs through `load_run`.

Errors are one-line `RunError`s (a ValueError) naming the directory or the step; a checkpoint whose files do
not match its manifest (research/checkpoint.py) is one, naming the file and the steps that do verify.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from models.config import ModelConfig
from models.sharding import logical_shardings
from models.transformer import init_params, unbox
from research.checkpoint import Checkpointer, CheckpointError
from research.config import MeshConfig, TrainConfig, from_dict
from research.mesh import make_mesh
from research.tokenizer import Tokenizer, load_tokenizer

RECORD_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"


class RunError(ValueError):
    """A run directory that cannot be read: no run.json, no checkpoints, a step that was not saved."""


def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding a run.json (a training run or a converted checkpoint)."""
    return (Path(path) / RECORD_FILE).is_file()


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's run.json: the resolved config under "config" (and, for a converted checkpoint, the source
    config.json under "hf")."""
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: no {RECORD_FILE} (expected a run directory written by research.train or "
                       "research.convert --from-hf)")
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise RunError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RunError(f"{path}: no \"config\" object")
    return record


def read_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The run's resolved TrainConfig (model, data, optimizer, ...), from its run.json."""
    return from_dict(TrainConfig, _upgraded(read_run_record(run_dir)["config"]))


def _upgraded(config: dict[str, Any]) -> dict[str, Any]:
    """A run.json written before model.remat (a bool) became model.remat_policy, in today's terms."""
    model = config.get("model")
    if isinstance(model, dict) and "remat" in model and "remat_policy" not in model:
        model = {k: v for k, v in model.items() if k != "remat"}
        model["remat_policy"] = "full" if config["model"]["remat"] else "none"
        config = {**config, "model": model}
    return config


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """The saved checkpoint steps, ascending (none when checkpoints/ is missing; nothing is created)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    ckpt = Checkpointer(directory)
    try:
        return sorted(ckpt.all_steps())
    finally:
        ckpt.close()


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> Any:
    """ShapeDtypeStructs of `Transformer(cfg)`'s params, sharded over `mesh` by their logical axes."""
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), seq_len=1))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unbox(boxed),
                        logical_shardings(boxed, mesh))


def load_run(run_dir: str | os.PathLike, step: int | None = None, *,
             mesh: Mesh | None = None) -> tuple[ModelConfig, Any, Tokenizer | None]:
    """(model config, params, tokenizer) of a run directory, from checkpoint `step` (default: the latest).

    The params are placed on `mesh` by their logical axes (default: the first device), in the layout the run's
    model has (stacked blocks when `cfg.scan_layers`; `models.layers.unstack_layers` / `stack_layers`
    convert). The tokenizer is None only for a converted checkpoint whose Hugging Face folder had no
    tokenizer files.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir).model
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise RunError(f"{run_dir}: no checkpoints saved in {run_dir / CHECKPOINT_DIR}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunError(f"step={step}: not among the saved checkpoints {steps} in {run_dir / CHECKPOINT_DIR}")
    mesh = mesh if mesh is not None else make_mesh(MeshConfig(data=1), jax.devices()[:1])
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR)
    try:
        params = ckpt.restore_params(step, abstract_params(cfg, mesh))
    except CheckpointError as err:
        good = [s for s in steps if s != step and ckpt.verify(s) is None]
        raise RunError(f"{err}" + (f" (steps that verify: {good})" if good else "")) from None
    finally:
        ckpt.close()
    tokenizer_dir = run_dir / TOKENIZER_DIR
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
    return cfg, params, tokenizer
