"""The train benchmark's --quick mode runs end to end and writes a complete results file.

    pytest tests/test_benchmark_train.py

Checks structure and sign only: timings on a shared CPU are too noisy to assert on.
"""

import json
from pathlib import Path

from experiments import benchmark_train


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    benchmark_train.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())

    assert results["quick"] is True
    assert results["hf"] == "skipped (--quick)"
    assert results["matmul_peak_dtype"] == "float32"
    assert results["matmul_peak_flops"] == max(results["matmul_peak_measurements"]) > 0
    assert len(results["matmul_peak_measurements"]) == 2 + len(results["train"]) + 1
    assert len(results["train"]) == 2
    for run in results["train"] + [results["forward"]]:
        assert {"name", "config", "batch_size", "seq_len", "tokens_per_s", "flops_per_token", "mfu"} <= set(run)
        assert run["tokens_per_s"] > 0 and run["flops_per_token"] > 0 and run["mfu"] > 0
    for run in results["train"]:
        assert run["steps"] == 2 and run["seconds"] > 0
    assert {"jax", "flax", "torch", "transformers"} <= set(results["versions"])
    assert results["devices"]["backend"] and results["time"]
