"""Hugging Face checkpoint interop (research/convert.py): tiny random models of each family, built from a
config and saved with save_pretrained, import to the same logits (fp32, 1e-4) and the same greedy tokens as
transformers; import -> export -> import is identical and the export loads in transformers; bad folders
fail with one line and leave nothing behind; --overwrite replaces only a previous result, and only when the
new one is complete."""

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_tokenizer import save_tiny_tokenizer  # noqa: E402

from decoding import cli as generate_cli  # noqa: E402
from decoding.generate import generate  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.layers import is_stacked, unstack_layers  # noqa: E402
from models.transformer import Transformer, init_params, unbox  # noqa: E402
from research import convert  # noqa: E402
from research.config import MeshConfig, TrainConfig, from_dict  # noqa: E402
from research.hf_checkpoint import load_params, read_hf_config, save_weights  # noqa: E402
from research.hf_config import (UnsupportedError, export_family, hf_config_from_model,  # noqa: E402
                                model_config_from_hf)
from research.hf_tokenizer import HFTokenizer  # noqa: E402
from research.mesh import make_mesh  # noqa: E402
from research.runs import load_run  # noqa: E402
from research.safetensors_io import SafetensorsFile, write_safetensors  # noqa: E402

ATOL = 1e-4  # fp32 whole model (shared/DESIGN.md)
VOCAB, WINDOW, NEW_TOKENS = 128, 6, 32
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
# One model per family; between them: untied and tied heads, a window shorter than the sequence, q/k/v
# biases, experts, a single file and a sharded one.
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}, None),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": WINDOW}, "40KB"),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}, None),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                {"num_local_experts": 4, "num_experts_per_tok": 2}, None),
}
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 20))


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def build(name: str, root: Path) -> tuple:
    """(name, HF model, HF folder, run directory, ModelConfig, params) for one family."""
    config_cls, model_cls, extra, shard = FAMILIES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SHAPE, **extra)).eval()
    with torch.no_grad():  # norm scales of 1 and biases of 0 would hide a mis-mapped tensor
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif key.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(root / "hf", **({"max_shard_size": shard} if shard else {}))
    if name == "llama":
        save_tiny_tokenizer(root / "hf")
    cfg = convert.import_hf(root / "hf", root / "run")
    loaded_cfg, params, tokenizer = load_run(root / "run")
    assert loaded_cfg == cfg and isinstance(tokenizer, HFTokenizer) == (name == "llama")
    return name, model, root / "hf", root / "run", cfg, params


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds each family once for the whole module: built(name) -> build(name, ...)."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, built):
    return built(request.param)


@pytest.fixture
def llama(built):
    return built("llama")


def test_config_mapping(family):
    name, model, hf_dir, _, cfg, _ = family
    assert cfg.sliding_window == (WINDOW if name == "mistral" else 0)
    assert cfg.qkv_bias == (name == "qwen2") and cfg.tie_embeddings == (name == "qwen2")
    assert cfg.moe.num_experts == (4 if name == "mixtral" else 0)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.d_ff) == (4, 2, 16, 96)
    if name == "mistral":
        assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    if name == "qwen2":
        assert "lm_head.weight" not in SafetensorsFile(hf_dir / "model.safetensors").keys()


def test_logits_match_transformers(family):
    name, model, _, _, cfg, params = family
    ours = np.asarray(jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x)[0])(params, TOKENS))
    expected = hf_logits(model, TOKENS)
    # Shown with -s: the number to report per family.
    print(f"\n{name}: max |logit difference| {np.abs(ours - expected).max():.2e} "
          f"(logits up to {np.abs(expected).max():.1f})")
    assert np.abs(expected).max() > 1.0  # large enough that a wrong mapping could not hide under ATOL
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(family):
    _, model, _, _, cfg, params = family
    prompt = TOKENS[:, :8].astype(np.int32)
    out = generate(params, cfg, prompt, np.full((2,), 8, np.int32), max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                             attention_mask=torch.ones(prompt.shape, dtype=torch.long))
    np.testing.assert_array_equal(np.asarray(out.tokens[:, 0]), ref[:, 8:].numpy())


def test_import_export_import_is_identical(family, tmp_path):
    name, model, _, run_dir, cfg, params = family
    shard = 30_000 if name == "mixtral" else 0
    hf = convert.export_hf(run_dir, tmp_path / "export", max_shard_bytes=shard)
    assert hf["architectures"] == [type(model).__name__]
    again = convert.import_hf(tmp_path / "export", tmp_path / "run")
    assert again == cfg
    _, params_again, _ = load_run(tmp_path / "run")
    jax.tree.map(np.testing.assert_array_equal, params_again, params)
    reloaded = type(model).from_pretrained(tmp_path / "export").eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS), atol=ATOL, rtol=0)
    if name == "llama":  # the tokenizer travels with the weights
        assert transformers.AutoTokenizer.from_pretrained(tmp_path / "export").encode("fox") == \
            transformers.AutoTokenizer.from_pretrained(family[2]).encode("fox")


def test_scanned_import_matches_and_exports_the_same_weights(family, tmp_path):
    """--scan-layers: the run's params are stacked per layer (models/layers.py), give the loop import's
    logits, and export to the same tensors."""
    name, _, hf_dir, _, cfg, params = family
    assert convert.main(["--from-hf", str(hf_dir), "--out", str(tmp_path / "run"), "--scan-layers"]) == 0
    scan_cfg, scanned, _ = load_run(tmp_path / "run")
    assert scan_cfg == dataclasses.replace(cfg, scan_layers=True) and is_stacked(scanned)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(scanned, scan_cfg), params)
    logits = Transformer(scan_cfg).apply({"params": scanned}, TOKENS)[0]
    np.testing.assert_allclose(logits, Transformer(cfg).apply({"params": params}, TOKENS)[0], atol=ATOL, rtol=0)
    convert.export_hf(tmp_path / "run", tmp_path / "export")
    exported = read_tensors(tmp_path / "export")
    for key, value in read_tensors(hf_dir).items():
        np.testing.assert_array_equal(exported[key], value)


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face folder (one file or shards), by name."""
    return {name: np.asarray(f.get(name), np.float32) for path in sorted(folder.glob("*.safetensors"))
            for f in [SafetensorsFile(path)] for name in f.keys()}


def test_converted_run_decodes_from_the_command_line(llama, capsys, monkeypatch):
    run_dir = llama[3]
    prompts = []
    real = generate_cli.generate

    def recording(params, cfg, prompt, lengths, *args, **kwargs):
        prompts.append(np.asarray(prompt)[0, :int(lengths[0])].tolist())
        return real(params, cfg, prompt, lengths, *args, **kwargs)

    monkeypatch.setattr(generate_cli, "generate", recording)
    assert generate_cli.main(["--checkpoint", str(run_dir), "--prompt", "The fox", "--max-new-tokens", "4",
                              "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("The fox")
    # The prompt as transformers encodes it for this model: with the bos its tokenizer adds.
    hf_ids = transformers.AutoTokenizer.from_pretrained(llama[2]).encode("The fox")
    assert prompts == [hf_ids] and hf_ids[0] == 1


def test_bf16_checkpoint_and_sharded_placement(built, tmp_path):
    _, model, hf_dir, _, cfg, params = built("mixtral")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.to(torch.float32)
    hf = read_hf_config(tmp_path / "bf16")
    bf16 = load_params(tmp_path / "bf16", model_config_from_hf(hf))  # auto: stays bf16
    assert bf16["block_0"]["moe"]["w_up"].dtype == jax.numpy.bfloat16
    widened = load_params(tmp_path / "bf16", model_config_from_hf(hf, "float32"))
    from safetensors.torch import load_file  # the reference reader, to check ours against

    stored = load_file(tmp_path / "bf16" / "model.safetensors")["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    assert stored.dtype == torch.bfloat16
    expected = stored.float().numpy().T
    np.testing.assert_array_equal(np.asarray(widened["block_1"]["moe"]["w_gate"][3]), expected)
    np.testing.assert_array_equal(np.asarray(bf16["block_1"]["moe"]["w_gate"][3], np.float32), expected)
    # Straight onto an 8-device mesh: each device's shard read from the file; values unchanged.
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    sharded = load_params(hf_dir, cfg, mesh)
    w_up = sharded["block_0"]["moe"]["w_up"]
    assert tuple(w_up.sharding.spec) == ("expert", "fsdp", "tensor") and len(w_up.addressable_shards) == 8
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


@pytest.mark.parametrize("cfg, architecture", [
    # Ours with a window and q/k/v biases is a Qwen2 windowing every layer; static NTK is a larger base.
    (ModelConfig(vocab_size=VOCAB, d_model=64, d_ff=96, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                 qkv_bias=True, sliding_window=WINDOW, rope_scaling="ntk", rope_scaling_factor=2.0,
                 tie_embeddings=False), "Qwen2ForCausalLM"),
    (ModelConfig(vocab_size=VOCAB, d_model=64, d_ff=96, num_layers=2, num_heads=4, num_kv_heads=1, max_seq_len=64,
                 head_dim=32, rope_scaling="linear", rope_scaling_factor=4.0, rope_theta=500.0), "LlamaForCausalLM"),
])
def test_our_models_export_to_the_family_that_computes_them(tmp_path, cfg, architecture):
    leaves, tree = jax.tree.flatten(unbox(init_params(cfg, jax.random.key(0))))
    keys = jax.random.split(jax.random.key(1), len(leaves))  # every parameter random, scales and biases too
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    hf = hf_config_from_model(cfg, "float32")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    save_weights(tmp_path, params, cfg, "float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf["architectures"] == [architecture] == [type(model).__name__]
    ours = np.asarray(jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x)[0])(params, TOKENS))
    np.testing.assert_allclose(ours, hf_logits(model, TOKENS), atol=ATOL, rtol=0)
    assert model_config_from_hf(hf).rope_scaling == ("none" if cfg.rope_scaling == "ntk" else "linear")


def test_safetensors_writer_reads_back_with_the_reference_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b.c": np.ones((5,), np.float16)}
    write_safetensors(tmp_path / "x.safetensors", [(k, v.shape, v.dtype) for k, v in arrays.items()], arrays.get)
    loaded = safetensors_numpy.load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(arrays) and all(np.array_equal(loaded[k], v) for k, v in arrays.items())


# --- errors: one line, exit status 2, nothing written ---------------------------------------------------


def broken_copy(src: Path, tmp_path: Path, edit_config=None, drop_tensor=None) -> Path:
    """A copy of the model folder `src` with its config.json edited or one tensor left out."""
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if drop_tensor:
        f = SafetensorsFile(src / "model.safetensors")
        specs = [(k, f.shape(k), f.get(k).dtype) for k in f.keys() if k != drop_tensor]
        write_safetensors(dst / "model.safetensors", specs, f.get)
    return dst


def only_config(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "config_only"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    return dst


@pytest.mark.parametrize("case, message", [
    ("missing config", "no config.json"),
    ("missing weights", "no weights: expected model.safetensors or model.safetensors.index.json"),
    ("unsupported architecture", "architecture 'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM, "
                                 "MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM"),
    ("shape mismatch", "tensor model.layers.0.mlp.gate_proj.weight has shape [96, 64], but config.json implies "
                       "[80, 64]"),
    ("missing tensor", "missing tensor model.layers.1.self_attn.k_proj.weight"),
    ("unsupported rope", "rope_parameters.rope_type='llama3': supported: default, linear"),
    ("output bias", "attention_bias=True"),
])
def test_import_errors(llama, tmp_path, capsys, case, message):
    folder = {
        "missing config": lambda: tmp_path,
        "missing weights": lambda: only_config(llama[2], tmp_path),
        "unsupported architecture": lambda: broken_copy(
            llama[2], tmp_path, lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")),
        "shape mismatch": lambda: broken_copy(llama[2], tmp_path, lambda c: c.update(intermediate_size=80)),
        "missing tensor": lambda: broken_copy(llama[2], tmp_path,
                                              drop_tensor="model.layers.1.self_attn.k_proj.weight"),
        "unsupported rope": lambda: broken_copy(llama[2], tmp_path, lambda c: c["rope_parameters"].update(
            rope_type="llama3", factor=8.0)),
        "output bias": lambda: broken_copy(llama[2], tmp_path, lambda c: c.update(attention_bias=True)),
    }[case]()
    out = tmp_path / "out" / "run"
    out.parent.mkdir()
    assert convert.main(["--from-hf", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not any(out.parent.iterdir())  # no half-written or temporary directory


def test_export_errors(llama, tmp_path, capsys):
    run_dir = llama[3]
    assert convert.main(["--to-hf", str(run_dir), "--out", str(run_dir)]) == 2  # exists
    assert capsys.readouterr().err == (f"error: --out {run_dir} already exists; pick a new path or pass "
                                       "--overwrite to replace it\n")
    assert convert.main(["--to-hf", str(run_dir), "--out", str(tmp_path / "x"), "--step", "5"]) == 2
    assert capsys.readouterr().err.startswith("error: step=5: not among the saved checkpoints [0] in ")
    assert not (tmp_path / "x").exists()
    assert convert.main(["--to-hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no run.json" in capsys.readouterr().err and not (tmp_path / "x").exists()
    cfg = from_dict(TrainConfig, json.loads((run_dir / "run.json").read_text())["config"]).model
    with pytest.raises(UnsupportedError, match="model.norm='layernorm'"):
        export_family(dataclasses.replace(cfg, norm="layernorm"))


def damaged_copy(src: Path, tmp_path: Path, case: str) -> tuple[Path, str]:
    """A copy of the model folder `src` with one file damaged as `case` says, and the error line expected."""
    folder = tmp_path / "damaged"
    shutil.copytree(src, folder)
    config, weights = folder / "config.json", folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    size = weights.stat().st_size
    if case == "config is a list":
        config.write_text("[1, 2]")
        return folder, f"{config}: expected a JSON object, not a list"
    if case == "config is not JSON":
        config.write_text('{"hidden_size": ')
        return folder, f"{config}: not valid JSON (Expecting value: line 1 column 17 (char 16))"
    if case == "config lacks hidden_size":
        hf = json.loads(config.read_text())
        del hf["hidden_size"]
        config.write_text(json.dumps(hf))
        return folder, "config.json: missing hidden_size (required for llama)"
    if case == "garbage header length":
        with weights.open("r+b") as f:
            f.write(struct.pack("<Q", 2 ** 62))
        return folder, (f"{weights}: not a safetensors file (header length {2 ** 62} is past the end of the file, "
                        f"which has {size} bytes)")
    if case == "header is not JSON":
        with weights.open("r+b") as f:
            f.seek(8)
            f.write(b"garbage!")
        return folder, f"{weights}: not a safetensors file (unreadable JSON header)"
    if case == "truncated weights":  # the last tensor in the file loses its last 100 bytes
        length = struct.unpack("<Q", weights.read_bytes()[:8])[0]
        header = json.loads(weights.read_bytes()[8:8 + length])
        header.pop("__metadata__", None)
        name = max(header, key=lambda k: header[k]["data_offsets"])
        begin, end = (8 + length + offset for offset in header[name]["data_offsets"])
        os.truncate(weights, size - 100)
        return folder, (f"{weights}: truncated: tensor {name!r} needs bytes [{begin}, {end}) but the file has "
                        f"{size - 100}")
    names = SafetensorsFile(weights).keys()
    if case == "index names a missing shard":
        weights.rename(folder / "model-00001-of-00002.safetensors")
        shards = {name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(names)}
        index.write_text(json.dumps({"metadata": {}, "weight_map": shards}))
        return folder, (f"{folder}: model.safetensors.index.json lists model-00002-of-00002.safetensors, "
                        "which is missing")
    assert case == "index is not JSON"
    index.write_text("weights: all of them")
    return folder, f"{index}: not valid JSON (Expecting value: line 1 column 1 (char 0))"


@pytest.mark.parametrize("case", ["config is a list", "config is not JSON", "config lacks hidden_size",
                                  "garbage header length", "header is not JSON", "truncated weights",
                                  "index names a missing shard", "index is not JSON"])
def test_import_of_damaged_files_fails_with_one_line(llama, tmp_path, capsys, case):
    folder, message = damaged_copy(llama[2], tmp_path, case)
    out = tmp_path / "out" / "run"
    out.parent.mkdir()
    assert convert.main(["--from-hf", str(folder), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not any(out.parent.iterdir())  # no half-written or temporary directory


@pytest.mark.parametrize("case", ["run.json is not JSON", "no run.json", "checkpoint folder deleted",
                                  "checkpoint file truncated"])
def test_export_of_a_damaged_run_fails_with_one_line(llama, tmp_path, capsys, case):
    """A run whose record or orbax checkpoint is damaged: one line naming the run and the file, no traceback."""
    run = tmp_path / "run"
    shutil.copytree(llama[3], run)
    step = run / "checkpoints" / "0"
    if case == "run.json is not JSON":
        (run / "run.json").write_text("{bad")
        named = f"{run / 'run.json'}: not valid JSON"
    elif case == "no run.json":
        (run / "run.json").unlink()
        named = f"{run}: no run.json"
    elif case == "checkpoint folder deleted":
        shutil.rmtree(step / "default")
        named = "default/"
    else:  # the largest file orbax wrote: the parameters' bytes
        data = max((p for p in (step / "default").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        os.truncate(data, 10)
        named = str(data.relative_to(step))
    out = tmp_path / "hf"
    assert convert.main(["--to-hf", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(run) in err and named in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_unknown_flag_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        convert.main(["--from-hf", str(tmp_path), "--out", str(tmp_path / "out"), "--bogus"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "python -m research.convert: error: unrecognized arguments: --bogus\n"
    assert not (tmp_path / "out").exists()


def test_qwen2_mixed_sliding_layers_are_refused():
    config = transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(UnsupportedError, match="mixes sliding and full attention layers"):
        model_config_from_hf(config.to_dict())


def test_command_line_exit_status(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "research.convert", "--from-hf", str(tmp_path), "--out", str(out)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2 and result.stderr.strip().endswith("no config.json (expected a Hugging Face "
                                                                     "model folder)"), result.stderr
    assert not out.exists()


# --- --overwrite: replaces a previous result of the same direction, never anything else ------------------


def leftovers(folder: Path) -> list[str]:
    """Temporary or set-aside directories the converter left beside its output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_overwrite_replaces_a_previous_import(llama, tmp_path, capsys):
    _, _, hf_dir, run_dir, cfg, params = llama
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "stale.txt").write_text("from the previous conversion")
    assert convert.main(["--from-hf", str(hf_dir), "--out", str(out)]) == 2
    assert "already exists; pick a new path or pass --overwrite" in capsys.readouterr().err
    assert convert.main(["--from-hf", str(hf_dir), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert not (out / "stale.txt").exists() and leftovers(tmp_path) == []
    again_cfg, again, tokenizer = load_run(out)
    assert again_cfg == cfg and isinstance(tokenizer, HFTokenizer)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert.import_hf(hf_dir, empty, overwrite=True) == cfg and (empty / "run.json").is_file()


def test_overwrite_replaces_a_previous_export(llama, tmp_path, capsys):
    run_dir = llama[3]
    out = tmp_path / "hf"
    convert.export_hf(run_dir, out)
    (out / "stale.safetensors").write_text("x")
    assert convert.main(["--to-hf", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert not (out / "stale.safetensors").exists() and (out / "tokenizer.json").is_file()
    assert leftovers(tmp_path) == []
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("case, message", [
    ("folder of other files", "is not a run directory (nothing replaced); --overwrite replaces only a previous run "
                              "directory or an empty folder"),
    ("a file", "is not a directory; --overwrite replaces only a previous run directory"),
    ("the input", "is or holds the input"),
    ("folder holding the input", "is or holds the input"),
    ("export into a run directory", "is not a Hugging Face model folder (nothing replaced)"),
])
def test_overwrite_refuses_what_it_did_not_write(llama, tmp_path, capsys, case, message):
    _, _, hf_dir, run_dir, _, _ = llama
    if case == "folder of other files":
        out = tmp_path / "notes"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "a file":
        out = tmp_path / "file"
        out.write_text("mine")
    elif case == "the input":
        out = tmp_path / "hf"
        shutil.copytree(hf_dir, out)
        hf_dir = out
    elif case == "folder holding the input":
        out = tmp_path / "holder"
        shutil.copytree(run_dir, out)  # a run directory, but the model folder lives inside it
        shutil.copytree(hf_dir, out / "hf")
        hf_dir = out / "hf"
    else:
        out = tmp_path / "run"
        shutil.copytree(run_dir, out)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = (["--to-hf", str(run_dir)] if case == "export into a run directory" else ["--from-hf", str(hf_dir)])
    assert convert.main([*argv, "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} ") and message in err and err.count("\n") == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing touched


def test_failed_overwrite_keeps_the_previous_result(llama, tmp_path, capsys, monkeypatch):
    _, _, hf_dir, run_dir, _, _ = llama
    out = tmp_path / "hf"
    convert.export_hf(run_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "save_weights", broken)
    assert convert.main(["--to-hf", str(run_dir), "--out", str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err == "error: disk full\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(tmp_path) == []

    run_out = tmp_path / "run"
    shutil.copytree(run_dir, run_out)
    record = (run_out / "run.json").read_bytes()
    monkeypatch.setattr(convert, "load_params", broken)
    assert convert.main(["--from-hf", str(hf_dir), "--out", str(run_out), "--overwrite"]) == 2
    assert (run_out / "run.json").read_bytes() == record and leftovers(tmp_path) == []
    load_run(run_out)  # still whole


def test_a_failed_swap_puts_the_previous_result_back(tmp_path, monkeypatch):
    old, new = tmp_path / "out", tmp_path / "new"
    old.mkdir()
    (old / "run.json").write_text("old")
    new.mkdir()
    (new / "run.json").write_text("new")
    real_rename = convert.os.rename

    def rename(src, dst):
        if Path(src) == new:
            raise OSError("interrupted")
        real_rename(src, dst)

    monkeypatch.setattr(convert.os, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        convert.replace_dir(new, old)
    assert (old / "run.json").read_text() == "old" and (new / "run.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
    monkeypatch.setattr(convert.os, "rename", real_rename)
    convert.replace_dir(new, old)
    assert (old / "run.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
