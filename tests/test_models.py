"""Model math against plain references: causality, cache, GQA/MQA, RoPE, norms, positions."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, blocked_attention
from models.attention import attention_mask, masked_attention
from models.config import ConfigError, ModelConfig
from models.kv_cache import init_cache, kv_cache_bytes, with_lengths
from models.rope import apply_rope, rope_inverse_frequencies
from models.transformer import Transformer, init_params, unbox
from research.metrics import cross_entropy

# Tolerances, written down once: fp32 single ops and fp32 whole models.
OP_TOL = 1e-5
MODEL_TOL = 1e-4

TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                   max_seq_len=32)


def params_for(cfg: ModelConfig, seed: int = 0):
    return unbox(init_params(cfg, jax.random.key(seed)))


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens, cache=None):
    """Jitted: compiling once per config beats op-by-op dispatch even for tiny shapes."""
    return Transformer(cfg).apply({"params": params}, tokens, cache=cache)


def reference_attention(q, k, v, mask):
    """Naive per-head loop with K/V explicitly repeated per query head."""
    q, k, v, mask = map(np.asarray, (q, k, v, mask))
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for head in range(n):
            kh, vh = k[bi, :, head // g], v[bi, :, head // g]
            logits = q[bi, :, head] @ kh.T / np.sqrt(h)
            logits = np.where(mask[bi], logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[bi, :, head] = (p / p.sum(-1, keepdims=True)) @ vh
    return out


def random_qkv(seed, b, t, kv_heads, n=4, h=8):
    """q [b, t, n, h], k and v [b, t, kv_heads, h]: standard normal fp32."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, t, n, h)).astype(np.float32),
            *(rng.normal(size=(b, t, kv_heads, h)).astype(np.float32) for _ in range(2)))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("window", [0, 3])
def test_attention_matches_naive_reference(kv_heads, window):
    b, t = 2, 7
    q, k, v = random_qkv(0, b, t, kv_heads)
    pos = np.broadcast_to(np.arange(t), (b, t))
    mask = attention_mask(jnp.asarray(pos), jnp.asarray(pos), None, window)
    expected_mask = (pos[0][None, :] <= pos[0][:, None])
    if window:
        expected_mask &= pos[0][None, :] > pos[0][:, None] - window
    np.testing.assert_array_equal(np.asarray(mask[0]), expected_mask)
    out = masked_attention(q, k, v, jnp.asarray(pos), jnp.asarray(pos), None, window)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask),
                               atol=OP_TOL, rtol=OP_TOL)


@pytest.mark.parametrize("kv_heads,window", [(4, 0), (2, 0), (1, 0), (2, 5), (1, 11)])
def test_block_skipping_causal_attention_matches_reference(kv_heads, window, monkeypatch):
    """Blocks of 4 queries over 18 positions: full, partial and (with a window) left-skipped blocks;
    the recomputing backward pass against autodiff of the plain masked attention."""
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 4)
    b, t = 2, 18
    q, k, v = random_qkv(1, b, t, kv_heads)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(pos, pos, None, window)
    out = jax.jit(blocked_attention.causal_attention, static_argnums=3)(q, k, v, window)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=OP_TOL, rtol=OP_TOL)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    grads = jax.jit(jax.grad(loss(lambda q, k, v: blocked_attention.causal_attention(q, k, v, window)),
                             argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(lambda q, k, v: masked_attention(q, k, v, pos, pos, None, window)),
                                argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=OP_TOL, rtol=OP_TOL)


def test_default_positions_take_the_block_skipping_path_with_same_result(monkeypatch):
    """positions=None (arange, skips masked blocks) equals the same positions passed explicitly."""
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 4)
    cfg = dataclasses.replace(TINY, sliding_window=6)
    params = params_for(cfg)
    calls = []
    blocked = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *args: calls.append(1) or blocked(*args))
    tokens = jax.random.randint(jax.random.key(3), (2, 13), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(13), tokens.shape)
    model = Transformer(cfg)
    explicit = jax.jit(model.apply)({"params": params}, tokens, positions)[0]
    assert not calls  # explicit positions could be anything: the general masked path
    implicit = jax.jit(model.apply)({"params": params}, tokens)[0]
    assert len(calls) == cfg.num_layers
    np.testing.assert_allclose(implicit, explicit, atol=MODEL_TOL, rtol=MODEL_TOL)


@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal"])
def test_causality_zero_gradient_from_future(position):
    """The loss at position t has exactly zero gradient w.r.t. the input embeddings after t."""
    cfg = dataclasses.replace(TINY, position=position)
    params = params_for(cfg)
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, cfg.vocab_size)
    t = 4

    @jax.jit
    def input_gradients(x):
        """d loss_t / d x for the embedded inputs x: [1, T, D] (the embedding lookup is bypassed)."""
        def loss_t(x):
            logits, _, _ = Transformer(cfg).apply({"params": params}, tokens, input_embeddings=x)
            return cross_entropy(logits, tokens)[0, t]
        return jax.grad(loss_t)(x)

    x = params["embed"]["table"][tokens]
    grads = np.abs(np.asarray(input_gradients(x)[0])).sum(-1)
    assert np.all(grads[t + 1:] == 0.0)
    assert np.all(grads[:t + 1] > 0.0)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("window", [0, 4])
def test_cached_decode_equals_full_forward(kv_heads, window):
    cfg = dataclasses.replace(TINY, num_kv_heads=kv_heads, sliding_window=window)
    params = params_for(cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    full, _, _ = forward(cfg, params, tokens)

    cache = init_cache(cfg, batch=2, max_len=16)
    prefill, cache, _ = forward(cfg, params, tokens[:, :7], cache=cache)
    steps = [prefill]
    for i in range(7, 12):
        logits, cache, _ = forward(cfg, params, tokens[:, i:i + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=MODEL_TOL, rtol=MODEL_TOL)
    assert np.all(np.asarray(cache[0].lengths) == 12)


def test_ragged_prefill_then_decode_matches_each_row_alone():
    cfg = TINY
    params = params_for(cfg)
    a = jax.random.randint(jax.random.key(3), (9,), 0, cfg.vocab_size)
    b = jax.random.randint(jax.random.key(4), (5,), 0, cfg.vocab_size)
    padded = jnp.stack([a, jnp.concatenate([b, jnp.zeros(4, a.dtype)])])
    cache = init_cache(cfg, batch=2, max_len=16)
    _, cache, _ = forward(cfg, params, padded, cache=cache)
    cache = with_lengths(cache, jnp.array([9, 5]))
    nxt = jnp.array([[7], [11]])
    logits, _, _ = forward(cfg, params, nxt, cache=cache)
    alone_a, _, _ = forward(cfg, params, jnp.concatenate([a, nxt[0]])[None])
    alone_b, _, _ = forward(cfg, params, jnp.concatenate([b, nxt[1]])[None])
    np.testing.assert_allclose(logits[0, 0], alone_a[0, -1], atol=MODEL_TOL, rtol=MODEL_TOL)
    np.testing.assert_allclose(logits[1, 0], alone_b[0, -1], atol=MODEL_TOL, rtol=MODEL_TOL)


def _repeat_kv(params, group):
    """MHA weights equivalent to GQA weights: each kv head's projection repeated for its query group."""
    def fix(tree):
        out = {}
        for name, sub in tree.items():
            if isinstance(sub, dict):
                out[name] = fix(sub)
            elif name in ("wk", "wv"):
                out[name] = jnp.repeat(sub, group, axis=1)
            else:
                out[name] = sub
        return out
    return fix(params)


@pytest.mark.parametrize("kv_heads", [2, 1])  # GQA and MQA
def test_grouped_kv_equals_mha_with_repeated_weights(kv_heads):
    gqa = dataclasses.replace(TINY, num_kv_heads=kv_heads)
    mha = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
    params = params_for(gqa)
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, TINY.vocab_size)
    out_gqa, _, _ = forward(gqa, params, tokens)
    out_mha, _, _ = forward(mha, _repeat_kv(params, TINY.num_heads // kv_heads), tokens)
    np.testing.assert_allclose(out_gqa, out_mha, atol=MODEL_TOL, rtol=MODEL_TOL)


def test_mqa_equals_gqa_with_one_kv_head():
    """MQA is K = 1; its weights, repeated to K = 2, give a GQA model with identical outputs."""
    mqa = dataclasses.replace(TINY, num_kv_heads=1)
    gqa = dataclasses.replace(TINY, num_kv_heads=2)
    params = params_for(mqa)
    tokens = jax.random.randint(jax.random.key(6), (1, 9), 0, TINY.vocab_size)
    out_mqa, _, _ = forward(mqa, params, tokens)
    out_gqa, _, _ = forward(gqa, _repeat_kv(params, 2), tokens)
    np.testing.assert_allclose(out_mqa, out_gqa, atol=MODEL_TOL, rtol=MODEL_TOL)


@pytest.mark.parametrize("scaling,factor", [("none", 1.0), ("linear", 4.0), ("ntk", 4.0)])
def test_rope_dot_product_depends_only_on_offset(scaling, factor):
    rng = np.random.default_rng(0)
    h = 16
    inv_freq = rope_inverse_frequencies(h, 10_000.0, scaling, factor)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, h)), jnp.float32)

    def score(m, n):
        qr = apply_rope(q, jnp.array([[m]]), inv_freq)
        kr = apply_rope(k, jnp.array([[n]]), inv_freq)
        return float(jnp.sum(qr * kr))

    base = score(5, 2)
    for shift in (1, 17, 300):
        assert abs(score(5 + shift, 2 + shift) - base) < 1e-3 * max(1.0, abs(base))
    assert abs(score(0, 0) - float(jnp.sum(q * k))) < OP_TOL  # position 0 is the identity


def test_rope_scaling_formulas():
    h, theta = 8, 10_000.0
    plain = np.asarray(rope_inverse_frequencies(h, theta))
    np.testing.assert_allclose(plain, 1.0 / theta ** (np.arange(0, h, 2) / h), rtol=OP_TOL)
    np.testing.assert_allclose(rope_inverse_frequencies(h, theta, "linear", 4.0), plain / 4, rtol=OP_TOL)
    ntk = np.asarray(rope_inverse_frequencies(h, theta, "ntk", 4.0))
    assert ntk[0] == pytest.approx(1.0)  # the fastest pair is untouched
    assert ntk[-1] == pytest.approx(plain[-1] / 4, rel=1e-4)  # the slowest slows by the factor


def test_norms_match_numpy():
    from models.norms import LayerNorm, RMSNorm
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    y = RMSNorm(1e-6).apply({"params": {"scale": jnp.full((8,), 2.0)}}, x)
    np.testing.assert_allclose(y, 2 * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6), atol=OP_TOL)
    y = LayerNorm(1e-6).apply({"params": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}, x)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, atol=OP_TOL)


def test_linear_matches_numpy_with_gradients():
    from models.linear import linear
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # [B, T, N, H]
    w = rng.normal(size=(4, 5, 6)).astype(np.float32)  # [N, H, D]
    np.testing.assert_allclose(linear(x, w, fan_in_dims=2), np.einsum("btnh,nhd->btd", x, w), atol=OP_TOL)
    np.testing.assert_allclose(linear(x, w[0]), np.einsum("btnh,hd->btnd", x, w[0]), atol=OP_TOL)
    g = rng.normal(size=(2, 3, 6)).astype(np.float32)  # d loss / d y for loss = sum(g * y)
    dx, dw = jax.grad(lambda x, w: jnp.sum(g * linear(x, w, fan_in_dims=2)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dx, np.einsum("btd,nhd->btnh", g, w), atol=OP_TOL)
    np.testing.assert_allclose(dw, np.einsum("btnh,btd->nhd", x, g), atol=OP_TOL)


@pytest.mark.parametrize("overrides", [
    {}, {"norm": "layernorm", "mlp": "gelu"}, {"position": "learned"}, {"position": "sinusoidal"},
    {"tie_embeddings": False}, {"qkv_bias": True}, {"remat_policy": "full"}, {"scan_layers": True}, {"head_dim": 16},
])
def test_param_count_matches_initialised_params(overrides):
    cfg = dataclasses.replace(TINY, **overrides)
    params = params_for(cfg)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.param_count()
    logits, _, _ = forward(cfg, params, jnp.zeros((1, 5), jnp.int32))
    assert logits.shape == (1, 5, cfg.vocab_size) and logits.dtype == jnp.float32


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    params = params_for(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, _, _ = forward(cfg, params, jnp.zeros((1, 5), jnp.int32))
    ref, _, _ = forward(TINY, params, jnp.zeros((1, 5), jnp.int32))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=5e-2)


def test_kv_cache_bytes():
    cfg = ModelConfig(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, dtype="bfloat16")
    # LLaMA-7B in 16-bit, 2048 tokens: 1 GiB per sequence.
    assert kv_cache_bytes(cfg, batch=1, seq_len=2048) == 2 ** 30
    cache = init_cache(TINY, batch=3, max_len=10)
    actual = sum(c.k.nbytes + c.v.nbytes for c in cache)
    assert kv_cache_bytes(TINY, batch=3, seq_len=10) == actual


@pytest.mark.parametrize("field,value,message", [
    ("num_kv_heads", 3, "model.num_heads=4: must be divisible by model.num_kv_heads=3"),
    ("d_model", 30, "model.d_model=30: must be divisible by model.num_heads=4"),
    ("norm", "batchnorm", "model.norm='batchnorm': expected one of rmsnorm, layernorm"),
    ("attention_impl", "flash", "model.attention_impl='flash': expected one of"),
    ("vocab_size", 0, "model.vocab_size=0: expected a positive integer"),
    ("rope_scaling_factor", 0.5, "model.rope_scaling_factor=0.5"),
])
def test_bad_model_config_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        dataclasses.replace(TINY, **{field: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("impl", ["xla", "blocked", "cpu_fused"])
@pytest.mark.parametrize("window", [0, 5])
def test_attention_impls_match_the_masked_reference_in_the_model(impl, window):
    """Each algorithm `attention_impl` names gives the plain masked attention's logits: with default
    positions (the static causal mask), with explicit shifted positions, and decoding over a cache."""
    ref_cfg = dataclasses.replace(TINY, sliding_window=window)
    cfg = dataclasses.replace(ref_cfg, attention_impl=impl)
    params = params_for(ref_cfg)
    tokens = jax.random.randint(jax.random.key(5), (2, 11), 0, TINY.vocab_size)
    shifted = jnp.broadcast_to(jnp.arange(11) + 3, tokens.shape)

    def reference(tokens, positions):
        # The whole model with masked_attention: the explicit-positions path of `blocked`.
        return Transformer(dataclasses.replace(ref_cfg, attention_impl="blocked")).apply(
            {"params": params}, tokens, positions)[0]

    arange = jnp.broadcast_to(jnp.arange(11), tokens.shape)
    np.testing.assert_allclose(Transformer(cfg).apply({"params": params}, tokens)[0], reference(tokens, arange),
                               atol=MODEL_TOL)
    np.testing.assert_allclose(Transformer(cfg).apply({"params": params}, tokens, shifted)[0],
                               reference(tokens, shifted), atol=MODEL_TOL)
    cache = init_cache(cfg, 2, 16)
    _, cache, _ = Transformer(cfg).apply({"params": params}, tokens[:, :7], cache=cache)
    step, _, _ = Transformer(cfg).apply({"params": params}, tokens[:, 7:8], cache=cache)
    np.testing.assert_allclose(step[:, 0], reference(tokens[:, :8], arange[:, :8])[:, 7], atol=MODEL_TOL)


def test_auto_implementations_resolve_per_backend():
    assert (TINY.resolved("cpu").attention_impl, TINY.resolved("cpu").matmul_impl) == ("blocked", "xla")
    for backend in ("gpu", "tpu"):
        assert (TINY.resolved(backend).attention_impl, TINY.resolved(backend).matmul_impl) == ("xla", "xla")
    explicit = dataclasses.replace(TINY, attention_impl="pallas", matmul_impl="cpu_panel")
    assert explicit.resolved("gpu") == explicit


@pytest.mark.parametrize("field", ["attention_impl", "matmul_impl"])
def test_renamed_implementation_values_name_the_new_ones(field):
    with pytest.raises(ConfigError, match=f"model.{field}='cpu': expected one of .* "
                                          r"\('cpu' was renamed: cpu_fused or cpu_panel\)") as err:
        dataclasses.replace(TINY, **{field: "cpu"})
    assert "\n" not in str(err.value)


def test_renamed_moe_field_names_the_new_one():
    from research.config import TrainConfig, from_dict, override, to_dict
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match=r"'model.moe.every' was renamed to 'model.moe.every_n_layers'"):
        override(cfg, "model.moe.every", "2")
    old = to_dict(cfg)
    old["model"]["moe"]["every"] = old["model"]["moe"].pop("every_n_layers")  # a run.json from before
    with pytest.raises(ConfigError, match=r"unknown config key 'every' for MoEConfig \(renamed to 'every_n_layers'\)"):
        from_dict(TrainConfig, old)
