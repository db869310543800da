"""Sweeps: grids expand to the right cells, finished runs are reused, a failed run does not stop the rest."""

import json
import os
from pathlib import Path

import pytest

from models.config import ConfigError
from research.config import config_hash
from research.sweep import Grid, Sweep, axis, load_runs, run_sweep, zip_axis


def fake_train(config: dict, directory: str) -> dict:
    """Stands in for research.train: writes what a finished run leaves; fails for learning_rate 0.5."""
    if config["optim"]["learning_rate"] == 0.5:
        raise RuntimeError("diverged\nsecond line")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"config": config}))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    calls = out.parent.parent / "calls.txt"
    with calls.open("a") as f:
        f.write(out.name + "\n")
    (out / "summary.json").write_text(json.dumps({"val_loss": config["optim"]["learning_rate"]}))
    return {}


def calls(out: Path) -> list[str]:
    path = out / "calls.txt"
    return path.read_text().split() if path.exists() else []


SWEEP = Sweep("test", "smoke", ("steps=7",), (
    Grid("lr", (axis("optim.learning_rate", (1e-3, 0.5)), axis("model.d_model", (32, 64), "d")), seeds=(0, 1)),
    Grid("again", (axis("optim.learning_rate", (1e-3,)),)),  # lr=1e-3, d=32, seed 0: the same config as above
))


def test_cells_are_the_product_of_axes_over_seeds():
    cells = SWEEP.cells()
    first = [c for c in cells if c.grid == "lr"]
    assert [(c.condition, c.seed) for c in first] == [
        (f"learning_rate={lr},d={d}", s) for lr in (1e-3, 0.5) for d in (32, 64) for s in (0, 1)]
    assert all(c.config.steps == 7 for c in cells)
    assert first[3].config.model.d_model == 64 and first[3].config.seed == 1
    assert first[3].key == config_hash(first[3].config)
    shared = [c for c in cells if c.grid == "again"]
    assert len(shared) == 1 and shared[0].key == first[0].key


def test_zip_axis_moves_keys_together():
    options = zip_axis(["a", "b"], model__d_model=(32, 64), model__d_ff=(48, 96))
    assert options == (("a", ("model.d_model=32", "model.d_ff=48")), ("b", ("model.d_model=64", "model.d_ff=96")))
    with pytest.raises(ConfigError, match="equal lengths"):
        zip_axis(["a"], model__d_model=(32, 64))


def test_bad_override_in_a_sweep_names_the_key():
    bad = Sweep("bad", "smoke", (), (Grid("g", (axis("model.nope", (1,)),)),))
    with pytest.raises(ConfigError, match="model.nope"):
        bad.cells()


def test_failed_runs_are_recorded_finished_runs_reused(tmp_path):
    rows = run_sweep(SWEEP, tmp_path, progress=False, train_fn=fake_train)
    by_status = {}
    for row in rows:
        by_status.setdefault(row["status"], set()).add(row["key"])
    assert len(by_status["done"]) == 4 and len(by_status["failed"]) == 4  # the shared cell trained once
    assert len(calls(tmp_path)) == 4
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["error"] == "RuntimeError: diverged"
    assert "Traceback" in json.loads((tmp_path / "runs" / failed["key"] / "failed.json").read_text())["traceback"]
    assert json.loads((tmp_path / "sweep.json").read_text())["cells"] == rows

    again = run_sweep(SWEEP, tmp_path, progress=False, train_fn=fake_train)
    assert len(calls(tmp_path)) == 4  # nothing finished is trained again; failed ones are retried (and fail)
    assert {r["status"] for r in again if r["key"] in by_status["done"]} == {"reused"}
    assert {r["status"] for r in again if r["key"] in by_status["failed"]} == {"failed"}
    finished = load_runs(tmp_path)
    assert len(finished) == 5 and {r["grid"] for r in finished} == {"lr", "again"}
    assert all(r["summary"]["val_loss"] == 1e-3 for r in finished)


def test_parallel_jobs_give_the_same_runs(tmp_path):
    sweep = Sweep("par", "smoke", (), (Grid("lr", (axis("optim.learning_rate", (1e-3, 2e-3, 0.5)),)),))
    rows = run_sweep(sweep, tmp_path, jobs=2, progress=False, train_fn=fake_train, prepare=None)
    assert sorted(r["status"] for r in rows) == ["done", "done", "failed"]
    assert sorted(calls(tmp_path)) == sorted(r["key"] for r in rows if r["status"] == "done")


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--jobs=0"):
        run_sweep(SWEEP, tmp_path, jobs=0, progress=False, train_fn=fake_train)


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    sweep = Sweep("stop", "smoke", (), (Grid("lr", (axis("optim.learning_rate", (1e-3, 2e-3, 3e-3)),)),))

    def interrupted(config: dict, directory: str) -> dict:
        if config["optim"]["learning_rate"] == 2e-3:
            raise KeyboardInterrupt
        return fake_train(config, directory)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, progress=False, train_fn=interrupted)
    statuses = [c["status"] for c in json.loads((tmp_path / "sweep.json").read_text())["cells"]]
    assert statuses == ["done", "pending", "pending"]
    rows = run_sweep(sweep, tmp_path, progress=False, train_fn=fake_train)
    assert [r["status"] for r in rows] == ["reused", "done", "done"]
    assert len(calls(tmp_path)) == 3


def dying_train(config: dict, directory: str) -> dict:
    """fake_train, except that the process training learning_rate 2e-3 dies at once (as under the OOM killer)."""
    if config["optim"]["learning_rate"] == 2e-3:
        os._exit(9)
    return fake_train(config, directory)


def test_a_worker_that_dies_fails_only_its_cell(tmp_path):
    sweep = Sweep("par", "smoke", (), (Grid("lr", (axis("optim.learning_rate", (1e-3, 2e-3, 3e-3, 4e-3)),)),))
    rows = run_sweep(sweep, tmp_path, jobs=2, progress=False, train_fn=dying_train, prepare=None)
    status = {r["condition"]: (r["status"], r.get("error", "")) for r in rows}
    assert status["learning_rate=0.002"] == ("failed", "WorkerDied: the worker process training this cell died "
                                             "(exit code 9)")
    assert [status[f"learning_rate={lr}"][0] for lr in (0.001, 0.003, 0.004)] == ["done"] * 3
    assert sorted(calls(tmp_path)) == sorted(r["key"] for r in rows if r["status"] == "done")


def test_a_cell_whose_data_cannot_be_prepared_fails_alone(tmp_path):
    sweep = Sweep("par", "smoke", (), (Grid("src", (axis("data.source", ("embedded", str(tmp_path / "missing.txt"))),)),))

    rows = run_sweep(sweep, tmp_path, jobs=2, progress=False, train_fn=fake_train)  # the real prepare_data
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert rows[1]["error"].startswith("ConfigError: data.source=") and "missing.txt" in rows[1]["error"]
    failed = json.loads((tmp_path / "runs" / rows[1]["key"] / "failed.json").read_text())
    assert failed["error"] == rows[1]["error"] and "Traceback" in failed["traceback"]
