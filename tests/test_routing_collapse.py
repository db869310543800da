"""The routing-collapse study: its statistics against NumPy, and the smoke preset end to end."""

import json

import numpy as np
import pytest

from experiments import routing_collapse as study


def synthetic_run(num_steps: int = 20, seed: int = 0) -> dict:
    """A finished run's records: 2 MoE layers, 4 experts, random per-step routing statistics."""
    rng = np.random.default_rng(seed)
    metrics = []
    for step in range(1, num_steps + 1):
        record = {"step": step, "loss": 3.0}
        for layer in ("block_0", "block_1"):
            f = rng.dirichlet(np.ones(4))
            record.update({f"moe/{layer}/expert_fraction": f.tolist(), f"moe/{layer}/max_load": float(4 * f.max()),
                           f"moe/{layer}/max_violation": float(4 * f.max() - 1)})
            for name in ("load_cv", "importance_cv", "dropped_fraction", "router_entropy", "router_logsumexp"):
                record[f"moe/{layer}/{name}"] = float(rng.uniform())
        metrics.append(record)
        metrics.append({"step": step, "tokens_per_s": 1.0})  # throughput records carry no loss
    return {"grid": "headline", "condition": "none", "seed": seed, "key": "k", "dir": "d", "metrics": metrics,
            "summary": {"val_loss": 2.0 + seed, "val_ppl": float(np.exp(2.0 + seed))}}


def test_final_statistics_match_numpy():
    run = synthetic_run()
    result = study.analyse_run(run)
    steps = [m for m in run["metrics"] if "loss" in m][-2:]  # the last 10% of 20 steps
    fractions = np.array([[m[f"moe/block_{i}/expert_fraction"] for i in range(2)] for m in steps]).mean(0)
    np.testing.assert_allclose(result["max_share"], fractions.max(1).mean())
    np.testing.assert_allclose(result["max_share_x_uniform"], 4 * fractions.max(1).mean())
    np.testing.assert_allclose(result["sorted_load"], np.sort(fractions, 1)[:, ::-1].mean(0))
    np.testing.assert_allclose(result["load_cv"], np.mean([[m[f"moe/block_{i}/load_cv"] for i in range(2)] for m in steps]))
    assert result["layers"] == ["block_0", "block_1"] and len(result["curves"]["step"]) == 20


def test_summary_aggregates_seeds_and_checks_the_bars():
    runs = [study.analyse_run(synthetic_run(seed=s)) for s in (0, 1, 2)]
    summary = study.summarize(runs)
    loss = summary["headline"]["none"]["val_loss"]
    assert loss["mean"] == pytest.approx(3.0) and loss["std"] == pytest.approx(1.0) and loss["max"] == 4.0
    acceptance = study.check_acceptance(summary)
    share = summary["headline"]["none"]["max_share_x_uniform"]["mean"]
    assert acceptance["none_collapses"] == {"max_share_x_uniform": share, "bar": 2.5, "met": share > 2.5}
    csv_text, md_text = study.table(summary)
    assert csv_text.splitlines()[1].startswith("none,3,3,1,")
    assert md_text.splitlines()[2].startswith("| none | 3 | 3 ± 1 |")


def test_smoke_preset_end_to_end_and_resume(tmp_path, cache_dir, capsys):
    out = tmp_path / "study"
    argv = ["--preset", "smoke", "--out", str(out), "--set", f"data.cache_dir={cache_dir}", "--no-progress"]
    assert study.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == {"done": 2, "reused": 0, "failed": 0}
    assert set(summary["conditions"]["headline"]) == {"none", "switch 0.01"}
    for name in ("1_expert_fraction_vs_step", "2_sorted_final_load", "3_balance_vs_step", "5_alpha_tradeoff",
                 "7_layer_expert_heatmap", "8_routed_text", "9_router_entropy_logsumexp"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert (out / "figures" / f"{name}.pdf").is_file()
    report = (out / "report.md").read_text()
    assert "figures/1_expert_fraction_vs_step.png" in report and "Shazeer" in report
    assert (out / "table.csv").read_text().startswith("condition,seeds,val_loss_mean")
    assert not list(out.rglob(".*.tmp*"))

    # Running the same command again trains nothing and reproduces the summary.
    assert study.main(argv) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["runs"] == {"done": 0, "reused": 2, "failed": 0}
    assert again["conditions"] == summary["conditions"]


def test_bad_preset_is_a_one_line_error(tmp_path, capsys):
    assert study.main(["--preset", "huge", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --preset='huge': expected one of smoke, quick, full"
    assert not (tmp_path / "summary.json").exists()
