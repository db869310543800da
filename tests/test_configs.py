"""Presets build and lower; overrides are typed; bad values fail with one line naming the field."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from configs import get_config, list_configs
from models.config import ConfigError
from research.config import TrainConfig, apply_overrides, config_hash, from_dict, to_dict
from research.config import MeshConfig
from research.mesh import make_mesh
from research.train_step import build_steps


@pytest.mark.parametrize("name", list_configs())
def test_every_preset_builds_and_its_train_step_lowers(name):
    """Lowered with abstract inputs only (no compile, no allocation), at a small batch and length."""
    cfg = get_config(name)
    small = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=2, seq_len=16))
    steps = build_steps(small, make_mesh(MeshConfig(data=1), jax.devices("cpu")[:1]))
    batch = jax.ShapeDtypeStruct((2, 17), jnp.int32, sharding=steps.batch_sharding)
    lowered = steps.train.lower(steps.abstract_state, batch)
    assert "stablehlo" in lowered.as_text()[:20000] or lowered.as_text()
    n_params = sum(x.size for x in jax.tree.leaves(steps.abstract_state.params))
    assert n_params == cfg.model.param_count()


def test_presets_cover_the_required_sizes():
    assert {"smoke", "tiny"} <= set(list_configs())
    assert 80e6 < get_config("llama-100m").model.param_count() < 130e6
    assert 0.9e9 < get_config("llama-1b").model.param_count() < 1.2e9


def test_overrides_are_typed():
    cfg = apply_overrides(get_config("smoke"), [
        "model.d_model=64", "optim.learning_rate=1e-3", "model.tie_embeddings=false", "steps=1e2",
        "data.source=/some/file.txt", "mesh.tensor=2"])
    assert cfg.model.d_model == 64 and cfg.optim.learning_rate == 1e-3
    assert cfg.model.tie_embeddings is False and cfg.steps == 100
    assert cfg.data.source == "/some/file.txt" and cfg.mesh.tensor == 2


def test_round_trip_and_hash():
    cfg = get_config("tiny")
    again = from_dict(TrainConfig, to_dict(cfg))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(apply_overrides(cfg, ["seed=1"])) != config_hash(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["model.num_kv_heads=3"], "model.num_heads=4: must be divisible by model.num_kv_heads=3"),
    (["model.d_model=30"], "model.d_model=30: must be divisible by model.num_heads=4"),
    (["model.dmodel=3"], "unknown override key 'model.dmodel': expected one of model.vocab_size"),
    (["optim.learning_rate=-0.1"], "optim.learning_rate=-0.1: expected > 0"),
    (["steps=2.5"], "steps='2.5': expected a value of type int"),
    (["model.tie_embeddings=maybe"], "model.tie_embeddings='maybe': expected a value of type bool"),
    (["data.tokenizer=wordpiece"], "data.tokenizer='wordpiece': expected one of bpe"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5: expected 0 < value < 1"),
    (["mesh.data=0"], "mesh.data=0: expected a positive size or -1"),
    (["model=3"], "override key 'model' names a section"),
    (["nokey"], "override 'nokey': expected key=value"),
    (["model.position=learned", "data.seq_len=128"], "data.seq_len=128: longer than model.max_seq_len=64"),
    (["optim.learning_rate=inf"], "optim.learning_rate=inf: expected a finite number"),
    (["optim.grad_clip=nan"], "optim.grad_clip=nan: expected a finite number"),
    (["model.rope_theta=inf"], "model.rope_theta=inf: expected a finite number"),
    (["model.moe.eval_capacity_factor=inf"], "model.moe.eval_capacity_factor=inf: expected a finite number"),
])
def test_bad_overrides_fail_with_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_config("smoke"), overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="config='huge': unknown preset; expected one of"):
        get_config("huge")


ROOT = Path(__file__).resolve().parent.parent


def test_research_does_not_import_configs():
    """configs names things in research, not the reverse: importing every research module (and the decoding
    command line, which reaches into research) leaves configs unimported."""
    code = ("import importlib, pkgutil, sys, research, decoding.cli\n"
            "for m in pkgutil.iter_modules(research.__path__): importlib.import_module('research.' + m.name)\n"
            "print(sorted(k for k in sys.modules if k == 'configs' or k.startswith('configs.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_research_modules_have_no_module_level_configs_import():
    for path in sorted((ROOT / "research").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only; lazy imports sit inside functions
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "configs" or n.startswith("configs.") for n in names), (path.name, names)


@pytest.mark.parametrize("command, preset, heads", [(["llm-train"], "smoke", 4),
                                                    ([sys.executable, "-m", "research.train"], "tiny", 6)])
def test_train_entry_points_resolve_presets(command, preset, heads, tmp_path):
    """Both entry points find the presets (imported lazily): a bad preset lists them, a bad override names it."""
    script = Path(sys.executable).parent / "llm-train"
    if command == ["llm-train"]:
        if not script.is_file():
            pytest.skip("llm-train is not installed in this environment")
        command = [str(script)]
    proc = subprocess.run([*command, "--config", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config='nope': unknown preset; expected one of {', '.join(list_configs())}"
    proc = subprocess.run([*command, "--config", preset, "--set", "model.d_model=26", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and not any(tmp_path.iterdir())
    err = proc.stderr.strip()
    assert err.startswith(f"error: model.d_model=26: must be divisible by model.num_heads={heads}") and "\n" not in err
