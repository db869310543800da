"""The CPU matmul kernel (`models/kernels/cpu/panel_matmul.py`): the packed layout against a naive loop, the
product (raw or packed weight, dense or per group) against NumPy at row counts, depths and widths that
leave partial tiles, row blocks and panels, and what happens where the CPU kernels cannot be built."""

import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.kernels.cpu import library as cpu_library
from models.kernels.cpu import panel_matmul
from models.kernels.cpu.panel_matmul import PANEL, pack, panel_matmul_reference


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert panel_matmul.available(), panel_matmul.unavailable_reason()


def test_pack_layout_matches_a_loop():
    w = np.arange(5 * 37, dtype=np.float32).reshape(5, 37)
    packed = np.asarray(pack(jnp.asarray(w)))
    assert packed.shape == (3, 5, PANEL)
    for s in range(3):
        for k in range(5):
            for c in range(PANEL):
                col = s * PANEL + c
                assert packed[s, k, c] == (w[k, col] if col < 37 else 0.0)


# (rows, k, n): 1-3 rows (partial tiles), 4, 5-9 (a tile and a remainder), the decode shapes' widths
# (256, 688), a head large enough to be shared with the thread pool (k * n >= 2^17), and row counts
# past the few-rows layout: blocks of 96 rows with a partial block and a partial tile.
@pytest.mark.parametrize("rows,k,n", [(1, 7, 5), (2, 33, 16), (3, 64, 40), (4, 256, 256), (5, 16, 17),
                                      (8, 256, 688), (9, 688, 256), (4, 64, 4100), (13, 3, 100),
                                      (25, 20, 33), (203, 130, 70), (100, 64, 2100)])
@pytest.mark.parametrize("packed", [True, False])
def test_matches_numpy(kernel, rows, k, n, packed):
    rng = np.random.default_rng(rows * 1000 + n)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    got = jax.jit(lambda x, w: panel_matmul.panel_matmul(x, pack(w) if packed else w, n))(x, w)
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    np.testing.assert_allclose(panel_matmul_reference(jnp.asarray(x), pack(jnp.asarray(w)), n), want,
                               rtol=1e-5, atol=1e-5 * np.sqrt(k))


# sizes: uneven groups with an empty one (many rows: blocks of rows per group), rows left after the last group
# (zero), and a few rows over many groups (the decode layout).
@pytest.mark.parametrize("sizes,rows,k,n", [((150, 0, 260, 7), 420, 48, 40), ((3, 4), 10, 20, 33),
                                            ((1, 0, 2, 1), 4, 256, 300)])
@pytest.mark.parametrize("packed", [True, False])
def test_grouped_matches_a_loop_over_groups(kernel, sizes, rows, k, n, packed):
    rng = np.random.default_rng(len(sizes) + rows)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    w = rng.normal(size=(len(sizes), k, n)).astype(np.float32)
    got = jax.jit(lambda x, w, s: panel_matmul.grouped_panel_matmul(x, pack(w) if packed else w, s, n))(
        x, w, jnp.asarray(sizes, jnp.int32))
    want = np.zeros((rows, n))
    start = 0
    for g, size in enumerate(sizes):
        want[start:start + size] = x[start:start + size].astype(np.float64) @ w[g].astype(np.float64)
        start += size
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_weight_too_large_to_keep_is_packed_per_call(kernel):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 16)).astype(np.float32)
    w = rng.normal(size=(16, (1 << 20) + 5)).astype(np.float32)  # > 2^24 floats packed: not kept
    got = jax.jit(lambda x, w: panel_matmul.panel_matmul(x, w, w.shape[1]))(x, w)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_grouped_rejects_sizes_past_the_rows(kernel):
    x, w = jnp.ones((4, 8)), jnp.ones((2, 8, 16))
    with pytest.raises(Exception, match="group sizes must be >= 0 and sum to <= M"):
        jax.block_until_ready(panel_matmul.grouped_panel_matmul(x, w, jnp.asarray([3, 2], jnp.int32), 16))


def test_same_numbers_every_call(kernel):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(4, 256)).astype(np.float32), rng.normal(size=(256, 4100)).astype(np.float32)
    f = jax.jit(lambda x, w: panel_matmul.panel_matmul(x, pack(w), 4100))
    np.testing.assert_array_equal(f(x, w), f(x, w))  # panels split across threads, never a sum
    x = rng.normal(size=(300, 256)).astype(np.float32)
    f = jax.jit(lambda x, w: panel_matmul.panel_matmul(x, w, 4100))  # row blocks, packed in the kernel
    np.testing.assert_array_equal(f(x, w), f(x, w))


def test_float32_only(kernel):
    with pytest.raises(TypeError, match="float32 only"):
        panel_matmul.panel_matmul(jnp.ones((1, 4), jnp.bfloat16), pack(jnp.ones((4, 4))), 4)


def test_unbuildable_kernel_reports_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="no-such-compiler"):
        ok, reason = cpu_library._build.__wrapped__()
    assert not ok and "no-such-compiler" in reason
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left in the cache


def test_unwritable_cache_falls_back_to_the_temp_folder(kernel, monkeypatch, tmp_path):
    blocked = tmp_path / "a-file"  # a cache folder under a file cannot be made, even by root
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    library = cpu_library._compiled_library()
    assert library.is_relative_to(tmp_path / "tmp") and library.stat().st_size > 0
