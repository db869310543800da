"""The split-K decode kernel against its reference and the model's cached attention.

On CPU the kernel runs in interpret mode; with a GPU the same cases also run compiled (Triton).
Each static setting compiles once; the length scenarios are array arguments that reuse it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import masked_attention
from models.kernels.decode_attention import DecodeBlockSizes, decode_attention, decode_attention_reference

# Tolerances, written down once (atol = rtol).
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

# S = 100 is no multiple of block_k, and 7 blocks over 3 splits leave the last split short.
BLOCKS = DecodeBlockSizes(block_k=16, num_splits=3)
S = 100

MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=pytest.mark.skipif(jax.default_backend() != "gpu",
                                                              reason="compiled kernels need a GPU"))]

# name: (dtype, N, K, sliding_window)
SETTINGS = {
    "fp32-mha": ("float32", 4, 4, 0),
    "fp32-gqa-window": ("float32", 8, 2, 21),
    "fp32-mqa": ("float32", 4, 1, 0),
    "bf16-gqa": ("bfloat16", 8, 2, 0),
}
# Per-row cache lengths (4 rows): full, ragged, a single token, empty (must give zeros, not NaN).
LENGTHS = {"ragged": [S, 37, 1, 0], "short": [16, 17, 5, 64]}


@pytest.fixture(autouse=True)
def full_precision_fp32_matmuls():
    """XLA may run fp32 matmuls in TF32 on GPU; the baselines compared against must not (no-op on CPU)."""
    with jax.default_matmul_precision("highest"):
        yield


def inputs(dtype: str, n: int, k: int, h: int = 8) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    shapes = [(4, n, h), (4, S, k, h), (4, S, k, h)]
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


@functools.partial(jax.jit, static_argnames=("window", "interpret"))
def kernel(q, k, v, lengths, positions, *, window, interpret):
    return decode_attention(q, k, v, lengths, positions, sliding_window=window, block_sizes=BLOCKS,
                            interpret=interpret)


class TestDecodeAttention:
    @pytest.mark.parametrize("interpret", MODES)
    @pytest.mark.parametrize("lengths", list(LENGTHS))
    @pytest.mark.parametrize("setting", list(SETTINGS))
    def test_matches_reference(self, setting, lengths, interpret):
        dtype, n, k, window = SETTINGS[setting]
        q, kk, v = inputs(dtype, n, k)
        kv_len = jnp.array(LENGTHS[lengths])
        out = kernel(q, kk, v, kv_len, kv_len - 1, window=window, interpret=interpret)
        ref = decode_attention_reference(q, kk, v, kv_len, sliding_window=window)
        assert out.dtype == q.dtype and np.isfinite(np.asarray(out, np.float32)).all()
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=TOL[dtype],
                                   rtol=TOL[dtype])
        if lengths == "ragged":
            np.testing.assert_array_equal(np.asarray(out[3], np.float32), 0.0)

    @pytest.mark.parametrize("interpret", MODES)
    def test_matches_models_cached_attention(self, interpret):
        """The model's cached path: slots are positions, the query is the newest token of each row."""
        dtype, n, k, window = SETTINGS["fp32-gqa-window"]
        q, kk, v = inputs(dtype, n, k)
        kv_len = jnp.array([S, 37, 1, 64])
        q_pos = kv_len - 1
        out = kernel(q, kk, v, kv_len, q_pos, window=window, interpret=interpret)
        slots = jnp.broadcast_to(jnp.arange(S), (4, S))
        expected = masked_attention(q[:, None], kk, v, q_pos[:, None], slots, kv_len, window)[:, 0]
        np.testing.assert_allclose(out, expected, atol=TOL[dtype], rtol=TOL[dtype])

    @pytest.mark.parametrize("interpret", MODES)
    def test_query_position_before_the_end_of_the_row(self, interpret):
        """An explicit query position hides the slots after it (causal within the cache)."""
        dtype, n, k, window = SETTINGS["fp32-gqa-window"]
        q, kk, v = inputs(dtype, n, k)
        kv_len, q_pos = jnp.array([S, 50, 30, 64]), jnp.array([60, 49, 3, 0])
        out = kernel(q, kk, v, kv_len, q_pos, window=window, interpret=interpret)
        ref = decode_attention_reference(q, kk, v, kv_len, q_pos, sliding_window=window)
        np.testing.assert_allclose(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_lowers_to_triton_for_gpu():
    """The kernel lowers through Pallas to Triton IR at a benchmark shape (no GPU needed)."""
    q = jax.ShapeDtypeStruct((8, 32, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((8, 4096, 8, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    fn = functools.partial(decode_attention, sliding_window=1024, interpret=False)
    hlo = jax.jit(fn).trace(q, cache, cache, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("field,value", [("block_k", 24), ("num_splits", 0), ("num_warps", 5)])
def test_bad_block_sizes_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"DecodeBlockSizes.{field}={value}"):
        DecodeBlockSizes(**{field: value})


def test_bad_shapes_raise_explicit_errors():
    q, cache = jnp.zeros((2, 4, 8)), jnp.zeros((2, 16, 2, 8))
    with pytest.raises(ValueError, match=r"kv_lengths and q_positions must be \[B=2\]"):
        decode_attention(q, cache, cache, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"expected q \[B, N, H\]"):
        decode_attention(q[:, None], cache, cache, jnp.zeros((2,), jnp.int32))
