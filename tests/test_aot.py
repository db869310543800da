"""Ahead-of-time compilation for named targets (research/aot.py, research/aot_targets.py).

The logic (targets, meshes, the fits decision, the GPU target config) runs everywhere; the real compiles
need the `aot` extra (libtpu for TPU targets, the CUDA plugin for GPU ones) and skip, saying so, without it.
They run the command line in a fresh process: it must start jax on the CPU with the plugins it needs.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from research import aot, aot_targets
from research.devices import GiB

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("spec, platform, kind, dims", [
    ("v5e:2x2", "tpu", "TPU v5 lite", (2, 2)),
    ("V6E:2X4", "tpu", "TPU v6 lite", (2, 4)),
    ("v5p:2x2x1", "tpu", "TPU v5", (2, 2, 1)),
    ("v4:2x2x2", "tpu", "TPU v4", (2, 2, 2)),
    ("h100x8", "gpu", "NVIDIA H100 80GB HBM3", (1, 8)),
    ("h200x16", "gpu", "NVIDIA H200", (2, 8)),
    ("a100x1", "gpu", "NVIDIA A100-SXM4-80GB", (1, 1)),
])
def test_targets_parse(spec: str, platform: str, kind: str, dims: tuple[int, ...]) -> None:
    target = aot_targets.parse_target(spec)
    assert (target.platform, target.accelerator.device_kinds[0], target.dims) == (platform, kind, dims)
    assert target.num_devices == math.prod(dims)


@pytest.mark.parametrize("spec, message", [
    ("v5e:2x2x2", "v5e slices have 2 positive dimensions"),
    ("v5p:2x2", "v5p slices have 3 positive dimensions"),
    ("v5e:0x2", "v5e slices have 2 positive dimensions"),
    ("h100x12", "expected 1 to 8 GPUs on one host, or whole hosts of 8"),
    ("h100x0", "expected 1 to 8 GPUs"),
    ("v7:2x2", "expected one of v4:AxBxC"),
    ("tpu", "expected one of v4:AxBxC"),
    ("", "expected one of v4:AxBxC"),
])
def test_bad_targets_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        aot_targets.parse_target(spec)
    assert f"target={spec!r}" in str(error.value) and "\n" not in str(error.value)


def run_main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        aot.main(list(argv))
    return exit_.value.code, capsys.readouterr().err


def test_command_line_refuses_in_one_line(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = run_main(capsys, "--config", "smoke", "--target", "v9:2x2")
    assert code == 2 and err.count("\n") == 1 and "target='v9:2x2': expected one of" in err
    code, err = run_main(capsys, "--config", "smoke", "--target", "v5e:2x2", "--mesh", "model=2")
    assert code == 2 and err.count("\n") == 1 and "--mesh 'model=2': expected comma-separated AXIS=SIZE" in err
    monkeypatch.setattr(aot_targets, "toolchain_missing", lambda platform: f"no {platform} toolchain here")
    code, err = run_main(capsys, "--config", "smoke", "--target", "h100x8")
    assert code == 2 and err == "python -m research.aot: error: no gpu toolchain here\n"


def test_toolchain_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aot_targets.importlib.util, "find_spec", lambda name: None)
    assert "libtpu" in aot_targets.toolchain_missing("tpu") and ".[aot]" in aot_targets.toolchain_missing("tpu")
    assert "jax-cuda12-plugin" in aot_targets.toolchain_missing("gpu")


def test_mesh_flag_becomes_overrides() -> None:
    assert aot.parse_mesh("data=2, fsdp=2") == ["mesh.data=2", "mesh.fsdp=2"]
    assert aot.parse_mesh("") == []


def test_environment_for_a_tpu_target(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TF_CPP_MIN_LOG_LEVEL"):
        monkeypatch.setenv(name, "")  # restored after the test
        monkeypatch.delenv(name)
    aot_targets.prepare_environment(aot_targets.parse_target("v5p:2x2x1"))
    assert os.environ["JAX_PLATFORMS"] == "cpu" and os.environ["TPU_ACCELERATOR_TYPE"] == "v5p-8"
    assert "," not in os.environ["TPU_WORKER_HOSTNAMES"]  # one worker: not a multi-host slice
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE")
    aot_targets.prepare_environment(aot_targets.parse_target("v5e:4x4"))
    assert os.environ["TPU_ACCELERATOR_TYPE"] == "v5litepod-16"


def test_gpu_target_config_describes_the_chip() -> None:
    text = aot_targets.gpu_target_config(aot_targets.parse_target("h100x8").accelerator)
    assert 'name: "NVIDIA H100 80GB HBM3"' in text and "core_count: 132" in text
    assert f"device_memory_size: {80 * GiB}" in text and "major: 9 minor: 0" in text
    assert text.count("{") == text.count("}")


def memory_analysis(arguments: int, outputs: int, aliased: int, temps: int, code: int) -> types.SimpleNamespace:
    """Looks like jax's CompiledMemoryStats."""
    return types.SimpleNamespace(argument_size_in_bytes=arguments, output_size_in_bytes=outputs,
                                 alias_size_in_bytes=aliased, temp_size_in_bytes=temps,
                                 generated_code_size_in_bytes=code)


def test_fits_decision() -> None:
    # A train step donates its state: outputs reuse the arguments' buffers, so they count once.
    train = aot.memory_report("train", memory_analysis(4 * GiB, 4 * GiB, 4 * GiB, 10 * GiB, GiB // 2), 1e12, 2e12, 3.0)
    assert train.total == 4 * GiB + 10 * GiB + GiB // 2
    decode = aot.memory_report("decode", memory_analysis(GiB, GiB, 0, GiB, 0), None, 1e9, 1.0)
    assert decode.total == 3 * GiB
    assert aot.does_not_fit([train, decode], 16 * GiB, "v5e:2x2") is None
    assert aot.does_not_fit([train], train.total, "exactly full") is None
    reason = aot.does_not_fit([decode, train], 8 * GiB, "4 x TPU v5 lite (v5e:2x2)")
    assert reason == ("the train step needs 14.50 GiB per device, more than the 8 GiB of HBM of "
                      "4 x TPU v5 lite (v5e:2x2)")
    table = aot.format_table([train, decode], 8 * GiB)
    assert "14.50G" in table and " no " in table and " yes " in table and "n/a" in table


def compile_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "research.aot", "--config", "smoke", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def needs(platform: str) -> pytest.MarkDecorator:
    missing = aot_targets.toolchain_missing(platform)
    return pytest.mark.skipif(missing is not None, reason=missing or "")


# ~8.6e9 parameters (a 4M-token vocabulary at d_model 2048): params, gradients and AdamW's moments are
# ~128 GiB per device under data parallelism, over any chip's HBM.
TOO_BIG = ("--set", "model.vocab_size=4194304", "--set", "model.d_model=2048")


def check_compiled(result: subprocess.CompletedProcess, devices: int, mesh: dict) -> dict:
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_devices"] == devices and {k: report["mesh"][k] for k in mesh} == mesh
    assert [p["name"] for p in report["programs"]] == ["train", "decode"]
    for program in report["programs"]:
        assert program["fits"] and 0 < program["total"] < report["hbm_bytes"] and program["model_flops"] > 0
    return report


@needs("tpu")
def test_compiles_for_a_tpu_slice() -> None:
    report = check_compiled(compile_cli("--target", "v5e:2x2", "--mesh", "data=2,fsdp=2", "--json"),
                            4, {"data": 2, "fsdp": 2})
    assert report["device_kind"] == "TPU v5 lite"
    assert all(p["xla_flops"] > 0 for p in report["programs"])
    result = compile_cli("--target", "v5e:2x2", *TOO_BIG)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "does not fit" in result.stderr or "more than the 16 GiB of HBM" in result.stderr


@needs("gpu")
def test_compiles_for_gpus() -> None:
    report = check_compiled(compile_cli("--target", "h100x8", "--mesh", "data=2,fsdp=2,tensor=2", "--json"),
                            8, {"data": 2, "fsdp": 2, "tensor": 2})
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3"
    # The GPU compiler does not refuse a program over its memory: the comparison with HBM does.
    result = compile_cli("--target", "a100x1", *TOO_BIG)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "more than the 80 GiB of HBM of 1 x NVIDIA A100-SXM4-80GB (a100x1)" in result.stderr
