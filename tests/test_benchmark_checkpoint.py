"""The checkpoint benchmark's --quick mode runs end to end and writes a complete results file.

Checks structure and sign only: timings on a shared CPU are too noisy to assert on.
"""

import json
from pathlib import Path

from experiments import benchmark_checkpoint


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    benchmark_checkpoint.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["quick"] is True and list(results["presets"]) == ["smoke"]
    smoke = results["presets"]["smoke"]
    assert set(smoke["seconds"]) == {"save", "seal", "restore", "verify"}
    assert all(v > 0 for v in smoke["seconds"].values())
    assert 0 < smoke["checkpoint_bytes"] and smoke["seal_vs_save"] > 0 and smoke["verify_vs_restore"] > 0
    assert "versions" in results and "load_average_start_end" in results
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the scratch checkpoints are gone
