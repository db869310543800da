"""End-to-end training on the embedded corpus: loss goes down, resume is exact, failures are safe."""

import dataclasses
import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import research.train as train_mod
from configs import get_config, list_configs
from research.checkpoint import Checkpointer
from research.config import apply_overrides
from research.train import DivergedError, main, train


@pytest.fixture(scope="module")
def smoke(cache_dir):
    cfg = get_config("smoke")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=cache_dir))


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def full_run(smoke, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = train(smoke, out, progress=False)
    return out, summary


def test_loss_decreases_and_run_is_recorded(full_run, smoke):
    out, summary = full_run
    by_step = losses(out)
    assert sorted(by_step) == list(range(1, smoke.steps + 1))
    first, last = np.mean([by_step[s] for s in (1, 2, 3)]), np.mean([by_step[s] for s in (18, 19, 20)])
    assert last < first - 0.3, (first, last)  # uniform over 384 tokens is 5.95
    assert summary["val_loss"] < np.log(smoke.model.vocab_size)  # better than uniform
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["model"]["d_model"] == smoke.model.d_model
    assert record["seed"] == smoke.seed
    assert {"jax", "flax", "optax", "orbax-checkpoint", "python"} <= set(record["versions"])
    assert record["devices"]["device_count"] >= 1 and record["git_commit"]
    assert (out / "tokenizer").is_dir() and (out / "summary.json").exists()
    assert Checkpointer(out / "checkpoints").all_steps() == [10, 20]


def test_resume_reproduces_uninterrupted_losses(full_run, smoke, tmp_path):
    out, _ = full_run
    train(dataclasses.replace(smoke, stop_after=10), tmp_path, progress=False)
    assert max(losses(tmp_path)) == 10
    train(smoke, tmp_path, resume=True, progress=False)
    assert losses(tmp_path) == losses(out)  # exact on CPU: same data order, same state


def test_resume_refuses_a_different_config(full_run, smoke):
    out, _ = full_run
    changed = apply_overrides(smoke, ["optim.learning_rate=1e-4"])
    with pytest.raises(ValueError, match="config differs .* optim"):
        train(changed, out, resume=True, progress=False)


def test_partial_save_leaves_previous_checkpoint_usable(full_run, smoke, tmp_path):
    """A process killed mid-save leaves only orbax's temporary directory behind."""
    out, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    partial = run / "checkpoints" / "30.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(run / "checkpoints" / "20", partial)
    for f in list(partial.rglob("*"))[::2]:  # a half-written step
        if f.is_file():
            f.unlink()
    ckpt = Checkpointer(run / "checkpoints")
    assert ckpt.latest_step() == 20
    ckpt.close()
    summary = train(smoke, run, resume=True, progress=False)  # nothing left to do: restores step 20
    assert summary["step"] == 20


def poison(quantity):
    """A train step whose `quantity` goes NaN from step 14 on (for "param_norm": a parameter becomes inf)."""
    real_build = train_mod.build_steps

    def poisoned_build(cfg, mesh):
        steps = real_build(cfg, mesh)

        def train_step(state, batch):
            new_state, metrics = steps.train(state, batch)  # donates `state`
            bad = jnp.where(new_state.step >= 14, jnp.nan, 0.0)
            if quantity == "param_norm":
                params = dict(new_state.params)
                params["final_norm"] = {"scale": params["final_norm"]["scale"] + jnp.inf * jnp.isnan(bad)}
                new_state = new_state.replace(params=params)
            return new_state, {**metrics, quantity: metrics[quantity] + bad}

        return dataclasses.replace(steps, train=train_step)

    return poisoned_build


@pytest.mark.parametrize("quantity, message", [
    ("loss", r"non-finite loss \(nan\) at step 14; "),
    ("grad_norm", r"non-finite gradient norm \(nan\) at step 14 \(loss \d\.\d+\); "),
    ("param_norm", r"non-finite parameter norm \(nan\) at step 14 \(loss \d\.\d+\); at step 15, \d+ of \d+ "
                   r"parameter arrays are non-finite: .*; "),
])
def test_divergence_names_the_quantity_and_keeps_the_last_good_checkpoint(smoke, tmp_path, monkeypatch, quantity,
                                                                          message):
    monkeypatch.setattr(train_mod, "build_steps", poison(quantity))
    with pytest.raises(DivergedError, match=message + f"last good checkpoint: step 10 in {tmp_path}/checkpoints$"):
        train(smoke, tmp_path, progress=False)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [10] and ckpt.verify(10) is None
    ckpt.close()


def test_cli_bad_input_is_one_line_and_nonzero(capsys):
    assert main(["--config", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: config='nope': unknown preset; expected one of {', '.join(list_configs())}"
    assert main(["--config", "smoke", "--set", "model.dmodel=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown override key 'model.dmodel': expected one of model.vocab_size")
    assert "\n" not in err
    assert main(["--config", "smoke", "--set", "optim.learning_rate=-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: optim.learning_rate=-1.0: expected > 0"


def test_cli_exit_code_in_a_fresh_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "research.train", "--config", "smoke", "--set",
                           "model.num_kv_heads=3", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: model.num_heads=4: must be divisible by model.num_kv_heads=3"]
    assert not any(tmp_path.iterdir())  # nothing written for a bad config


def test_bad_data_source_names_the_value(smoke, tmp_path):
    cfg = dataclasses.replace(smoke, data=dataclasses.replace(smoke.data, source=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="data.source="):
        train(cfg, tmp_path / "out", progress=False)
