"""The mixture-of-experts FFN against plain NumPy references: routing, dropping, losses, bias, noise,
gradients, expert parallelism, config errors, and training with resume."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import get_config
from models.config import ConfigError, ModelConfig, MoEConfig
from models.moe import MoE
from models.sharding import DEFAULT_RULES, logical_shardings
from models.transformer import Transformer, unbox
from research.checkpoint import Checkpointer
from research.config import MeshConfig, apply_overrides
from research.mesh import batch_sharding, make_mesh
import research.train as train_mod
from research.train import train
from research.train_step import build_steps

# Tolerances, written down once: fp32 single ops (and one layer vs a float64 loop), fp32 whole models.
OP_TOL = 1e-5
MODEL_TOL = 1e-4

# One MoE layer: d_model 16, 4 experts of width 32. init_std 0.5 gives O(1) activations and a router
# whose probabilities are well separated, so fp32 and float64 choose the same experts.
LAYER = ModelConfig(vocab_size=61, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=32,
                    max_seq_len=32, init_std=0.5, moe=MoEConfig(num_experts=4, top_k=2))
TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                   max_seq_len=32)


def with_moe(cfg: ModelConfig, **moe) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))


@functools.partial(jax.jit, static_argnames=("cfg", "train"))
def moe_apply(cfg, params, x, train=False, rng=None):
    return MoE(cfg, train).apply({"params": params}, x, rngs={} if rng is None else {"router": rng})


def random_params(module, inputs, std, seed=0):
    """(boxed abstract params, random normal params) of `module`'s shapes.

    Shapes come from tracing `init` (jax.eval_shape) rather than running it: compiling each init, or
    running it op by op, costs seconds per config on CPU and the values need not be the initializer's.
    """
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), inputs))["params"]
    rng = np.random.default_rng(seed)
    return boxed, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype), unbox(boxed))


def moe_params(cfg, seed=0):
    return random_params(MoE(cfg), jnp.zeros((1, 4, cfg.d_model)), cfg.init_std, seed)[1]


def model_params(cfg, seed=0):
    return random_params(Transformer(cfg), jnp.zeros((1, 4), jnp.int32), 0.2, seed)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens):
    return Transformer(cfg).apply({"params": params}, tokens)[0]


def inputs(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def reference_moe(cfg, params, x, capacity=None):
    """Naive float64 loop over sequences, tokens and choices; capacity None: nothing dropped.

    Dropping follows the documented rule: per sequence, queues fill with every token's first choice
    before any second choice, tokens taken in sequence order or by descending top-1 probability.
    """
    moe = cfg.moe
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    y = np.zeros_like(x)
    probs = softmax(x @ p["router"])  # [B, T, E]
    for b in range(x.shape[0]):
        top = np.argsort(-probs[b], axis=-1, kind="stable")[:, :moe.top_k]  # [T, K]
        top_p = np.take_along_axis(probs[b], top, axis=-1)
        gates = top_p / top_p.sum(-1, keepdims=True) if moe.renormalize else top_p
        kept = np.ones(top.shape, bool)
        if capacity is not None:
            order = range(x.shape[1]) if moe.priority == "order" else np.argsort(-top_p[:, 0], kind="stable")
            taken = np.zeros(moe.num_experts, int)
            for j in range(moe.top_k):
                for t in order:
                    kept[t, j] = taken[top[t, j]] < capacity
                    taken[top[t, j]] += 1
        for t in range(x.shape[1]):
            for j in range(moe.top_k):
                if kept[t, j]:
                    e = top[t, j]
                    hidden = x[b, t] @ p["w_gate"][e]
                    hidden = hidden / (1 + np.exp(-hidden)) * (x[b, t] @ p["w_up"][e])
                    y[b, t] += gates[t, j] * (hidden @ p["w_down"][e])
    return y


@pytest.mark.parametrize("moe", [
    {"eval_capacity_factor": 2.0},  # 2 * 2 / 4 * T >= T: nothing can drop
    {"eval_capacity_factor": 0.0, "renormalize": True},  # dropless
])
def test_unlimited_capacity_equals_naive_loop(moe):
    cfg = with_moe(LAYER, **moe)
    params = moe_params(cfg)
    x = inputs((2, 24, cfg.d_model))
    y, aux = moe_apply(cfg, params, x)
    np.testing.assert_allclose(y, reference_moe(cfg, params, x), rtol=OP_TOL, atol=OP_TOL)
    assert float(aux["stats"]["dropped_fraction"]) == 0.0


def test_dense_mode_weights_every_expert_by_its_probability():
    cfg = with_moe(LAYER, router="dense")
    params = moe_params(cfg)
    x = inputs((1, 8, cfg.d_model))
    y, _ = moe_apply(cfg, params, x)
    everyone = with_moe(cfg, router="softmax", top_k=4, eval_capacity_factor=1.0)  # all 4, raw probs
    np.testing.assert_allclose(y, reference_moe(everyone, params, x), rtol=OP_TOL, atol=OP_TOL)


def test_one_expert_top_one_equals_dense_mlp():
    moe_cfg = with_moe(TINY, num_experts=1, top_k=1, eval_capacity_factor=1.0)
    params = model_params(moe_cfg)[1]
    dense = {name: dict(block) for name, block in params.items()}
    for name in ("block_0", "block_1"):
        experts = dense[name].pop("moe")
        dense[name]["mlp"] = {w: experts[w][0] for w in ("w_up", "w_gate", "w_down")}
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, TINY.vocab_size)
    np.testing.assert_allclose(forward(moe_cfg, params, tokens), forward(TINY, dense, tokens),
                               rtol=MODEL_TOL, atol=MODEL_TOL)


@pytest.mark.parametrize("priority", ["order", "probability"])
def test_dropped_tokens_match_reference(priority):
    cfg = with_moe(LAYER, eval_capacity_factor=0.5, priority=priority)  # capacity ceil(2 * 24 / 4 * 0.5) = 6
    params = moe_params(cfg)
    x = inputs((2, 24, cfg.d_model), seed=2)
    y, aux = moe_apply(cfg, params, x)
    np.testing.assert_allclose(y, reference_moe(cfg, params, x, capacity=6), rtol=OP_TOL, atol=OP_TOL)
    assert 0.4 < float(aux["stats"]["dropped_fraction"]) < 0.6  # at least half the 96 slots stay empty


@pytest.mark.parametrize("priority", ["order", "probability"])
def test_padding_takes_no_capacity_and_is_left_out_of_the_statistics(priority):
    """Each row padded with 9 garbage tokens and marked by `valid` gives what the row gives alone: the same
    outputs at its real tokens (capacity from its 24 real tokens, padding in no queue) and statistics."""
    cfg = with_moe(LAYER, eval_capacity_factor=0.5, priority=priority, z_loss_weight=1e-3)
    params = moe_params(cfg)
    x = inputs((2, 24, cfg.d_model), seed=2)
    padded = jnp.concatenate([x, 3 * inputs((2, 9, cfg.d_model), seed=3)], axis=1)
    valid = jnp.arange(33)[None, :] < 24
    want_y, want_aux = moe_apply(cfg, params, x)
    got_y, got_aux = jax.jit(lambda p, x, v: MoE(cfg).apply({"params": p}, x, v))(params, padded,
                                                                                 jnp.broadcast_to(valid, (2, 33)))
    np.testing.assert_allclose(got_y[:, :24], want_y, rtol=OP_TOL, atol=OP_TOL)
    np.testing.assert_allclose(got_y[:, :24], reference_moe(cfg, params, x, capacity=6), rtol=OP_TOL, atol=OP_TOL)
    for kind in ("stats", "losses"):
        for key, want in want_aux[kind].items():
            np.testing.assert_allclose(got_aux[kind][key], want, rtol=OP_TOL, atol=OP_TOL, err_msg=key)


def test_a_prompt_decodes_the_same_alone_and_in_a_padded_batch():
    """Capacity-factor MoE (8 experts, top-1, eval capacity 2): a short prompt batched with a long one is
    right-padded in the prefill; padding must not route, take capacity or change its tokens."""
    from decoding.generate import generate
    cfg = dataclasses.replace(TINY, moe=MoEConfig(num_experts=8, top_k=1, eval_capacity_factor=2.0), init_std=0.3)
    params = model_params(cfg)[1]
    # A repeated token routes to one expert in the first block: its capacity decides what is dropped
    # (2 of 5 tokens alone, 3 if the padded width of 12 set it).
    short, long = [31] * 5, [5, 9, 2, 7, 1, 3, 44, 8, 19, 22, 6, 41]
    alone = generate(params, cfg, np.array([short], np.int32), np.array([5]), max_new_tokens=8)
    batch = np.zeros((2, 12), np.int32)
    batch[0, :5], batch[1] = short, long
    together = generate(params, cfg, batch, np.array([5, 12]), max_new_tokens=8)
    np.testing.assert_array_equal(together.tokens[0], alone.tokens[0])
    np.testing.assert_allclose(together.logprobs[0], alone.logprobs[0], atol=MODEL_TOL)


def switch_router(fractions, sharpness):
    """Tokens x = e_i (one-hot) routed by W_g = sharpness * I: token groups go to experts by `fractions`."""
    e = len(fractions)
    cfg = with_moe(dataclasses.replace(LAYER, d_model=e), num_experts=e, top_k=1, switch_loss_weight=0.1)
    params = moe_params(cfg)
    params["router"] = sharpness * jnp.eye(e)
    ids = np.concatenate([np.full(round(f * 40), i) for i, f in enumerate(fractions)])
    return cfg, params, jnp.asarray(np.eye(e)[ids][None], jnp.float32)


def test_switch_loss_is_alpha_under_uniform_routing_and_grows_with_imbalance():
    losses = []
    for fractions in ([0.25] * 4, [0.4, 0.2, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1], [1.0, 0, 0, 0]):
        cfg, params, x = switch_router(fractions, sharpness=2.0)
        _, aux = moe_apply(cfg, params, x)
        loss = float(aux["losses"]["switch_loss"])
        probs = softmax(np.asarray(x[0], np.float64) @ np.asarray(params["router"], np.float64))
        f, p = np.asarray(fractions), probs.mean(0)
        assert loss == pytest.approx(0.1 * 4 * np.sum(f * p), rel=OP_TOL)
        np.testing.assert_allclose(aux["stats"]["expert_fraction"], f, atol=OP_TOL)
        losses.append(loss)
    assert losses[0] == pytest.approx(0.1, rel=OP_TOL)
    assert losses == sorted(losses) and losses[-1] > 1.5 * losses[0]


def test_bias_update_moves_load_toward_uniform():
    """A fixed batch that prefers expert 0: each step's bias makes the next step more balanced."""
    cfg = with_moe(LAYER, top_k=1, bias_update_rate=0.01, capacity_factor=4.0)
    params = {**moe_params(cfg), "router_bias": jnp.zeros(4)}
    x = inputs((2, 32, cfg.d_model), seed=3)
    x = x.at[..., 0].set(1.0)
    params["router"] = params["router"].at[0, 0].add(2.5)  # every token leans towards expert 0
    step = jax.jit(lambda p: moe_apply(cfg, p, x, train=True))
    _, aux = step(params)
    counts = np.asarray(aux["stats"]["expert_fraction"]) * 64
    np.testing.assert_allclose(aux["router_bias"], 0.01 * np.sign(counts.mean() - counts), atol=OP_TOL)
    first = float(aux["stats"]["max_violation"])
    for _ in range(60):
        params = {**params, "router_bias": aux["router_bias"]}
        _, aux = step(params)
    assert first > 1.0  # expert 0 starts with more than twice its share
    assert float(aux["stats"]["max_violation"]) < first / 3
    assert float(aux["stats"]["load_cv"]) < 0.5


@pytest.mark.parametrize("moe", [{"router": "noisy"}, {"jitter": 0.2}])
def test_noise_only_in_training_and_reproducible(moe):
    cfg = with_moe(LAYER, capacity_factor=2.0, **moe)
    params = moe_params(cfg)
    x = inputs((2, 16, cfg.d_model))
    clean, _ = moe_apply(cfg, params, x)  # eval: no RNG needed
    again, _ = moe_apply(cfg, params, x, rng=jax.random.key(7))  # eval ignores a key
    np.testing.assert_array_equal(clean, again)
    a, _ = moe_apply(cfg, params, x, train=True, rng=jax.random.key(7))
    b, _ = moe_apply(cfg, params, x, train=True, rng=jax.random.key(7))
    c, _ = moe_apply(cfg, params, x, train=True, rng=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, clean) and not np.allclose(a, c)


def test_gradients_reach_router_and_experts():
    cfg = with_moe(LAYER, router="noisy", bias_update_rate=1e-3, importance_loss_weight=0.1,
                   load_loss_weight=0.1, z_loss_weight=1e-3)
    params = {**moe_params(cfg), "router_bias": jnp.zeros(4)}
    x = inputs((2, 16, cfg.d_model))
    target = inputs((2, 16, cfg.d_model), seed=5)

    def loss(p):
        y, aux = MoE(cfg, train=True).apply({"params": p}, x, rngs={"router": jax.random.key(0)})
        return jnp.mean((y - target) ** 2) + sum(aux["losses"].values())

    grads = jax.jit(jax.grad(loss))(params)
    for name in ("router", "router_noise"):
        assert float(jnp.linalg.norm(grads[name])) > 0, name
    for name in ("w_up", "w_gate", "w_down"):
        per_expert = jnp.sqrt(jnp.sum(grads[name] ** 2, axis=(1, 2)))
        assert bool(jnp.all(per_expert > 0)), (name, per_expert)  # every expert got tokens
    assert float(jnp.abs(grads["router_bias"]).max()) == 0.0  # the bias is outside the gradient


@pytest.mark.parametrize("eval_capacity_factor", [1.0, 0.0])  # with drops; dropless
def test_expert_parallel_forward_equals_single_device(eval_capacity_factor):
    cfg = with_moe(TINY, num_experts=4, top_k=2, eval_capacity_factor=eval_capacity_factor)
    boxed, params = model_params(cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    single = forward(cfg, params, tokens)

    cpus = jax.devices("cpu")
    assert len(cpus) == 8, "conftest sets --xla_force_host_platform_device_count=8"
    mesh = make_mesh(MeshConfig(data=2, expert=4), cpus)
    sharded = jax.device_put(params, logical_shardings(boxed, mesh))
    assert sharded["block_0"]["moe"]["w_up"].sharding.spec == P("expert", None, None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])(
            sharded, jax.device_put(tokens, batch_sharding(mesh, tokens.shape)))
    np.testing.assert_allclose(out, single, rtol=MODEL_TOL, atol=MODEL_TOL)


@pytest.mark.parametrize("overrides,message", [
    (["model.moe.num_experts=4", "model.moe.top_k=5"],
     "model.moe.top_k=5: expected 1 <= top_k <= model.moe.num_experts=4"),
    (["model.moe.capacity_factor=-1"], "model.moe.capacity_factor=-1.0: expected > 0, or 0 for dropless"),
    (["model.moe.eval_capacity_factor=-0.5"], "model.moe.eval_capacity_factor=-0.5: expected > 0, or 0"),
    (["model.moe.router=hash"], "model.moe.router='hash': expected one of softmax, noisy, dense"),
    (["model.moe.priority=random"], "model.moe.priority='random': expected one of order, probability"),
    (["model.moe.load_loss_weight=0.1"], "model.moe.load_loss_weight=0.1: the smooth load estimator needs"),
])
def test_bad_moe_config_is_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_config("smoke"), overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_training_logs_stats_and_resume_keeps_the_router_bias(cache_dir, tmp_path, monkeypatch):
    """Stop at step 3, resume to 6: each saved bias is the sum of the sign updates of the loads logged so far."""
    monkeypatch.setattr(train_mod, "mfu_peak", lambda dtype: (1e11, "measured"))  # MFU is not under test
    u, experts = 0.05, 4
    cfg = apply_overrides(get_config("smoke"), [
        f"model.moe.num_experts={experts}", "model.moe.top_k=1", f"model.moe.bias_update_rate={u}",
        "model.num_layers=1", "steps=6", "checkpoint_every=3", "eval_every=6", "eval_batches=1", "sample_tokens=0",
        f"data.cache_dir={cache_dir}"])
    train(dataclasses.replace(cfg, stop_after=3), tmp_path, progress=False)
    train(cfg, tmp_path, resume=True, progress=False)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"moe/block_0/switch_loss", "moe/block_0/max_violation", "moe/block_0/dropped_fraction",
            "moe/block_0/router_entropy", "moe/block_0/load_cv"} <= set(records[-1])
    tokens = cfg.data.batch_size * cfg.data.seq_len
    expected = {0: np.zeros(experts, np.float32)}
    for r in records:
        fractions = r["moe/block_0/expert_fraction"]
        assert len(fractions) == experts and sum(fractions) == pytest.approx(1.0)
        counts = np.round(np.asarray(fractions) * tokens)
        step = np.float32(u) * np.sign(tokens / experts - counts).astype(np.float32)
        expected[r["step"]] = expected[r["step"] - 1] + step

    abstract = build_steps(cfg, make_mesh(cfg.mesh)).abstract_state
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [3, 6]
    for saved in (3, 6):
        bias = ckpt.restore(saved, abstract).params["block_0"]["moe"]["router_bias"]
        np.testing.assert_allclose(bias, expected[saved], atol=OP_TOL)
    ckpt.close()
    assert np.abs(expected[3]).max() > 0  # the resumed run had a nonzero bias to restore
