"""The README's "## Python API" example, executed as written: on a smoke run trained here (only the run
directory changes), and with its commented Hugging Face line switched on, on a tiny Llama folder."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from configs import get_config
from research.train import train

README = Path(__file__).resolve().parent.parent / "README.md"
RUN_DIR_LINE = re.compile(r'^run_dir = "[^"]*"(  #.*)?$')
HF_LINE = re.compile(r"^# (run_dir = .*import_hf\(.*)$")


def example() -> list[str]:
    """The first ```python block under "## Python API", as lines."""
    section = README.read_text(encoding="utf-8").split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "no ```python block under ## Python API"
    return block.group(1).splitlines()


def run_example(lines: list[str]) -> dict:
    namespace = {"__name__": "readme_python_api"}
    exec(compile("\n".join(lines) + "\n", f"{README}:## Python API", "exec"), namespace)
    return namespace


def check_outputs(ns: dict, printed: str) -> None:
    """What the example printed (the sample, then the best beam: "score text" each; the texts of a barely
    trained model may hold newlines) and the outputs it printed from."""
    tok, out, beams = ns["tok"], ns["out"], ns["beams"]
    expected = ""
    for o in (out, beams):
        tokens, lengths = np.asarray(o.tokens), np.asarray(o.lengths)
        assert tokens.shape == (1, 1, 32) and 1 <= lengths[0, 0] <= 32
        n = int(lengths[0, 0])
        assert (tokens[0, 0, n:] == tok.pad_id).all()  # tokenizer= pads with the tokenizer's pad id ...
        assert tok.eos_id not in tokens[0, 0, :n - 1].tolist()  # ... and stops at its eos
        expected += f"{float(o.scores[0, 0])} {tok.decode(tokens[0, 0, :n].tolist())}\n"
    assert printed == expected


@pytest.fixture(scope="module")
def run_dir(cache_dir, tmp_path_factory):
    """A real (if barely trained) run directory, as `python -m research.train --config smoke` writes it."""
    smoke = get_config("smoke")
    cfg = dataclasses.replace(smoke, steps=2, log_every=1, eval_every=2, checkpoint_every=2, sample_tokens=0,
                              data=dataclasses.replace(smoke.data, cache_dir=cache_dir))
    out = tmp_path_factory.mktemp("python_api_run")
    train(cfg, out, progress=False)
    return out


def test_readme_example_runs_on_a_trained_run(run_dir, capsys):
    lines = example()
    at = [i for i, line in enumerate(lines) if RUN_DIR_LINE.match(line)]
    assert len(at) == 1, "the example sets run_dir once"
    lines[at[0]] = f"run_dir = {str(run_dir)!r}"
    ns = run_example(lines)
    assert ns["ids"] == ns["tok"].encode("Once upon a time", add_bos=False)  # our models train without bos
    check_outputs(ns, capsys.readouterr().out)


def test_readme_example_runs_on_an_imported_hugging_face_model(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_hf_tokenizer import save_tiny_tokenizer

    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    save_tiny_tokenizer(hf_dir)
    lines = example()
    at = [i for i, line in enumerate(lines) if HF_LINE.match(line)]
    assert len(at) == 1, "the example shows the Hugging Face import as one commented line"
    hf_line = HF_LINE.match(lines[at[0]]).group(1)
    paths = re.findall(r'"([^"]+)"', hf_line)  # the run directory, then the model folder
    assert len(paths) == 2
    lines[at[0]] = hf_line.replace(f'"{paths[0]}"', repr(str(tmp_path / "run"))).replace(
        f'"{paths[1]}"', repr(str(hf_dir)))
    ns = run_example(lines)
    assert (tmp_path / "run" / "run.json").is_file()
    hf_ids = transformers.AutoTokenizer.from_pretrained(hf_dir).encode("Once upon a time")
    assert ns["ids"] == hf_ids and hf_ids[0] == ns["tok"].bos_id  # with the bos this model was trained with
    check_outputs(ns, capsys.readouterr().out)
