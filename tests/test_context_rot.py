"""The context-rot study: scoring and statistics against plain references, and the smoke preset end to end."""

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import get_config
from configs.context_rot import get_study
from experiments import context_rot as study
from experiments import context_rot_evals as evals
from models.transformer import Transformer
from research.needles import Episode

FIGURES = ("1_niah_heatmap", "2_distractors", "3_lost_in_the_middle", "4_attention_dilution",
           "5_haystack_similarity", "6_effective_length")


def episode_with(prompt, answer):
    return Episode(np.asarray(prompt, np.int32), np.asarray(answer, np.int32), "k", "v", (), len(prompt))


def test_greedy_match_is_exact_on_every_answer_token():
    """correct iff the argmax after the prompt, and after each answer token, is the next answer token."""

    class Model:
        prefix = np.zeros(0, np.int32)
        params = None

        def __init__(self, emit):
            self.emit = emit  # emit[i][t]: the argmax at position t of episode i (its prompt's first id)

        def forward(self, params, ids):
            out = np.zeros(ids.shape + (16,), np.float32)
            for i in range(ids.shape[0]):
                for t in range(ids.shape[1]):
                    out[i, t, self.emit[ids[i, 0]][t]] = 1
            return out

    answers = [np.array([5, 6]), np.array([5, 6]), np.array([7])]
    eps = [episode_with([i, 2, 3], a) for i, a in enumerate(answers)]
    # Position 2 (the prompt's last) predicts the first answer token; position 3 the second.
    emit = [[0, 0, 5, 6, 0], [0, 0, 5, 9, 0], [0, 0, 7, 0, 0]]
    assert evals.greedy_matches(Model(emit), eps, answers, batch=2).tolist() == [True, False, True]
    emit = [[0, 0, 4, 6, 0], [0, 0, 5, 6, 0], [0, 0, 8, 0, 0]]
    assert evals.greedy_matches(Model(emit), eps, answers, batch=8).tolist() == [False, True, False]


def test_logn_is_bit_identical_to_none_within_its_anchor_length():
    """Why the study evaluates the none runs with logn instead of training logn runs: within L_train it is 1."""
    cfg = get_config("smoke").model
    logn = dataclasses.replace(cfg, attention_logit_scaling="logn", logit_scaling_length=16)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 32)).astype(np.int32)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), ids)["params"])
    within = [np.asarray(Transformer(c).apply({"params": params}, ids[:, :16])[0]) for c in (cfg, logn)]
    beyond = [np.asarray(Transformer(c).apply({"params": params}, ids)[0]) for c in (cfg, logn)]
    assert np.array_equal(*within)
    assert np.array_equal(beyond[0][:, :16], beyond[1][:, :16]) and not np.allclose(beyond[0][:, 16:], beyond[1][:, 16:])


def test_aggregate_and_effective_length_match_hand_computation():
    models = [{"condition": "none", "seed": s, "rows": {"niah": [
        {"length": 64, "depth": 0.0, "accuracy": a, "n": 10},
        {"length": 128, "depth": 0.0, "accuracy": b, "n": 10}]}} for s, (a, b) in enumerate([(1.0, 0.6), (0.8, 0.8)])]
    rows = study.aggregate(models, "niah")
    assert rows[0]["accuracy"] == pytest.approx(0.9) and rows[0]["accuracy_err"] == pytest.approx(np.std([1, .8], ddof=1))
    one = study.aggregate(models[:1], "niah")
    assert one[1]["accuracy_err"] == pytest.approx(np.sqrt(0.6 * 0.4 / 10))  # binomial SE for one seed
    tables = {"niah": [{"condition": "none", "length": n, "depth": d, "accuracy": a}
                       for n, d, a in [(64, 0, 1.0), (64, 1, 0.8), (128, 0, 0.9), (128, 1, 0.7), (256, 0, 0.2),
                                       (256, 1, 1.0), (512, 0, 1.0), (512, 1, 1.0)]],
              "distractors": [{"condition": "none", "length": n, "distractors": 4, "accuracy": a}
                              for n, a in [(64, 0.0), (128, 0.0)]],
              "haystack_similarity": []}
    found = {r["curve"]: r for r in study.effective_lengths(tables, 0.85)}
    # niah means: 0.9, 0.8, 0.6, 1.0 -> threshold 0.765: 128 passes, 256 fails (later recovery does not count)
    assert found["niah (mean over depths)"]["effective_length"] == 128
    assert found["niah (mean over depths)"]["threshold"] == pytest.approx(0.765)
    assert found["4 distractors"]["effective_length"] == 0  # 0 at the shortest length: no effective length


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("context_rot") / "smoke"
    argv = ["--preset", "smoke", "--out", str(out), "--set", f"data.cache_dir={cache_dir}", "--no-progress"]
    assert study.main(argv) == 0
    return out, argv


def test_smoke_preset_writes_the_summary_every_figure_csv_and_the_report(smoke):
    out, _ = smoke
    summary = json.loads((out / "summary.json").read_text())
    preset = get_study("smoke")
    assert summary["runs"] == {"done": 2, "reused": 0, "failed": 0}
    assert sorted((m["condition"], m["logn_length"]) for m in summary["models"]) == [
        ("learned", 0), ("logn", preset.train_length), ("none", 0)]  # logn: the none run, scaled at evaluation
    assert summary["train_length"] == preset.train_length and summary["lengths"] == list(preset.lengths)
    assert set(summary["in_distribution_accuracy"]) == {"none", "logn", "learned"}
    assert summary["learned"] == {c: a >= 0.9 for c, a in summary["in_distribution_accuracy"].items()}
    assert "jax" in summary["versions"]
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").stat().st_size > 0 and (out / "figures" / f"{name}.pdf").exists()
    niah = (out / "niah.csv").read_text().splitlines()
    assert niah[0].startswith("condition,length,depth,seeds,n,accuracy,accuracy_err")
    assert len(niah) == 1 + 3 * len(preset.lengths) * len(preset.depths)
    for name in ("distractors", "lost_in_the_middle", "dilution", "haystack_similarity", "effective_length"):
        assert len((out / f"{name}.csv").read_text().splitlines()) > 1
    litm = [r for r in summary["tables"]["lost_in_the_middle"] if r["condition"] == "none"]
    assert {r["setting"] for r in litm} == {"context", "closed_book", "oracle"}
    dilution = [r for r in summary["tables"]["dilution"] if r["condition"] == "none"]
    assert {r["layer"] for r in dilution} == {0, 1} and all(0 <= r["needle_mass"] <= 1 for r in dilution)
    report = (out / "report.md").read_text()
    assert "Did the model learn the task?" in report and all(f"figures/{n}.png" in report for n in FIGURES)


def test_a_second_invocation_reuses_runs_and_evaluations(smoke, capsys):
    out, argv = smoke
    before = {p.name: p.stat().st_mtime_ns for p in (out / "evals").iterdir()}
    assert study.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == {"done": 0, "reused": 2, "failed": 0}
    assert {p.name: p.stat().st_mtime_ns for p in (out / "evals").iterdir()} == before


def test_checkpoint_runs_the_same_evaluations_on_a_given_run(smoke, tmp_path):
    out, _ = smoke
    run = json.loads((out / "summary.json").read_text())["models"][0]["dir"]
    target = tmp_path / "ckpt"
    assert study.main(["--preset", "smoke", "--out", str(target), "--checkpoint", run]) == 0
    summary = json.loads((target / "summary.json").read_text())
    assert [m["condition"] for m in summary["models"]] == ["checkpoint", "checkpoint + logn"]
    assert summary["checkpoint"] == run
    assert summary["train_length"] == 64  # the run's retrieval seq_len
    assert not (target / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["--preset", "medium"], "error: --preset='medium': expected one of smoke, quick, full"),
    (["--preset", "smoke", "--checkpoint", "/nonexistent/run"], "error: --checkpoint /nonexistent/run: not a directory"),
    (["--preset", "smoke", "--checkpoint", ".", "--jobs", "0"], "error: --jobs=0: expected a positive number of parallel runs"),
    (["--preset", "smoke", "--checkpoint", ".", "--set", "steps=3"],
     "error: --set changes training runs; with --checkpoint nothing is trained"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert study.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == message
    assert not out.exists()


def test_needle_attention_mass_and_entropy_match_a_numpy_forward(smoke):
    """The dilution measurement (spans, the answering query, head and episode means) against a float64 NumPy
    forward of a tiny random model on the same episodes."""
    from test_attention_probe import np_last_query_attention

    from models.config import ModelConfig
    from models.transformer import init_params, unbox

    out, _ = smoke
    run = Path(json.loads((out / "summary.json").read_text())["models"][0]["dir"])
    real = study.load_model(run)
    cfg = ModelConfig(vocab_size=real.cfg.vocab_size, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=32,
                      max_seq_len=128, init_std=0.3)
    params = unbox(init_params(cfg, jax.random.key(0)))
    model = evals.Model(cfg, params, real.pieces, real.prefix)
    tiny = dataclasses.replace(get_study("smoke"), lengths=(40, 80), examples=3, batch=2)
    rows = evals.dilution(model, tiny)
    lead = evals.leading_space_ids(model)
    for length in tiny.lengths:
        eps = evals.episodes(model, tiny, ("dilution", length), length=length)
        ids = np.stack([np.concatenate([ep.tokens, ep.answer[:lead]]) for ep in eps])
        probs = np_last_query_attention(cfg, params, ids)  # [layers, B, N, S]
        for layer in range(cfg.num_layers):
            mass = np.mean([probs[layer, i, :, slice(*ep.needle)].sum(-1).mean() for i, ep in enumerate(eps)])
            entropy = np.mean(-(probs[layer] * np.log(probs[layer])).sum(-1).mean(-1))
            row = next(r for r in rows if r["length"] == length and r["layer"] == layer)
            assert row["needle_mass"] == pytest.approx(mass, abs=1e-5)
            assert row["entropy"] == pytest.approx(entropy, abs=1e-4)
            assert 0 < row["needle_mass"] < 1
