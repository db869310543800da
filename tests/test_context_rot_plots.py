"""The context-rot study's figures and report, from synthetic aggregated rows (no model is trained)."""

from pathlib import Path

from configs.context_rot import smoke
from experiments.context_rot_plots import make_figures
from experiments.context_rot_report import write_report

LENGTHS = (32, 64, 128)  # smoke's: 128 is beyond its trained length of 64
CONDITIONS = {"none": 0.95, "logn": 0.3}  # in-distribution accuracy: logn is below the bar of 0.9


def row(condition: str, accuracy: float, **cell) -> dict:
    return {"condition": condition, **cell, "seeds": 2, "n": 4, "accuracy": accuracy, "accuracy_err": 0.05}


def tables() -> dict[str, list[dict]]:
    t = {name: [] for name in ("niah", "distractors", "lost_in_the_middle", "haystack_similarity", "dilution")}
    for c, top in CONDITIONS.items():
        for n in LENGTHS:
            acc = top if n <= 64 else top / 3
            t["niah"] += [row(c, acc, length=n, depth=d) for d in (0.0, 0.5, 1.0)]
            for k in (0, 1, 4):
                wrong = 4 * (1 - acc)  # of n = 4: split between the near miss, the stale value and anything else
                counts = {"answered_needle": 4 * acc, "answered_near_miss": wrong * k / 8, "answered_stale": wrong / 4,
                          "answered_other": wrong * (0.75 - k / 8)}
                t["distractors"].append(row(c, acc - 0.05 * k, length=n, distractors=k, **counts,
                                            **{f"{name}_err": 0.1 for name in counts}))
            t["haystack_similarity"] += [row(c, acc, length=n, haystack=h, needle=w)
                                         for h in ("coherent", "shuffled") for w in ("same", "paraphrase")]
            t["dilution"] += [row(c, acc, length=n, layer=layer, needle_mass=8 / n, needle_mass_err=0.01,
                                  entropy=0.9 * layer + 0.5, entropy_err=0.1, log_length=0.0, log_length_err=0.0)
                              for layer in (0, 1)]
        # k = 5 dips in the middle (a U); k = 10 falls monotonically (no U).
        for k, accs in ((5, (0.9, 0.5, 0.8)), (10, (0.9, 0.7, 0.4))):
            t["lost_in_the_middle"] += [row(c, a, setting="context", items=k, length=10 * k, position=p)
                                        for p, a in zip((1, 3, k), accs)]
        t["lost_in_the_middle"] += [row(c, 0.0, setting="closed_book", items=0, length=8, position=0),
                                    row(c, 1.0, setting="oracle", items=0, length=20, position=0)]
    curves = (("niah (mean over depths)", 64), ("1 distractors", 0))  # 0: below the threshold from the start
    t["effective_length"] = [{"condition": c, "curve": curve, "shortest_accuracy": 0.9, "threshold": 0.8,
                              "effective_length": n} for c in CONDITIONS for curve, n in curves]
    return t


def test_figures_and_report(tmp_path):
    study, data = smoke(), tables()
    pngs = make_figures(data, study, tmp_path / "figures")
    names = ["1_niah_heatmap", "2_distractors", "3_lost_in_the_middle", "4_attention_dilution",
             "5_haystack_similarity", "6_effective_length"]
    assert [Path(p).stem for p in pngs] == names
    for name in names:
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0
        assert (tmp_path / "figures" / f"{name}.pdf").stat().st_size > 0
    assert make_figures({**data, "niah": []}, study, tmp_path / "again")[0].endswith("2_distractors.png")

    record = {"preset": "smoke", "command": "python -m experiments.context_rot --preset smoke", "wall_seconds": 12.0,
              "versions": {"jax": "0"}, "jobs": 1, "runs": {"done": 2, "reused": 0, "failed": 0}, "checkpoint": None,
              "train_length": 64, "lengths": list(LENGTHS), "examples_per_cell": 4,
              "models": [{"condition": c, "seed": s, "dir": "d"} for c in CONDITIONS for s in (0, 1)],
              "in_distribution_accuracy": CONDITIONS, "learned": {c: a >= 0.9 for c, a in CONDITIONS.items()},
              "learned_bar": 0.9, "tables": data, "figures": [f"figures/{name}.png" for name in names]}
    write_report(tmp_path / "report.md", record, study)
    report = (tmp_path / "report.md").read_text()
    assert "**none**: accuracy 0.950" in report and "the task was learned" in report
    assert "**logn**: accuracy 0.300" in report and "**the model did not learn the task**" in report
    findings = report.split("## Findings")[1].split("## Published")[0]
    assert "logn" not in findings and "### none" in findings
    assert "k = 5 facts" in findings and "the published U-shape replicated" in findings.split("k = 10")[0]
    assert "the published U-shape did not replicate" in findings.split("k = 10")[1]
    assert "beyond it" in findings and "Effective lengths" in findings
    for name in names:
        assert f"(figures/{name}.png)" in report
