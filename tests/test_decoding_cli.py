"""`python -m decoding.generate`: one-line errors for bad arguments, and text from a run directory laid out
as research.train writes it (run.json, tokenizer/, checkpoints/; an untrained smoke model here), read by
research.runs.load_run."""

import dataclasses
import json
import re
import shutil

import jax
import numpy as np
import pytest

from configs import get_config
from decoding import cli
from decoding.cli import TextStream, main
from research.checkpoint import Checkpointer
from research.config import MeshConfig, to_dict
from research.input_pipeline import build_datasets
from research.mesh import make_mesh
from research.runs import RunError, load_run, read_run_config
from research.train_step import build_steps


@pytest.fixture(scope="module")
def run_dir(cache_dir, tmp_path_factory):
    cfg = get_config("smoke")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=cache_dir))
    out = tmp_path_factory.mktemp("run")
    tokenizer, _, _ = build_datasets(cfg.data, cfg.model.vocab_size, cfg.seed)
    tokenizer.save(out / "tokenizer")
    (out / "run.json").write_text(json.dumps({"config": to_dict(cfg)}))
    state = build_steps(cfg, make_mesh(MeshConfig(data=1), jax.devices()[:1])).init()
    ckpt = Checkpointer(out / "checkpoints")
    ckpt.save(3, state)
    ckpt.wait()
    ckpt.close()
    return out, cfg, state.params, tokenizer


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "python -m decoding.generate: error: unrecognized arguments: --bogus"),
    (["--strategy", "nucleus"], "python -m decoding.generate: error: argument --strategy: invalid choice: 'nucleus' "
                                 "(choose from 'greedy', 'sample', 'beam')"),
    (["--top-p", "x"], "python -m decoding.generate: error: argument --top-p: invalid float value: 'x'"),
    (["--top-p", "1.5"], "error: top_p=1.5: expected 0 < top_p <= 1 (1 is off)"),
    (["--top-p", "0"], "error: top_p=0.0: expected 0 < top_p <= 1 (1 is off)"),
    (["--temperature", "-1"], "error: temperature=-1.0: expected >= 0 and finite (0 is greedy)"),
    (["--temperature", "inf"], "error: temperature=inf: expected >= 0 and finite (0 is greedy)"),
    (["--top-k", "-3"], "error: top_k=-3: expected >= 0 (0 is off)"),
    (["--top-k", str(10 ** 20)], f"error: top_k={10 ** 20}: out of range for int64"),
    (["--min-p", "2"], "error: min_p=2.0: expected 0 <= min_p <= 1 (0 is off)"),
    (["--strategy", "beam", "--num-beams", "0"], "error: num_beams=0: expected a positive integer"),
    (["--num-beams", "0"], "error: num_beams=0: expected a positive integer"),  # checked whatever the strategy
    (["--strategy", "beam", "--num-beams", "2", "--num-return", "5"],
     "error: num_return=5: expected 1 <= num_return <= num_beams=2"),
    (["--num-samples", "0"], "error: --num-samples=0: expected an integer >= 1"),
    (["--stream-every", "0"], "error: --stream-every=0: expected an integer >= 1"),
    (["--stream-every", str(2 ** 31)], f"error: --stream-every={2 ** 31}: expected an integer <= {2 ** 31 - 1}"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens=0: expected an integer >= 1"),
    (["--min-new-tokens", "-1"], "error: --min-new-tokens=-1: expected an integer >= 0"),
    (["--min-new-tokens", "5", "--max-new-tokens", "2"], "error: --min-new-tokens=5: expected <= --max-new-tokens=2"),
    (["--repetition-penalty", "0"], "error: --repetition-penalty=0.0: expected a finite value > 0 (1 is off)"),
    (["--repetition-penalty", "nan"], "error: --repetition-penalty=nan: expected a finite value > 0 (1 is off)"),
    (["--seed", str(2 ** 64)], f"error: --seed={2 ** 64}: expected a 64-bit integer"),
])
def test_bad_flags_fail_with_one_line_before_the_run_is_loaded(tmp_path, capsys, monkeypatch, args, message):
    def not_reached(*args, **kwargs):
        raise AssertionError("load_run was called before the flags were checked")

    monkeypatch.setattr("research.runs.load_run", not_reached)
    argv = ["--checkpoint", str(tmp_path), "--prompt", "a", *args]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    assert (status, capsys.readouterr().err) == (2, message + "\n")


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "10000"], "error: prompt of 1 tokens + max_new_tokens=10000 exceeds model.max_seq_len=64"),
    (["--step", "7"], "error: step=7: not among the saved checkpoints [3] in "),
])
def test_bad_arguments_for_the_run_fail_with_one_line(run_dir, capsys, args, message):
    status = main(["--checkpoint", str(run_dir[0]), "--prompt", "a", *args])
    out, err = capsys.readouterr()
    assert status == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert out == ""  # the prompt is not echoed before the error


def test_max_new_tokens_defaults_to_what_fits_the_context(run_dir, capsys):
    """The smoke model's context is 64 tokens: the default 64 new tokens cannot fit after a prompt, so the
    default shrinks to what does, and says so; a prompt that fills the context is one line."""
    out, cfg, _, tokenizer = run_dir
    prompt = "The cat sat"
    room = cfg.model.max_seq_len - len(tokenizer.encode(prompt))
    assert main(["--checkpoint", str(out), "--prompt", prompt, "--no-stream"]) == 0
    err = capsys.readouterr().err
    assert f"--max-new-tokens defaults to {room}: what fits model.max_seq_len=64" in err
    long = "The cat sat on the mat. " * 40
    assert main(["--checkpoint", str(out), "--prompt", long]) == 2
    err = capsys.readouterr().err
    assert "leave no room for new ones in model.max_seq_len=64" in err and err.count("\n") == 1
    assert "The cat sat on the mat" not in err  # the prompt is not printed back


def test_missing_run_directory(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--prompt", "a"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}: no run.json (expected a run directory written by "
                                       "research.train or research.convert --from-hf)\n")


def test_load_run_returns_the_model_config_params_and_tokenizer(run_dir):
    out, cfg, params, tokenizer = run_dir
    model_cfg, restored, tok = load_run(out)  # the latest step; a str path works as well as a Path
    assert model_cfg == cfg.model and read_run_config(str(out)) == cfg
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    assert (tok.kind, tok.vocab_size) == (tokenizer.kind, tokenizer.vocab_size)
    assert tok.encode("naïve café") == tokenizer.encode("naïve café")
    assert load_run(str(out), step=3)[0] == cfg.model


def test_load_run_errors_are_one_line_and_name_the_value(run_dir, tmp_path):
    out = run_dir[0]
    with pytest.raises(RunError, match=r"^step=7: not among the saved checkpoints \[3\] in .*checkpoints$"):
        load_run(out, step=7)
    with pytest.raises(ValueError, match=rf"^{tmp_path}: no run.json \(expected a run directory"):
        load_run(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "run.json", bare)
    with pytest.raises(RunError, match=rf"^{bare}: no checkpoints saved in {bare / 'checkpoints'}$"):
        load_run(bare)
    assert not (bare / "checkpoints").exists()  # reading creates nothing
    (bare / "run.json").write_text("{not json")
    with pytest.raises(RunError, match=r"run.json: not valid JSON \(Expecting property name"):
        load_run(bare)


def test_run_without_tokenizer_fails_with_one_line(run_dir, tmp_path, capsys):
    """A converted checkpoint whose model folder had no tokenizer: load_run gives None, the CLI says why."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir[0], copy)
    shutil.rmtree(copy / "tokenizer")
    assert load_run(copy)[2] is None
    assert main(["--checkpoint", str(copy), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --checkpoint {copy}: no tokenizer/") and err.count("\n") == 1


def test_prompt_is_encoded_as_training_text(run_dir, capsys, monkeypatch):
    """Our tokenizers' models were trained without bos, so the prompt is exactly encode(prompt)."""
    seen = []
    real = cli.generate

    def recording(params, cfg, prompt, lengths, *args, **kwargs):
        seen.append(np.asarray(prompt)[0, :int(lengths[0])].tolist())
        return real(params, cfg, prompt, lengths, *args, **kwargs)

    monkeypatch.setattr(cli, "generate", recording)
    out, tokenizer = run_dir[0], run_dir[3]
    assert main(["--checkpoint", str(out), "--prompt", "The cat", "--max-new-tokens", "2", "--no-stream"]) == 0
    assert seen == [tokenizer.encode("The cat")] and seen[0][0] != tokenizer.bos_id
    capsys.readouterr()


def test_greedy_text_is_streamed_from_inside_the_loop(run_dir, capsys, monkeypatch):
    updates = []

    class Recording(cli.TextStream):
        def __call__(self, tokens, lengths):
            updates.append(list(tokens[0, :lengths[0]]))
            super().__call__(tokens, lengths)

        def finish(self, tokens, lengths):
            updates.append(list(tokens[0, :lengths[0]]))
            super().finish(tokens, lengths)

    monkeypatch.setattr(cli, "TextStream", Recording)
    out, tokenizer = run_dir[0], run_dir[3]
    argv = ["--checkpoint", str(out), "--prompt", "The ", "--max-new-tokens", "10", "--stream-every", "3"]
    assert cli.main(argv) == 0
    *streamed, final = updates
    assert [len(u) for u in streamed] == [3, 6, 9, len(final)][:len(streamed)]  # every 3 steps and the last
    assert all(u == final[:len(u)] for u in streamed)
    assert capsys.readouterr().out == "The " + tokenizer.decode([int(t) for t in final]) + "\n"


def test_text_stream_prints_each_character_once(run_dir, capsys):
    tokenizer = run_dir[3]
    ids = tokenizer.encode("naïve café ☕ done")
    stream = TextStream(tokenizer.decode)
    tokens = np.array([ids])
    for n in range(1, len(ids) + 1, 2):  # updates every other token, as `stream_every` would
        stream(tokens, np.array([n]))
    stream.finish(tokens, np.array([len(ids)]))
    assert capsys.readouterr().out == "naïve café ☕ done\n"


def test_beam_search_prints_the_n_best(run_dir, capsys):
    out = run_dir[0]
    assert main(["--checkpoint", str(out), "--prompt", "The ", "--strategy", "beam", "--num-beams", "3",
                 "--num-return", "2", "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("--- 1: [score ") and lines[1].startswith("--- 2: [score ")


DATE = "[0-9]{4}-[0-9]{2}-[0-9]{2}"


@pytest.mark.parametrize("strategy", [["--strategy", "greedy"], ["--strategy", "sample", "--num-samples", "3"],
                                      ["--strategy", "beam", "--num-beams", "3", "--num-return", "2"]])
def test_regex_constrains_every_strategy(run_dir, capsys, strategy, tmp_path):
    out = run_dir[0]
    status = main(["--checkpoint", str(out), "--prompt", "Date: ", "--regex", DATE, "--max-new-tokens", "24",
                   "--no-stream", "--cache-dir", str(tmp_path), *strategy])
    stdout, stderr = capsys.readouterr()
    assert stderr.startswith("constraint: ") and "token classes" in stderr
    texts = [line.split("] ", 1)[-1] if line.startswith("--- ") else line for line in stdout.splitlines()]
    texts = [t.split(": ", 1)[-1] if t.startswith("--- ") else t for t in texts]
    assert texts and all(t.startswith("Date: ") for t in texts)
    complete = [re.fullmatch(DATE, t[len("Date: "):]) is not None for t in texts]
    assert status == (0 if all(complete) else 3)
    assert stderr.count("incomplete") == complete.count(False)


def test_an_unfinished_constraint_is_reported_with_exit_status_3(run_dir, capsys, tmp_path):
    status = main(["--checkpoint", str(run_dir[0]), "--prompt", "Date: ", "--regex", DATE, "--max-new-tokens",
                   "3", "--cache-dir", str(tmp_path)])
    stderr = capsys.readouterr().err.splitlines()
    assert status == 3
    assert stderr[-1] == ("output 1: incomplete: --max-new-tokens=3 ran out before the constraint was matched")


def test_json_schema_output_is_valid_json(run_dir, capsys, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    status = main(["--checkpoint", str(run_dir[0]), "--prompt", "{", "--json-schema", str(path),
                   "--max-new-tokens", "30", "--no-stream", "--cache-dir", str(tmp_path)])
    text = capsys.readouterr().out.strip()[1:]  # after the prompt
    assert status == 0
    value = json.loads(text)
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)


def test_bad_regex_is_one_line_before_the_run_is_loaded(capsys, monkeypatch, tmp_path):
    def not_reached(*args, **kwargs):
        raise AssertionError("the run was loaded before the flags were checked")

    monkeypatch.setattr("research.runs.load_run", not_reached)
    status = main(["--checkpoint", str(tmp_path), "--prompt", "a", "--regex", "a("])
    out, err = capsys.readouterr()
    assert (status, out, err) == (2, "", "error: regex 'a(': not a valid regular expression (missing ), "
                                         "unterminated subpattern at position 1)\n")


@pytest.mark.parametrize("content, message", [
    ('{"type": "number", "multipleOf": 3}', "unsupported keyword 'multipleOf'"),
    ("[1, 2", "not valid JSON"),
    (None, "No such file or directory"),
])
def test_bad_json_schema_is_one_line_before_the_run_is_loaded(tmp_path, capsys, monkeypatch, content, message):
    def not_reached(*args, **kwargs):
        raise AssertionError("the run was loaded before the flags were checked")

    monkeypatch.setattr("research.runs.load_run", not_reached)
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    status = main(["--checkpoint", str(tmp_path), "--prompt", "a", "--json-schema", str(path)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"error: --json-schema {path}: ") and message in err
    assert err.count("\n") == 1


def test_regex_and_json_schema_are_exclusive(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", "x", "--prompt", "a", "--regex", "a", "--json-schema", "s.json"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == ("python -m decoding.generate: error: argument --json-schema: not "
                                               "allowed with argument --regex")
