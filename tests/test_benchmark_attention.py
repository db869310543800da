"""The attention benchmark's CPU path and its report: structure only (the measurements need a GPU).

    pytest tests/test_benchmark_attention.py
"""

import json
from pathlib import Path

import jax
import pytest

from experiments import benchmark_attention as bench


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the no-GPU path")
def test_without_gpu_writes_a_results_file_saying_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results.json"
    bench.main(["--out", str(out)])
    results = json.loads(out.read_text())
    assert results["gpu_available"] is False
    assert results["note"].startswith("no GPU available")
    assert "no GPU available" in capsys.readouterr().out
    assert results["devices"]["backend"] == jax.default_backend() and results["versions"]["jax"]


def test_planned_grid_covers_the_targets() -> None:
    assert min(bench.SEQ_LENS) == 1024 and max(bench.SEQ_LENS) == 16384
    assert set(bench.HEAD_DIMS) == {64, 128}
    assert bench.spec_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.spec_bandwidth("NVIDIA H200") == 4.8e12


def test_report_and_targets_from_synthetic_results() -> None:
    """The table and target checks, fed made-up numbers in the shape a GPU run records."""
    def flash(impl: str, fwd: float | str, fwd_bwd: float | str) -> dict:
        return {"impl": impl, "seq": 4096, "head_dim": 128, "fwd_tflops": fwd, "fwd_bwd_tflops": fwd_bwd}

    def decode(impl: str, bandwidth: float) -> dict:
        return {"impl": impl, "cache_len": 16384, "bandwidth": bandwidth}

    results = {
        "device": "NVIDIA H100 80GB HBM3", "matmul_peak_bf16_flops": 700e12, "peak_bandwidth": 3.35e12,
        "copy_bandwidth": 3.0e12,
        "flash": [flash("pallas", 300.0, 250.0), flash("pallas", 400.0, 280.0), flash("cudnn", 450.0, 300.0),
                  flash("xla", 100.0, "error: XlaRuntimeError: RESOURCE_EXHAUSTED")],
        "decode": [decode("pallas", 2.5e12), decode("pallas", 2.0e12), decode("xla", 1.0e12)],
    }
    table = bench.markdown_table(results)
    assert "NVIDIA H100 80GB HBM3" in table
    assert "| 4096 | 128 | fwd | 400.0 | 450.0 | 100.0 | 0.89 | 57% |" in table  # the best tiles are reported
    assert "| 4096 | 128 | fwd+bwd | 280.0 | 300.0 | failed | 0.93 | 40% |" in table
    assert "| 16384 | 2,500 | 1,000 | 75% |" in table
    assert bench.targets(results) == {"fwd_bwd_ge_cudnn": False, "fwd_ge_half_matmul_peak_at_4k_plus": True,
                                      "decode_ge_60pct_peak_bandwidth": True}
