"""Faults done for real on the smoke preset: damaged checkpoints, a full or unwritable --out, a sweep worker
that dies, bad command-line input. Each must end in one clear line, a non-zero exit where a command is
involved, and nothing lost: the last good checkpoint intact, nothing left behind by a refused run."""

import dataclasses
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import decoding.cli as decode_cli
import research.train as train_mod
from configs import get_config
from research.checkpoint import MANIFEST, Checkpointer, CheckpointError
from research.sweep import Grid, Sweep, axis, run_sweep, train_cell
from research.train import train


@pytest.fixture(scope="module")
def smoke(cache_dir):
    cfg = get_config("smoke")
    return dataclasses.replace(cfg, sample_tokens=0, data=dataclasses.replace(cfg.data, cache_dir=cache_dir))


@pytest.fixture(scope="module")
def full_run(smoke, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(smoke, out, progress=False)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def biggest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "default").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(step_dir: Path) -> str:
    path = biggest_data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path.relative_to(step_dir))


def flip_a_byte(step_dir: Path) -> str:
    path = biggest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(data))
    return str(path.relative_to(step_dir))


def empty_the_metadata(step_dir: Path) -> str:
    (step_dir / "default" / "_METADATA").write_bytes(b"")
    return "default/_METADATA"


def delete_a_folder(step_dir: Path) -> str:
    shutil.rmtree(step_dir / "default")
    return "default/"


def remove_the_manifest(step_dir: Path) -> str:
    (step_dir / MANIFEST).unlink()
    return MANIFEST


CORRUPTIONS = [truncate, flip_a_byte, empty_the_metadata, delete_a_folder, remove_the_manifest]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(corrupt, full_run, smoke, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    named = corrupt(run / "checkpoints" / "20")
    capsys.readouterr()
    summary = train(smoke, run, resume=True, progress=False)
    line = capsys.readouterr().err.strip().splitlines()[0]
    assert line.startswith("checkpoint step 20 fails verification: ") and named.rstrip("/") in line
    assert line.endswith(f"moved to {run}/checkpoints.rejected/20, resuming from step 10")
    assert summary["step"] == 20 and losses(run) == losses(full_run)  # retrained 10 -> 20, exactly
    ckpt = Checkpointer(run / "checkpoints")
    assert ckpt.all_steps() == [10, 20] and ckpt.verify(20) is None  # step 20 saved again, sealed
    ckpt.close()


def test_no_checkpoint_that_verifies_is_one_error_and_moves_nothing(full_run, smoke, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    flip_a_byte(run / "checkpoints" / "20")
    remove_the_manifest(run / "checkpoints" / "10")
    with pytest.raises(CheckpointError, match=r"^no checkpoint in .* verifies \(step 20: .* has changed .*; "
                                              r"step 10: no manifest.json"):
        train(smoke, run, resume=True, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20"]


def test_decoding_a_damaged_checkpoint_is_one_line(full_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    named = truncate(run / "checkpoints" / "20")
    assert decode_cli.main(["--checkpoint", str(run), "--prompt", "The", "--no-stream"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint step 20 in {run}/checkpoints fails verification: {named} has "
                   f"{(run / 'checkpoints' / '20' / named).stat().st_size} bytes, the manifest says "
                   f"{(full_run / 'checkpoints' / '20' / named).stat().st_size} (steps that verify: [10])"]


# --- the disk ---------------------------------------------------------------------------------------------

@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs folder (size-limited or read-only), where this machine allows it."""
    points = []

    def make(options: str) -> Path:
        point = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                               capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        points.append(point)
        return point

    yield make
    for point in points:
        subprocess.run(["umount", str(point)], capture_output=True)


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """research.train's exit status (returned, or from argparse's SystemExit) and its stderr lines."""
    try:
        code = train_mod.main([*argv, "--no-progress"])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_out_is_a_file_or_under_one(smoke, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("keep me")
    for out in (path, path / "run"):
        code, err = run_cli(["--config", "smoke", "--out", str(out)], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --out {out}: not writable (")
    assert path.read_text() == "keep me"


def test_out_on_a_read_only_file_system(mount, capsys):
    out = mount("ro,size=1m") / "run"
    code, err = run_cli(["--config", "smoke", "--out", str(out)], capsys)
    assert (code, err) == (2, [f"error: --out {out}: not writable (Read-only file system: {out})"])


def test_out_without_room_for_a_checkpoint_is_refused_before_training(mount, smoke, capsys):
    out = mount("size=64k") / "run"
    code, err = run_cli(["--config", "smoke", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: --out {out}: 0.1 MB free, a checkpoint needs about ")
    assert not out.exists()  # a refused run leaves nothing


def fill_before(step: int, monkeypatch) -> None:
    """The disk fills up just before the save of `step` (after the earlier saves are sealed)."""
    real_save = Checkpointer.save

    def save(self, at, state):
        if at == step:
            self.wait()
            with (self.directory.parent / "filler").open("wb") as f:
                try:
                    while True:
                        f.write(bytes(1 << 16))
                        f.flush()
                except OSError:
                    pass
        return real_save(self, at, state)

    monkeypatch.setattr(Checkpointer, "save", save)


# orbax's background writers leave unretrieved futures behind when the disk is full; they are its own noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_stops_at_the_failed_save_with_the_last_checkpoint_intact(mount, smoke, monkeypatch, capsys):
    out = mount("size=4m") / "run"
    fill_before(20, monkeypatch)
    code, err = run_cli(["--config", "smoke", "--set", f"data.cache_dir={smoke.data.cache_dir}", "--out", str(out)],
                        capsys)
    assert code == 2
    assert err[-1] == (f"error: checkpoint step 20 could not be written to {out}/checkpoints: No space left on "
                       f"device; last good checkpoint: step 10 in {out}/checkpoints")
    ckpt = Checkpointer(out / "checkpoints")
    assert ckpt.all_steps() == [10] and ckpt.verify(10) is None
    ckpt.close()
    monkeypatch.undo()
    (out / "filler").unlink()  # space again: the run resumes from step 10 and finishes
    assert run_cli(["--config", "smoke", "--set", f"data.cache_dir={smoke.data.cache_dir}", "--out", str(out),
                    "--resume"], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["step"] == 20


def test_a_failed_async_save_is_noticed_at_the_next_step(smoke, tmp_path, monkeypatch):
    """Where the disk cannot be filled, the fault is injected where orbax reports a background failure."""
    calls = []
    real_check = Checkpointer.poll

    def poll(self):
        calls.append(self._pending)
        if self._pending == 10:
            self._manager.wait_until_finished()
            self._pending = None
            self._failed(10, OSError(28, "No space left on device", str(self.directory / "10")))
        real_check(self)

    monkeypatch.setattr(Checkpointer, "poll", poll)
    with pytest.raises(CheckpointError, match=r"^checkpoint step 10 could not be written to .*: No space left on "
                                              r"device: .*/10; last good checkpoint: none$"):
        train(smoke, tmp_path / "run", progress=False)
    assert calls == [None] * 10 + [10]  # the step after the save, not the next save (step 20)


# --- sweeps and the command lines ------------------------------------------------------------------------

def dies_for_lr_2e3(config: dict, directory: str) -> dict:
    """research.sweep.train_cell, except that the worker training learning_rate 2e-3 exits at once."""
    if config["optim"]["learning_rate"] == 2e-3:
        os._exit(1)
    return train_cell(config, directory)


def test_a_sweep_worker_killed_hard_fails_only_its_cell(smoke, tmp_path):
    sweep = Sweep("kill", "smoke", ("steps=4", "checkpoint_every=0", "sample_tokens=0",
                                    f"data.cache_dir={smoke.data.cache_dir}"),
                  (Grid("lr", (axis("optim.learning_rate", (1e-3, 2e-3, 3e-3)),)),))
    rows = run_sweep(sweep, tmp_path, jobs=2, progress=False, train_fn=dies_for_lr_2e3)
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    assert rows[1]["error"] == "WorkerDied: the worker process training this cell died (exit code 1)"
    for row in (rows[0], rows[2]):
        assert json.loads((tmp_path / "runs" / row["key"] / "summary.json").read_text())["step"] == 4
    recorded = json.loads((tmp_path / "sweep.json").read_text())["cells"]
    assert [c.get("error") for c in recorded] == [None, rows[1]["error"], None]


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "python -m research.train: error: unrecognized arguments: --bogus"),
    (["--set", "optim.learning_rate=inf"], "error: optim.learning_rate=inf: expected a finite number"),
    (["--set", "model.num_kv_heads=3"], "error: model.num_heads=4: must be divisible by model.num_kv_heads=3"),
])
def test_refused_runs_are_one_line_and_leave_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--config", "smoke", *argv, "--out", str(out)], capsys) == (2, [message])
    assert not out.exists()


def test_a_binary_data_file_is_one_line_and_leaves_nothing(smoke, tmp_path, capsys):
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 16)
    out = tmp_path / "run"
    code, err = run_cli(["--config", "smoke", "--set", f"data.source={data}", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: data.source='{data}': not UTF-8 text")
    assert not out.exists()
