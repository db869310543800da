"""The compile-time benchmark's --quick mode runs end to end and writes a complete results file.

    pytest tests/test_benchmark_compile.py

Checks structure and sign only: timings on a shared CPU are too noisy to assert on.
"""

import json
from pathlib import Path

from experiments import benchmark_compile


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    benchmark_compile.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())

    assert results["quick"] is True and results["preset"] == "smoke" and results["repeats"] == 1
    policy = benchmark_compile.REMAT_POLICY
    assert set(results["layouts"]) == {"loop", "scan", f"loop_remat_{policy}", f"scan_remat_{policy}"}
    for key, run in results["layouts"].items():
        model = run["config"]["model"]
        assert model["scan_layers"] == key.startswith("scan")
        assert model["remat_policy"] == (policy if "remat" in key else "none")
        assert run["lower_seconds"] > 0 and run["compile_seconds"] > 0 and run["step_seconds"] > 0
        assert abs(run["total_seconds"] - run["lower_seconds"] - run["compile_seconds"]) < 1e-9
        assert run["stablehlo_chars"] > 0 and (run["temp_bytes"] is None or run["temp_bytes"] >= 0)
    assert results["layouts"]["loop"]["total_vs_loop"] == 1.0
    assert results["devices"]["backend"] and results["time"]
