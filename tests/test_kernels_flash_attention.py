"""The flash attention kernel against its pure-jnp reference: forward and gradients, every mask feature.

On CPU the kernel runs in interpret mode; with a GPU the same cases also run compiled (Triton).
Interpret mode compiles slowly, so each static setting (dtype, head grouping, causal/window, shapes)
is compiled once and then fed every dynamic mask scenario (ragged lengths, packed segments, fully
masked rows): those are array arguments and reuse the compiled function.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.kernels.mask import MaskSpec, mask_inputs
from models.kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference

# Tolerances, written down once (atol = rtol), for the forward output and the gradients alike.
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

# Forward and backward tiles differ, and no length below is a multiple of either: every ragged tail
# and both paddings are exercised, with several blocks per sequence.
BLOCKS = BlockSizes(block_q=16, block_k=32, block_q_bwd=32, block_k_bwd=16)

MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=pytest.mark.skipif(jax.default_backend() != "gpu",
                                                              reason="compiled kernels need a GPU"))]

# name: (dtype, N, K, T, S, causal, sliding_window, q_offset); q_offset shifts query positions by
# that much (S - T: bottom-right aligned causal, as when new tokens follow a cache).
SETTINGS = {
    "fp32-gqa-causal": ("float32", 4, 2, 45, 45, True, 0, 0),
    "fp32-mha-full-tq<tk": ("float32", 2, 2, 37, 51, False, 0, 0),
    "fp32-mqa-window-tq<tk": ("float32", 4, 1, 29, 60, True, 7, 31),
    "fp32-gqa-causal-tq>tk": ("float32", 4, 2, 50, 35, True, 0, 0),
    "bf16-gqa-causal": ("bfloat16", 4, 2, 45, 45, True, 0, 0),
    "bf16-mqa-window-tq<tk": ("bfloat16", 4, 1, 29, 60, True, 7, 31),
}
SCENARIOS = ["plain", "ragged", "packed", "fully-masked"]


@pytest.fixture(autouse=True)
def full_precision_fp32_matmuls():
    """XLA may run fp32 matmuls in TF32 on GPU; the baselines compared against must not (no-op on CPU)."""
    with jax.default_matmul_precision("highest"):
        yield


def mask_arrays(scenario: str, t: int, s: int, q_offset: int) -> dict[str, np.ndarray]:
    """Batch of 2 rows. Always the same pytree, so one compiled function serves every scenario."""
    q_pos = np.tile(np.arange(t) + q_offset, (2, 1))
    kv_pos = np.tile(np.arange(s), (2, 1))
    kv_len = np.array([s, s])
    q_seg, kv_seg = np.zeros((2, t), np.int32), np.zeros((2, s), np.int32)
    if scenario == "ragged":
        kv_len = np.array([s, s // 2 + 3])
    elif scenario == "packed":  # row 1 packs three documents; positions restart in each
        q_cut, kv_cut = [0, t // 3, t // 2, t], [0, s // 3, s // 2, s]
        for i in range(3):
            q_seg[1, q_cut[i]:q_cut[i + 1]] = kv_seg[1, kv_cut[i]:kv_cut[i + 1]] = i
            q_pos[1, q_cut[i]:q_cut[i + 1]] = np.arange(q_cut[i + 1] - q_cut[i]) + q_offset
            kv_pos[1, kv_cut[i]:kv_cut[i + 1]] = np.arange(kv_cut[i + 1] - kv_cut[i])
    elif scenario == "fully-masked":  # row 1 has no keys; some row-0 queries belong to no kv segment
        kv_len = np.array([s, 0])
        q_seg[0, t // 3: t // 3 + 7] = 9
    return {"q_positions": q_pos, "kv_positions": kv_pos, "kv_lengths": kv_len,
            "q_segment_ids": q_seg, "kv_segment_ids": kv_seg}


def inputs(dtype: str, n: int, k: int, t: int, s: int, h: int = 8) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    shapes = [(2, t, n, h), (2, s, k, h), (2, s, k, h), (2, t, n, h)]  # q, k, v, output cotangent
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


@functools.partial(jax.jit, static_argnames=("causal", "window", "interpret"))
def kernel_out_and_grads(q, k, v, ct, mask, *, causal, window, interpret):
    def f(q, k, v):
        return flash_attention(q, k, v, **mask, causal=causal, sliding_window=window, block_sizes=BLOCKS,
                               interpret=interpret)

    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)


@functools.partial(jax.jit, static_argnames=("causal", "window"))
def reference_out_and_grads(q, k, v, ct, mask, *, causal, window):
    out, vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, **mask, causal=causal,
                                                                 sliding_window=window), q, k, v)
    return out, vjp(ct)


def assert_close(actual: jax.Array, expected: jax.Array, dtype: str, what: str) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=TOL[dtype], rtol=TOL[dtype], err_msg=what)


class TestFlashAttention:
    @pytest.mark.parametrize("interpret", MODES)
    @pytest.mark.parametrize("scenario", SCENARIOS)
    @pytest.mark.parametrize("setting", list(SETTINGS))
    def test_forward_and_gradients_match_reference(self, setting, scenario, interpret):
        dtype, n, k, t, s, causal, window, q_offset = SETTINGS[setting]
        q, kk, v, ct = inputs(dtype, n, k, t, s)
        mask = mask_arrays(scenario, t, s, q_offset)
        out, grads = kernel_out_and_grads(q, kk, v, ct, mask, causal=causal, window=window, interpret=interpret)
        ref_out, ref_grads = reference_out_and_grads(q, kk, v, ct, mask, causal=causal, window=window)
        assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
        assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in (out, *grads))
        assert_close(out, ref_out, dtype, "output")
        for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_close(grad, ref, dtype, name)
        if scenario == "fully-masked":  # zeros, not NaN, for queries that see no key, and no gradient
            np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
            np.testing.assert_array_equal(np.asarray(grads[0][1], np.float32), 0.0)

    @pytest.mark.parametrize("interpret", MODES)
    def test_defaults_are_arange_positions_one_segment_full_lengths(self, interpret):
        q, k, v, _ = inputs("float32", 4, 2, 21, 21)
        out = flash_attention(q, k, v, block_sizes=BLOCKS, interpret=interpret)
        assert_close(out, flash_attention_reference(q, k, v), "float32", "output")
        causal = jnp.tril(jnp.ones((21, 21), bool))
        expected = jax.nn.dot_product_attention(q, k, v, mask=causal[None, None])
        assert_close(out, expected, "float32", "vs jax.nn.dot_product_attention")


def test_causal_and_window_ranges_skip_fully_masked_blocks():
    """Block ranges from the mask description: each query block visits only the kv blocks it can see."""
    t = s = 64
    pos = jnp.broadcast_to(jnp.arange(t), (1, t))
    seg, length = jnp.zeros((1, t), jnp.int32), jnp.array([s])
    causal = mask_inputs(MaskSpec(True, 0, t), pos, pos, length, seg, seg, t, s, 16, 16)
    np.testing.assert_array_equal(causal.kv_lo[0], [0, 0, 0, 0])
    np.testing.assert_array_equal(causal.kv_hi[0], [1, 2, 3, 4])  # the upper triangle is never loaded
    np.testing.assert_array_equal(causal.q_lo[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(causal.q_hi[0], [4, 4, 4, 4])
    window = mask_inputs(MaskSpec(True, 16, t), pos, pos, length, seg, seg, t, s, 16, 16)
    np.testing.assert_array_equal(window.kv_lo[0], [0, 0, 1, 2])  # and neither are blocks behind the window
    ragged = mask_inputs(MaskSpec(False, 0, t), pos, pos, jnp.array([20]), seg, seg, t, s, 16, 16)
    np.testing.assert_array_equal(ragged.kv_hi[0], [2, 2, 2, 2])  # nor blocks past a row's length
    empty = mask_inputs(MaskSpec(False, 0, t), pos, pos, jnp.array([0]), seg, seg, t, s, 16, 16)
    np.testing.assert_array_equal(empty.kv_hi[0] - empty.kv_lo[0], [0, 0, 0, 0])


def test_lowers_to_triton_for_gpu():
    """Forward and both backward kernels lower through Pallas to Triton IR at benchmark shapes (no GPU needed)."""
    q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)

    def loss(q, k, v):
        return flash_attention(q, k, v, sliding_window=256, interpret=False).astype(jnp.float32).sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("field,value", [("block_q", 48), ("block_k", 8), ("block_q_bwd", 0), ("num_warps", 3),
                                         ("num_stages", 0)])
def test_bad_block_sizes_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"BlockSizes.{field}={value}"):
        BlockSizes(**{field: value})


@pytest.mark.parametrize("kwargs,message", [
    (dict(k_heads=4), "multiple of kv heads K=4"),
    (dict(q_positions=jnp.zeros((2, 5), jnp.int32)), r"q_positions has shape \(2, 5\)"),
    (dict(q_segment_ids=jnp.zeros((2, 9), jnp.int32)), "both q_segment_ids and kv_segment_ids"),
    (dict(sliding_window=4, causal=False), "sliding_window=4"),
])
def test_bad_arguments_raise_explicit_errors(kwargs, message):
    k_heads = kwargs.pop("k_heads", 2)
    q, k, v = jnp.zeros((2, 9, 6, 8)), jnp.zeros((2, 9, k_heads, 8)), jnp.zeros((2, 9, k_heads, 8))
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **kwargs)
