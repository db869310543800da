"""The constrained-decoding benchmark's --quick mode runs end to end and writes a complete results file.

Checks structure and sign only: timings on a shared CPU are too noisy to assert on.
"""

import json
from pathlib import Path

from experiments import benchmark_constrained


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    benchmark_constrained.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["target_ratio_max"] == 1.10
    assert set(results["step"]) == {"greedy_b1", "greedy_b8", "beam4_b1"}
    for mode in results["step"].values():
        assert mode["ratio"] > 0 and all(v > 0 for v in mode["seconds_per_step"].values())
        assert 0 < mode["steps"]["constrained"] <= 8 and mode["steps"]["plain"] == 8  # plain never stops early
    for row in results["compile"].values():
        assert row["states"] > 1 and row["table_bytes"] > 0 and row["outlines_index_seconds"] > 0
    strings = results["strings"]
    assert strings["maxLength_200"]["states"] > strings["maxLength_20"]["states"] > 20
    assert "versions" in results and results["model"]["vocab_size"] == 1024
