"""Scan over layers and remat policies (models/layers.py): the scanned layout computes what the loop layout
does (logits, loss gradients, MoE aux and router biases), params convert both ways, checkpoints and Hugging
Face weights load and save in either layout, decoding runs scanned params, and bad values fail in one line.

Tolerance: fp32; the two layouts run the same ops in the same order, so they agree to rounding (1e-5).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.beam_search import BeamConfig, beam_search
from decoding.generate import generate
from models.config import REMAT_POLICIES, ConfigError, ModelConfig, MoEConfig
from models.layers import CHECKPOINT_POLICIES, LAYERS, is_stacked, stack_layers, unstack_layers
from models.sharding import logical_shardings
from models.transformer import Transformer, init_params, unbox, with_router_biases
from research.checkpoint import Checkpointer
from research.config import MeshConfig, TrainConfig, apply_overrides, config_hash, to_dict
from research.hf_checkpoint import load_params, save_weights
from research.mesh import make_mesh
from research.runs import load_run
from research.safetensors_io import SafetensorsFile
from research.train_step import lm_loss

TOL = 1e-5
DENSE = ModelConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=48,
                    max_seq_len=32, init_std=0.3)
# MoE every second block, with the auxiliary-loss-free bias (a stacked aux output) and balancing losses.
MOE = dataclasses.replace(DENSE, moe=MoEConfig(num_experts=4, top_k=2, every_n_layers=2, capacity_factor=1.0,
                                               switch_loss_weight=0.01, z_loss_weight=0.001,
                                               bias_update_rate=0.01))
CONFIGS = {"dense": DENSE, "moe": MOE}
TOKENS = jax.random.randint(jax.random.key(1), (2, 13), 0, DENSE.vocab_size)


def scanned(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, scan_layers=True, **changes)


def loop_params(cfg: ModelConfig):
    return unbox(init_params(cfg, jax.random.key(0)))


def loss_and_grads(cfg: ModelConfig, params):
    """lm_loss (objective, nll, aux) and the objective's gradients, in training mode."""
    fn = jax.value_and_grad(lambda p: lm_loss(Transformer(cfg), p, TOKENS, jax.random.key(2)), has_aux=True)
    return jax.jit(fn)(params)


def assert_trees_close(a, b, atol=TOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0), a, b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scan_equals_loop(name):
    cfg = CONFIGS[name]
    params = loop_params(cfg)
    stacked = stack_layers(params, scanned(cfg))
    logits = Transformer(cfg).apply({"params": params}, TOKENS)[0]
    np.testing.assert_allclose(Transformer(scanned(cfg)).apply({"params": stacked}, TOKENS)[0], logits,
                               atol=TOL, rtol=0)
    (total, (nll, aux)), grads = loss_and_grads(cfg, params)
    (s_total, (s_nll, s_aux)), s_grads = loss_and_grads(scanned(cfg), stacked)
    np.testing.assert_allclose([s_total, s_nll], [total, nll], atol=TOL, rtol=0)
    assert_trees_close(unstack_layers(s_grads, scanned(cfg)), grads)
    # The aux losses and statistics keep the loop's per-block names; the biases mirror the params' layout.
    assert_trees_close({k: s_aux[k] for k in ("losses", "stats")}, {k: aux[k] for k in ("losses", "stats")})
    if name == "moe":
        assert set(aux["router_bias"]) == {"block_1", "block_3"} and set(s_aux["router_bias"]) == {LAYERS}
        assert s_aux["router_bias"][LAYERS]["block_1"].shape == (2, 4)
        # The train step's bias update gives the same params in either layout.
        assert_trees_close(unstack_layers(with_router_biases(stacked, s_aux["router_bias"]), MOE),
                           with_router_biases(params, aux["router_bias"]))


def test_stack_unstack_round_trip_and_the_layers_axis():
    cfg = scanned(MOE)
    params = loop_params(MOE)
    stacked = stack_layers(params, cfg)
    boxed = init_params(cfg, jax.random.key(0))
    # The same tree and shapes as a scanned model's own init; each block's leaves gain a leading axis.
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, unbox(boxed))
    assert set(stacked[LAYERS]) == {"block_0", "block_1"} and "moe" in stacked[LAYERS]["block_1"]
    assert stacked[LAYERS]["block_1"]["moe"]["w_up"].shape == (2, 4, 32, 48)
    np.testing.assert_array_equal(stacked[LAYERS]["block_1"]["attn"]["wq"][1], params["block_3"]["attn"]["wq"])
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked, cfg), params)
    # Already in the target layout: returned unchanged.
    assert unstack_layers(params, cfg) is params and stack_layers(stacked, cfg) is stacked
    # The stacked axis is named "layers" and split over no mesh axis; the others shard as in the loop.
    assert boxed[LAYERS]["block_0"]["attn"]["wq"].names == ("layers", "embed", "heads", "head_dim")
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    spec = logical_shardings(boxed, mesh)[LAYERS]["block_1"]["moe"]["w_up"].spec
    assert tuple(spec) == (None, "expert", "fsdp", "tensor")
    assert cfg.param_count() == sum(x.size for x in jax.tree.leaves(stacked))


# Each policy in the scanned layout, and the loop layout once: remat wraps the block the same way in both.
@pytest.mark.parametrize("policy, scan", [(p, True) for p in REMAT_POLICIES if p != "none"] + [("full", False)])
def test_remat_policies_give_the_same_loss_and_grads(policy, scan):
    params = loop_params(MOE)
    (total, _), grads = loss_and_grads(MOE, params)
    cfg = dataclasses.replace(MOE, remat_policy=policy, scan_layers=scan)
    r_params = stack_layers(params, cfg) if scan else params
    # Each block of the traced program (once in the scan's body) is rematerialised, with the policy.
    forward = str(jax.make_jaxpr(lambda p: lm_loss(Transformer(cfg), p, TOKENS, jax.random.key(2))[0])(r_params))
    assert forward.count("remat2[") == (cfg.scan_group if scan else cfg.num_layers)
    chosen = CHECKPOINT_POLICIES[policy]  # jaxprs print a function as <function name at ...>
    shown = f"<function {chosen.__name__} " if hasattr(chosen, "__name__") else repr(chosen)
    assert forward.count(f"policy={shown}") == forward.count("remat2[")
    (r_total, _), r_grads = loss_and_grads(cfg, r_params)
    np.testing.assert_allclose(r_total, total, atol=TOL, rtol=0)
    assert_trees_close(unstack_layers(r_grads, cfg), grads)


def test_checkpoint_of_a_scanned_model_converts_to_the_loop_layout(tmp_path):
    cfg = scanned(DENSE)
    params = stack_layers(loop_params(DENSE), cfg)
    (tmp_path / "run.json").write_text(json.dumps({"config": to_dict(TrainConfig(model=cfg))}))
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(0, {"params": params})
    ckpt.wait()
    ckpt.close()
    loaded_cfg, loaded, _ = load_run(tmp_path)
    assert loaded_cfg == cfg and is_stacked(loaded)  # the run's layout
    expected = Transformer(cfg).apply({"params": params}, TOKENS)[0]
    loop = unstack_layers(loaded, cfg)
    np.testing.assert_allclose(Transformer(DENSE).apply({"params": loop}, TOKENS)[0], expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoding_scanned_params_equals_decoding_loop_params(name):
    cfg = CONFIGS[name]
    params = loop_params(cfg)
    scan_cfg = scanned(cfg, remat_policy="dots")  # remat changes nothing without a backward pass
    stacked = stack_layers(params, scan_cfg)
    prompt, lengths = np.array([[5, 9, 2, 7, 1, 3], [11, 4, 8, 0, 0, 0]], np.int32), np.array([6, 3], np.int32)
    loop = generate(params, cfg, prompt, lengths, max_new_tokens=8)
    scan = generate(stacked, scan_cfg, prompt, lengths, max_new_tokens=8)
    np.testing.assert_array_equal(scan.tokens, loop.tokens)
    np.testing.assert_allclose(scan.logprobs, loop.logprobs, atol=TOL, rtol=0)
    beams = [beam_search(p, c, prompt, lengths, max_new_tokens=4, beam=BeamConfig(num_beams=2))
             for p, c in ((stacked, scan_cfg), (params, cfg))]
    np.testing.assert_array_equal(beams[0].tokens, beams[1].tokens)


def test_a_scanned_model_refuses_a_kv_cache():
    from models.kv_cache import init_cache
    cfg = scanned(DENSE)
    params = stack_layers(loop_params(DENSE), cfg)
    with pytest.raises(ValueError, match="a KV cache needs the loop layout"):
        Transformer(cfg).apply({"params": params}, TOKENS, cache=init_cache(cfg, 2, 16))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_weights_import_to_and_export_from_either_layout(name, tmp_path):
    """Our HF export of the loop params, imported into the scanned layout, is the stacked params; exporting
    the scanned params writes the same tensors."""
    cfg = CONFIGS[name]
    if name == "moe":  # Mixtral's layout: experts in every block, so a scan step is one block
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, every_n_layers=1, bias_update_rate=0.0))
    params = loop_params(cfg)
    (tmp_path / "loop").mkdir()
    (tmp_path / "scan").mkdir()
    save_weights(tmp_path / "loop", params, cfg, "float32")
    imported = load_params(tmp_path / "loop", scanned(cfg))
    assert is_stacked(imported)
    jax.tree.map(np.testing.assert_array_equal, imported, stack_layers(params, scanned(cfg)))
    save_weights(tmp_path / "scan", imported, scanned(cfg), "float32")
    loop_file, scan_file = (SafetensorsFile(tmp_path / d / "model.safetensors") for d in ("loop", "scan"))
    assert set(scan_file.keys()) == set(loop_file.keys())
    for key in loop_file.keys():
        np.testing.assert_array_equal(scan_file.get(key), loop_file.get(key))


def test_overrides_hash_and_record():
    base = TrainConfig(model=DENSE)
    cfg = apply_overrides(base, ["model.scan_layers=true", "model.remat_policy=dots_no_batch"])
    assert cfg.model.scan_layers is True and cfg.model.remat_policy == "dots_no_batch"
    assert config_hash(cfg) != config_hash(base)
    assert to_dict(cfg)["model"]["scan_layers"] is True


@pytest.mark.parametrize("overrides, message", [
    (["model.remat_policy=sometimes"],
     "model.remat_policy='sometimes': expected one of none, full, dots, dots_no_batch"),
    (["model.scan_layers=maybe"], "model.scan_layers='maybe': expected a value of type bool"),
    (["model.moe.num_experts=4", "model.moe.every_n_layers=3", "model.scan_layers=true"],
     "model.scan_layers=True: a scan step is model.moe.every_n_layers=3 blocks (one of them MoE), which must "
     "divide model.num_layers=4"),
    (["model.remat=true"], "unknown override key 'model.remat': expected one of model.vocab_size"),
])
def test_bad_values_fail_with_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(model=DENSE), overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    if "model.remat=true" in overrides:
        assert str(err.value).endswith("('model.remat' was renamed to 'model.remat_policy')")


def test_a_run_recorded_before_remat_policy_still_loads(tmp_path):
    """run.json files from before the rename hold model.remat (a bool): read_run_config translates it."""
    import json

    from configs import get_config
    from research.config import to_dict
    from research.runs import read_run_config

    config = to_dict(get_config("smoke"))
    for old, policy in ((False, "none"), (True, "full")):
        model = {k: v for k, v in config["model"].items() if k not in ("remat_policy", "scan_layers")}
        (tmp_path / "run.json").write_text(json.dumps({"config": {**config, "model": {**model, "remat": old}}}))
        assert read_run_config(tmp_path).model.remat_policy == policy
