"""Training as several processes joined by jax.distributed, on this machine (research/launch.py: 2 processes
of 2 CPU devices each, gloo collectives): the same losses as one process on the same global mesh, every
file and metrics record written once, an exact resume, a resume in one process on another mesh, and a
failure in one process that stops the other at once."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from research.launch import launch, process_env

TIMEOUT = 240  # seconds for one launch: a run takes ~15 s here; the bound only stops a hang


def train_argv(out: Path, cache_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "research.train", "--config", "smoke", "--out", str(out), "--no-progress",
            "--set", f"data.cache_dir={cache_dir}", "--set", "sample_tokens=0", *extra]


def in_processes(processes: int, argv: list[str], devices: int = 2) -> None:
    assert launch(argv, processes, local_devices=devices, timeout=TIMEOUT) == 0


def in_one_process(argv: list[str], devices: int) -> None:
    """A plain single-process run (no jax.distributed) with `devices` CPU devices."""
    env = process_env(0, 1, 0, devices)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):
    """One process with 4 devices, and 2 processes with 2 each, on the same global mesh (data=4)."""
    root = tmp_path_factory.mktemp("mp")
    in_one_process(train_argv(root / "one", cache_dir, "--set", "mesh.data=4"), devices=4)
    in_processes(2, train_argv(root / "two", cache_dir, "--set", "mesh.data=4"))
    return root


def test_two_processes_match_one(runs):
    one, two = losses(runs / "one"), losses(runs / "two")
    assert sorted(two) == list(range(1, 21))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=0, atol=1e-5)
    summary = json.loads((runs / "two" / "summary.json").read_text())
    assert abs(summary["val_loss"] - json.loads((runs / "one" / "summary.json").read_text())["val_loss"]) < 1e-5


def test_every_record_and_file_is_written_once(runs):
    out = runs / "two"
    kinds = [(r["step"], tuple(sorted(r))) for r in records(out)]
    assert len(kinds) == len(set(kinds))  # no record twice
    record = json.loads((out / "run.json").read_text())
    assert record["devices"]["process_count"] == 2 and record["devices"]["device_count"] == 4
    assert (out / "tokenizer").is_dir() and not list(out.rglob("*.tmp"))
    mfu = [r["mfu"] for r in records(out) if "mfu" in r]
    assert mfu and record["matmul_peak_flops"] > 0  # one peak, from process 0


@pytest.fixture(scope="module")
def stopped(runs, cache_dir):
    """The 2-process run stopped at step 10, to be resumed (each test resumes a copy)."""
    out = runs / "stopped"
    in_processes(2, train_argv(out, cache_dir, "--set", "mesh.data=4", "--set", "stop_after=10"))
    assert max(losses(out)) == 10
    return out


def test_resume_in_two_processes_is_exact(runs, stopped, cache_dir):
    out = runs / "resumed"
    shutil.copytree(stopped, out)
    in_processes(2, train_argv(out, cache_dir, "--set", "mesh.data=4", "--resume"))
    assert losses(out) == losses(runs / "two")


def test_a_two_process_checkpoint_resumes_in_one_process_on_another_mesh(runs, stopped, cache_dir):
    out = runs / "resharded"
    shutil.copytree(stopped, out)
    in_one_process(train_argv(out, cache_dir, "--set", "mesh.data=2", "--set", "mesh.tensor=2", "--resume"),
                   devices=4)
    resumed, straight = losses(out), losses(runs / "two")
    assert sorted(resumed) == sorted(straight)
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [straight[s] for s in sorted(straight)],
                               rtol=0, atol=1e-5)


def test_a_failed_process_stops_the_others_at_once(tmp_path, cache_dir):
    """Process 1 dies before joining; process 0 would wait for it in jax.distributed.initialize for minutes."""
    argv = ["sh", "-c", 'if [ "$JAX_PROCESS_ID" = 1 ]; then exit 3; fi; exec "$@"', "sh",
            *train_argv(tmp_path / "run", cache_dir)]
    start = time.monotonic()
    assert launch(argv, 2, local_devices=2, timeout=TIMEOUT) == 3
    assert time.monotonic() - start < 30


def test_a_coordinator_without_a_process_count_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    proc = subprocess.run([sys.executable, "-m", "research.train", "--config", "smoke", "--out", str(tmp_path / "r"),
                           "--coordinator", "localhost:1234"], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --coordinator localhost:1234: also needs --num-processes (JAX_NUM_PROCESSES) and --process-id "
        "(JAX_PROCESS_ID)"]


@pytest.mark.parametrize("argv, message", [
    (["--processes", "0", "--", "true"], "--processes=0: expected >= 1"),
    (["--processes", "2", "--local-devices", "0", "--", "true"], "--local-devices=0: expected >= 1"),
    (["--processes", "2", "--timeout", "-1", "--", "true"], "--timeout=-1.0: expected > 0"),
    (["--processes", "2", "--"], "expected a command after --"),
    (["--processes", "2", "true"], "expected `-- COMMAND ...` after the options"),
])
def test_bad_launch_flags_are_one_line(argv, message, capsys):
    from research.launch import main

    assert main(argv) == 2
    assert capsys.readouterr().err == f"python -m research.launch: error: {message}\n"
