"""The MoE benchmark's --quick mode runs end to end and writes a complete results file.

    pytest tests/test_benchmark_moe.py

Checks structure and sign only: timings on a shared CPU are too noisy to assert on.
"""

import json
from pathlib import Path

from experiments import benchmark_moe
from models.kernels import cpu

TOL = 1e-4  # fp32, one whole layer computed two ways, relative to the output's scale


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    benchmark_moe.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())

    assert results["quick"] is True
    assert results["hf"] == "skipped (--quick)"
    assert set(results["targets"]) == {"moe_cost_vs_dense_max"}
    assert set(results["train"]) == {"moe_dropless", "moe_capacity", "dense_same_active", "dense_moe"}
    for run in results["train"].values():
        assert {"name", "config", "batch_size", "seq_len", "steps", "seconds", "tokens_per_s"} <= set(run)
        assert run["steps"] == 2 and run["seconds"] > 0 and run["tokens_per_s"] > 0
    assert results["train"]["dense_same_active"]["config"]["model"]["moe"]["num_experts"] == 0
    assert results["train"]["dense_moe"]["config"]["model"]["moe"]["router"] == "dense"
    assert set(results["train_cost_vs_dense"]) == {f"{k}_cost_vs_dense" for k in results["train"]}
    assert results["train_cost_vs_dense"]["dense_same_active_cost_vs_dense"] == 1.0

    layer = results["dispatch"]
    assert set(layer["fwd_bwd_seconds"]) == {"gather_capacity", "sorted_dropless", "onehot_einsum_capacity",
                                            "dense_mlp_same_active"} | ({"sorted_dropless_cpu_kernel"}
                                                                        if cpu.available() else set())
    assert all(s > 0 for s in layer["fwd_bwd_seconds"].values())
    assert layer["max_rel_diff_gather_vs_einsum"] < TOL  # the two layouts compute the same layer

    forward = results["forward"]
    assert forward["tokens_per_s"] > 0 and "ratio_vs_hf" not in forward
    kernels = results["forward_cpu_kernels"]
    if cpu.available():
        assert kernels["tokens_per_s"] > 0 and kernels["flops_per_token"] == forward["flops_per_token"]
        assert (kernels["config"]["model"]["matmul_impl"], kernels["config"]["model"]["attention_impl"]) == (
            "cpu_panel", "cpu_fused")
    else:  # no C++ compiler: said so
        assert kernels.startswith("unavailable: ")
    assert results["matmul_peak_flops"] > 0 and results["matmul_peak_size"] == 256
    assert results["matmul_peak_flops_by_size"] == {"256": results["matmul_peak_flops"]}
    # MFU is tokens/s x FLOPs per token / peak, with the forward's FLOPs from research/flops.py.
    assert forward["flops_per_token"] > 0
    assert abs(forward["mfu"] - forward["tokens_per_s"] * forward["flops_per_token"] / results["matmul_peak_flops"]) \
        < 1e-9 * forward["mfu"]
    assert {"jax", "flax", "torch", "transformers"} <= set(results["versions"])
    assert results["devices"]["backend"] and results["time"]
