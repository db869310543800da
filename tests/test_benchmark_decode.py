"""The decode benchmark's --quick mode runs end to end and writes a complete results file and figure.

Checks structure only: timings on a shared CPU are too noisy to assert on.
"""

import json
from pathlib import Path

from experiments import benchmark_decode


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    benchmark_decode.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())

    assert results["quick"] is True and results["target_ratio_vs_hf_batch1"] == 5.0
    assert [(r["strategy"], r["batch_size"]) for r in results["throughput"]] == [
        ("greedy", 1), ("top-p", 1), ("beam-4", 1)]
    for run in results["throughput"]:
        assert run["tokens_per_s"] > 0 and run["seconds"] > 0 and run["first_call_seconds"] > 0
        assert run["hf_tokens_per_s"] == "skipped (--quick)"
    streaming = results["streaming"]
    assert set(streaming["runs"]) == {"plain", "every step", f"every {streaming['stream_every']} steps"}
    assert all(r["tokens_per_s"] > 0 for r in streaming["runs"].values())
    for row in results["cache_vs_recompute"]:
        assert row["same_tokens"] is True and row["speedup"] > 0
    assert Path(results["figure"]).stat().st_size > 0
    assert {"jax", "flax", "torch", "transformers"} <= set(results["versions"])
    assert results["devices"]["backend"] and results["time"]
    assert results["decode_weight_matmuls"].startswith(("panel_matmul kernel", "xla (kernel unavailable: "))
