"""The constrained-decoding study: its validation and statistics, and the smoke preset end to end (every
constrained output valid, host and device agreeing, the report's numbers equal to the summary's)."""

import copy
import csv
import json
import math

import numpy as np
import pytest

from experiments import constrained_decoding as study
from experiments.constrained_decoding_report import findings, ms, pct

PIECES = [None, None, None, b"1", b"9", b"-", b" ", b"\n", b"\xc3", b"\xa9", b"yes"]
EOS = 2


def test_text_and_first_line_follow_the_token_bytes():
    assert study.text_of([3, 4, 5], PIECES) == "19-"
    assert study.text_of([3, 0], PIECES) is None  # a token without bytes (pad) is no text
    assert study.text_of([8], PIECES) is None  # half a UTF-8 character
    assert study.text_of([8, 9], PIECES) == "é"
    # The first line, stripped, and the tokens a "\n" stop string lets through (the newline's included).
    assert study.first_line([6, 10, 7, 3, EOS], PIECES, EOS) == ("yes", 3)
    assert study.first_line([10, 6, EOS, 3], PIECES, EOS) == ("yes", 3)
    assert study.first_line([6, 10], PIECES, EOS) == ("yes", 2)


def test_schema_validator_checks_json_and_the_schema():
    valid = study.validator(study.CONSTRAINTS["json_object"])
    assert valid('{"name": "Alice", "age": 30}')  # any JSON serialisation, not only the regex's
    assert not valid('{"name": "Alice", "age": 121}')
    assert not valid('{"name": "Alice"}')
    assert not valid('{"name": "Alice", "age": 3')
    date = study.validator(study.CONSTRAINTS["date"])
    assert date("2024-01-31") and not date(" 2024-01-31") and not date("２０２４-01-31")  # ASCII digits only


def test_retry_cost_and_wilson_interval():
    cost = study.retry_cost(np.array([True, False, False, False]), np.array([2, 4, 6, 8]), 0.5)
    assert cost["valid_rate"] == 0.25 and cost["expected_attempts"] == 4
    assert cost["tokens_per_valid"] == pytest.approx(5 / 0.25) and cost["seconds_per_valid"] == 2
    none = study.retry_cost(np.zeros(200, bool), np.full(200, 10), 0.1)
    assert none["expected_attempts"] is None and none["tokens_per_valid"] is None and none["seconds_per_valid"] is None
    low, high = study.wilson(0, 200)
    assert low == 0 and high == pytest.approx(1.96 ** 2 / (200 + 1.96 ** 2))  # about the rule of three
    assert none["attempts_lower_95"] == pytest.approx(1 / high)
    assert study.wilson(200, 200)[1] == 1


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--preset", "huge"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("constrained_decoding")
    assert study.main(["--preset", "smoke", "--out", str(out), "--cache-dir", cache_dir]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_smoke_writes_every_output(smoke):
    out, summary = smoke
    for name in ("summary.json", "table.csv", "table.md", "report.md"):
        assert (out / name).stat().st_size > 0
    for figure in ("validity_rate", "tokens_per_valid"):
        assert (out / "figures" / f"{figure}.png").is_file() and (out / "figures" / f"{figure}.pdf").is_file()
    assert summary["preset"] == "smoke" and summary["versions"]["jax"] and summary["model"]["config"] == "smoke"
    assert sorted(summary["constraints"]) == sorted(study.PRESETS["smoke"].constraints)  # JSON keys are sorted
    assert summary["figures"] == ["figures/validity_rate.png", "figures/tokens_per_valid.png"]


def test_smoke_constrained_outputs_are_all_valid(smoke):
    _, summary = smoke
    for name, result in summary["constraints"].items():
        constrained, plain = result["constrained"], result["unconstrained"]
        assert constrained["samples"] == plain["samples"] == summary["num_samples"]
        assert constrained["disagreements"] == 0 and plain["host_disagreements"] == 0, name
        assert constrained["valid_rate"] == constrained["complete_rate"], name  # complete means valid
        assert constrained["complete_rate"] > 0.5, name
        for cost in (constrained, plain, plain["first_line"]):
            if cost["valid"]:
                assert cost["tokens_per_valid"] == pytest.approx(cost["mean_tokens"] / cost["valid_rate"])
            else:
                assert cost["tokens_per_valid"] is None and cost["expected_attempts"] is None
    step = summary["step_timing"]
    assert step["ratio"] == pytest.approx(step["seconds_per_step"]["constrained"] /
                                          step["seconds_per_step"]["unconstrained"])


def test_smoke_table_and_report_show_the_summary_numbers(smoke):
    out, summary = smoke
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["constraint"] for r in rows] == list(study.PRESETS["smoke"].constraints)
    report = (out / "report.md").read_text()
    for row in rows:
        result = summary["constraints"][row["constraint"]]
        pairs = ((row["unconstrained_valid_rate"], result["unconstrained"]["valid_rate"]),
                 (row["constrained_complete_rate"], result["constrained"]["complete_rate"]),
                 (row["unconstrained_tokens_per_valid"], result["unconstrained"]["tokens_per_valid"]),
                 (row["constrained_mean_tokens"], result["constrained"]["mean_tokens"]))
        for text, value in pairs:
            assert float(text) == (math.inf if value is None else pytest.approx(value, rel=1e-5))
        assert f"{row['constraint']} {pct(result['constrained']['complete_rate'])}" in report
        assert f"{row['constraint']} {pct(result['unconstrained']['valid_rate'])}" in report
        assert f"| `{row['constraint']}` |" in report  # the table is in the report
    per_step = summary["step_timing"]["seconds_per_step"]
    assert f"{ms(per_step['constrained'])} per loop step constrained against {ms(per_step['unconstrained'])}" in report
    assert "no published reference" in report and "trained here" in report


def test_findings_state_the_retry_cost_where_some_samples_are_valid(smoke):
    summary = copy.deepcopy(smoke[1])  # the smoke model is never valid unconstrained: make 1 in 4 valid
    plain = summary["constraints"]["date"]["unconstrained"]
    plain.update(study.retry_cost(np.arange(plain["samples"]) % 4 == 0, np.full(plain["samples"], 12), 0.01))
    text = " ".join(findings(summary))
    assert "date: 4 attempts, 48 tokens and 0.04 s per valid output." in text and "date 25.0%" in text
    constrained_tokens = summary["constraints"]["date"]["constrained"]["tokens_per_valid"]
    assert f"date {48 / constrained_tokens:.3g}x" in text


def test_a_given_checkpoint_is_studied_without_training(smoke, tmp_path):
    out, _ = smoke
    assert study.main(["--preset", "smoke", "--checkpoint", str(out / "model"), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["run_dir"] == str(out / "model") and not (tmp_path / "model").exists()
    assert f"The model is the run in `{out / 'model'}`" in (tmp_path / "report.md").read_text()
