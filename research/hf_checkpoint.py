"""Hugging Face safetensors weights <-> our params: the weight map, lazy loading onto a mesh, export.

One table (`weight_rules`) says where each of our parameters lives in a Hugging Face checkpoint; import
and export both read it. HF linear layers store [out, in]; ours are [in, out...] with heads split out,
so a rule is a transpose and a reshape, or a reshape alone (norm scales, embeddings, biases). Mixtral
stores one tensor per expert; ours are stacked on a leading expert axis. A scanned model (models/layers.py)
stacks its blocks' tensors on one more leading axis, so its rules stack HF's per-layer tensors on
[layers] or [layers, experts]: import writes the target config's layout, export reads either. RoPE needs no
permutation: models/rope.py pairs dims (i, i + H/2), as HF's rotate_half does.

Loading is lazy: each parameter is assembled with `jax.make_array_from_callback` from its model's
logical sharding, and each device's callback slices only its shard out of the memory-mapped file
(research/safetensors_io.py), converting dtype on the way. The checkpoint is never copied whole.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from models.config import ModelConfig
from models.layers import LAYERS, is_stacked, scan_steps
from models.sharding import DEFAULT_RULES, Rules, logical_shardings
from models.transformer import Transformer, unbox
from research.config import MeshConfig
from research.hf_config import ConversionError
from research.mesh import make_mesh
from research.safetensors_io import SafetensorsFile, write_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOATS = ("F64", "F32", "F16", "BF16")
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Tensors HF checkpoints may carry that hold nothing our model needs (old RoPE caches).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WeightRule:
    path: ParamPath  # our parameter, e.g. ("block_0", "attn", "wq")
    names: tuple[str, ...]  # its HF tensors, row-major over `stack` (one name when stack is ())
    hf_shape: tuple[int, ...]  # the shape of each HF tensor
    transpose: bool  # HF Linear [out, in]: ours is its transpose, reshaped
    stack: tuple[int, ...] = ()  # our leading axes the HF tensors stack on: (experts,), (layers[, experts])

    def index(self, k: int) -> tuple[int, ...]:
        """Where HF tensor names[k] sits on our stacked leading axes."""
        return tuple(int(i) for i in np.unravel_index(k, self.stack)) if self.stack else ()


def weight_rules(cfg: ModelConfig) -> list[WeightRule]:
    """Where each parameter of `Transformer(cfg)` lives in a Llama/Mistral/Qwen2/Mixtral checkpoint, in the
    layout `cfg` runs."""
    rules = loop_weight_rules(cfg)
    return stacked_rules(rules, cfg) if cfg.scan_layers else rules


def stacked_rules(rules: list[WeightRule], cfg: ModelConfig) -> list[WeightRule]:
    """The loop layout's rules for the scanned layout: block i's tensors stacked into its scan position."""
    by_path = {rule.path: rule for rule in rules}
    stacked = [rule for rule in rules if not rule.path[0].startswith("block_")]
    steps = scan_steps(cfg)
    for j in range(cfg.scan_group):
        for first in (rule for rule in rules if rule.path[0] == f"block_{j}"):
            layers = [by_path[(f"block_{s * cfg.scan_group + j}", *first.path[1:])] for s in range(steps)]
            stacked.append(dataclasses.replace(first, path=(LAYERS, *first.path), stack=(steps, *first.stack),
                                               names=tuple(name for layer in layers for name in layer.names)))
    return stacked


def loop_weight_rules(cfg: ModelConfig) -> list[WeightRule]:
    """`weight_rules` in the loop layout: one parameter per block."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    nh, kh = cfg.num_heads * cfg.resolved_head_dim, cfg.num_kv_heads * cfg.resolved_head_dim
    rules = [WeightRule(("embed", "table"), ("model.embed_tokens.weight",), (v, d), False),
             WeightRule(("final_norm", "scale"), ("model.norm.weight",), (d,), False)]
    if not cfg.tie_embeddings:
        rules.append(WeightRule(("lm_head",), ("lm_head.weight",), (v, d), True))
    for i in range(cfg.num_layers):
        ours, hf = f"block_{i}", f"model.layers.{i}"

        def rule(path: str, name: str, shape: tuple[int, ...], transpose: bool = True) -> WeightRule:
            return WeightRule((ours, *path.split("/")), (f"{hf}.{name}",), shape, transpose)

        rules += [rule("attn_norm/scale", "input_layernorm.weight", (d,), False),
                  rule("mlp_norm/scale", "post_attention_layernorm.weight", (d,), False),
                  rule("attn/wq", "self_attn.q_proj.weight", (nh, d)),
                  rule("attn/wk", "self_attn.k_proj.weight", (kh, d)),
                  rule("attn/wv", "self_attn.v_proj.weight", (kh, d)),
                  rule("attn/wo", "self_attn.o_proj.weight", (d, nh))]
        if cfg.qkv_bias:
            rules += [rule(f"attn/w{x}_bias", f"self_attn.{x}_proj.bias", (size,), False)
                      for x, size in (("q", nh), ("k", kh), ("v", kh))]
        if not cfg.is_moe_layer(i):
            rules += [rule("mlp/w_gate", "mlp.gate_proj.weight", (f, d)),
                      rule("mlp/w_up", "mlp.up_proj.weight", (f, d)),
                      rule("mlp/w_down", "mlp.down_proj.weight", (d, f))]
            continue
        moe = f"{hf}.block_sparse_moe"
        experts = range(cfg.moe.num_experts)
        rules.append(rule("moe/router", "block_sparse_moe.gate.weight", (cfg.moe.num_experts, d)))
        # Mixtral's w1 is the gate, w3 the up projection, w2 the down projection.
        for ours_name, hf_name, shape in (("w_gate", "w1", (f, d)), ("w_up", "w3", (f, d)), ("w_down", "w2", (d, f))):
            names = tuple(f"{moe}.experts.{e}.{hf_name}.weight" for e in experts)
            rules.append(WeightRule((ours, "moe", ours_name), names, shape, True, (cfg.moe.num_experts,)))
    return rules


def to_ours(hf: np.ndarray, rule: WeightRule, shape: tuple[int, ...]) -> np.ndarray:
    """An HF tensor in our layout `shape` (a view where numpy can make one)."""
    return (hf.T if rule.transpose else hf).reshape(shape)


def to_hf(ours: np.ndarray, rule: WeightRule) -> np.ndarray:
    """One of our parameters (one expert's, for stacked rules) in the HF layout."""
    return ours.reshape(rule.hf_shape[::-1]).T if rule.transpose else ours.reshape(rule.hf_shape)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a file that is not one is a ConversionError naming it."""
    try:
        value = json.loads(path.read_bytes())
    except ValueError as err:  # not JSON, or not text at all
        raise ConversionError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object, not a {type(value).__name__}")
    return value


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    return read_json_object(path)


def read_weight_map(folder: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name."""
    files = read_json_object(folder / INDEX_FILE).get("weight_map")
    if not (isinstance(files, dict) and files and all(isinstance(f, str) for f in files.values())):
        raise ConversionError(f"{folder / INDEX_FILE}: expected a \"weight_map\" object of tensor name -> file name")
    return files


class HFWeights:
    """The tensors of a checkpoint folder, one safetensors file or several with an index, by name."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if (folder / INDEX_FILE).is_file():
            files = read_weight_map(folder)
        elif (folder / SINGLE_FILE).is_file():
            files = None
        else:
            bins = " (pytorch .bin weights are not read: re-save with safetensors)" if any(folder.glob("*.bin")) else ""
            raise ConversionError(f"{folder}: no weights: expected {SINGLE_FILE} or {INDEX_FILE}{bins}")
        opened: dict[str, SafetensorsFile] = {}
        for name in sorted(set(files.values())) if files else [SINGLE_FILE]:
            if not (folder / name).is_file():
                raise ConversionError(f"{folder}: {INDEX_FILE} lists {name}, which is missing")
            opened[name] = SafetensorsFile(folder / name)
        self.folder = folder
        self._file = {t: opened[fn] for t, fn in files.items()} if files else {
            t: opened[SINGLE_FILE] for t in opened[SINGLE_FILE].keys()}

    def names(self) -> set[str]:
        return set(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file[name].shape(name)

    def dtype(self, name: str) -> str:
        return self._file[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._file[name].get(name)


def abstract_params(cfg: ModelConfig) -> Any:
    """The boxed (logical-axis) ShapeDtypeStructs of `Transformer(cfg)`'s params; nothing is allocated."""
    return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def check_weights(weights: HFWeights, cfg: ModelConfig, rules: list[WeightRule]) -> None:
    """Every tensor the config implies is there with its shape and a float dtype, and nothing else is."""
    expected = {name: rule.hf_shape for rule in rules for name in rule.names}
    present = weights.names()
    for name, shape in expected.items():
        if name not in present:
            raise ConversionError(f"{weights.folder}: missing tensor {name}")
        if weights.shape(name) != shape:
            raise ConversionError(f"{weights.folder}: tensor {name} has shape {list(weights.shape(name))}, "
                                  f"but config.json implies {list(shape)}")
        if weights.dtype(name) not in FLOATS:
            raise ConversionError(f"{weights.folder}: tensor {name} has dtype {weights.dtype(name)}; expected "
                                  + ", ".join(FLOATS))
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()  # some tied checkpoints store the copy too
    extra = sorted(present - set(expected) - tied)
    extra = [n for n in extra if not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(f"{weights.folder}: unexpected tensor {extra[0]}{more}: not part of this model "
                              "per config.json")


def load_params(folder: Path, cfg: ModelConfig, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Any:
    """The params of `Transformer(cfg)` from a checkpoint folder, each placed with its logical sharding
    on `mesh` (default: the first device) and cast to cfg.param_dtype."""
    mesh = mesh or make_mesh(MeshConfig(data=1), jax.devices()[:1])
    boxed = abstract_params(cfg)
    shapes = flax.traverse_util.flatten_dict(jax.tree.map(lambda x: x.shape, unbox(boxed)))
    shardings = flax.traverse_util.flatten_dict(logical_shardings(boxed, mesh, rules))
    weights = HFWeights(folder)
    table = weight_rules(cfg)
    check_weights(weights, cfg, table)
    assert {r.path for r in table} == set(shapes), "weight_rules must cover every parameter exactly"
    dtype = np.dtype(NUMPY_DTYPES[cfg.param_dtype])
    flat = {}
    for rule in table:
        shape, k = shapes[rule.path], len(rule.stack)
        views = np.empty(rule.stack, object)  # each HF tensor as a view in our layout, where it stacks
        for i, name in enumerate(rule.names):
            views[rule.index(i)] = to_ours(weights.get(name), rule, shape[k:])

        def shard(index: tuple[slice, ...], views: np.ndarray = views, k: int = k) -> np.ndarray:
            # Reads only the stacked tensors (and slices of them) this shard holds, into a copy: never the
            # file's memory, so the params do not change if the file does.
            picked = views[(*index[:k], ...)]
            first = picked.flat[0][index[k:]]
            out = np.empty(picked.shape + first.shape, dtype)
            for at in np.ndindex(picked.shape):
                out[at] = picked[at][index[k:]]
            return out
        flat[rule.path] = jax.make_array_from_callback(shape, shardings[rule.path], shard)
    return flax.traverse_util.unflatten_dict(flat)


def save_weights(folder: Path, params: Any, cfg: ModelConfig, dtype: str, max_shard_bytes: int = 0) -> None:
    """Writes params (either layout) as HF safetensors in `dtype`: one model.safetensors, or shards of at
    most max_shard_bytes (a tensor larger than that gets a shard of its own) with an index. Tensors are
    fetched from the devices one at a time: a scanned model's are sliced out of its stacks, rather than
    unstacked whole (`unstack_layers`), which would hold a second copy of every block on the devices."""
    flat = flax.traverse_util.flatten_dict(params)
    target = NUMPY_DTYPES[dtype]
    sources: dict[str, tuple[WeightRule, tuple[int, ...]]] = {}
    specs = []
    for rule in weight_rules(dataclasses.replace(cfg, scan_layers=is_stacked(params))):
        for k, name in enumerate(rule.names):
            sources[name] = (rule, rule.index(k))
            specs.append((name, rule.hf_shape, target))

    def fetch(name: str) -> np.ndarray:
        rule, index = sources[name]
        return to_hf(np.asarray(jax.device_get(flat[rule.path][index])), rule).astype(target)

    groups, size = [[]], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * target.itemsize
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    if len(groups) == 1:
        write_safetensors(folder / SINGLE_FILE, specs, fetch)
        return
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / file, group, fetch)
        weight_map.update({name: file for name, _, _ in group})
    total = sum(int(np.prod(shape)) * target.itemsize for _, shape, _ in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
