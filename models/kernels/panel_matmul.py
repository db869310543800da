"""A few rows times a weight packed in 16-column panels: the CPU decode step's weight matmul.

    packed = pack(w)                      # w [K, N] -> [ceil(N / 16), K, 16], once, outside the loop
    y = panel_matmul(x, packed, n=N)      # x [M, K] -> [M, N], float32

XLA:CPU multiplies a handful of rows by a weight that comes from memory (the decode step's case) with a
general matmul that repacks the weight on every call, ~3x a one-row product for four rows. The kernel
(`panel_matmul.cc`, an XLA FFI handler) streams each contiguous panel once and keeps the rows'
accumulators in registers. It is compiled with the host's C++ compiler on first use and cached under
`$XDG_CACHE_HOME/llm_fundamentals` (default ~/.cache; the temp folder if that cannot be written),
keyed by the source, jax's version and the CPU;
`available()` is False, with the reason in `unavailable_reason()`, where that cannot be done, and
callers then keep XLA's matmul (a RuntimeWarning says so, once). `panel_matmul_reference` is the same
product in jnp, for the tests.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp

PANEL = 16
TARGET = "llmf_panel_matmul"
_SOURCE = pathlib.Path(__file__).with_suffix(".cc")


def pack(w: jax.Array) -> jax.Array:
    """w [K, N] -> [ceil(N / 16), K, 16]: panel s holds columns 16s..16s+15 row after row, zero-padded."""
    k, n = w.shape
    panels = -(-n // PANEL)
    w = jnp.pad(w, ((0, 0), (0, panels * PANEL - n)))
    return w.reshape(k, panels, PANEL).transpose(1, 0, 2)


def panel_matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """x [M, K] float32, packed [ceil(n / 16), K, 16] float32 (from `pack`) -> x @ w, [M, n] float32."""
    if x.dtype != jnp.float32 or packed.dtype != jnp.float32:
        raise TypeError(f"panel_matmul: float32 only, got x {x.dtype} and packed {packed.dtype}")
    if not available():
        raise RuntimeError(f"panel_matmul: the CPU kernel is unavailable: {unavailable_reason()}")
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, packed)


def panel_matmul_reference(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    return jnp.einsum("mk,skc->msc", x, packed).reshape(x.shape[0], -1)[:, :n]


def available() -> bool:
    """Whether the kernel is compiled and registered (on a CPU backend); builds it on the first call."""
    return _build()[0]


def unavailable_reason() -> str:
    return _build()[1]


@functools.lru_cache(maxsize=None)
def _build() -> tuple[bool, str]:
    if jax.default_backend() != "cpu":
        return False, f"the default backend is {jax.default_backend()}, not cpu"
    try:
        library = _compiled_library()
        handler = ctypes.cdll.LoadLibrary(str(library)).LlmfPanelMatmul
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or ""
        reason = f"{type(error).__name__}: {error} {detail.strip()[-300:]}".strip()
        # Once per process (cached): the fallback is correct but slower, so say so rather than stay silent.
        warnings.warn(f"panel_matmul: CPU decode kernel not built ({reason}); decoding uses XLA's matmul",
                      RuntimeWarning, stacklevel=2)
        return False, reason
    return True, ""


def _compiled_library() -> pathlib.Path:
    """The kernel's shared library, compiled into the cache if not there yet (written whole or not at all)."""
    compiler = os.environ.get("CXX", "c++")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256("\n".join([_SOURCE.read_text(), jax.__version__, compiler, *flags, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    for cache in _cache_dirs():
        library = cache / f"panel_matmul-{key}.so"
        if library.exists():
            return library
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(dir=cache))
        except OSError:
            continue  # not writable (a read-only home): try the next place
        try:
            subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(tmp / library.name)], check=True,
                           capture_output=True, text=True)
            os.replace(tmp / library.name, library)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return library
    raise OSError(f"no writable cache folder among {[str(c) for c in _cache_dirs()]}")


def _cache_dirs() -> list[pathlib.Path]:
    home = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    return [home / "llm_fundamentals", pathlib.Path(tempfile.gettempdir()) / f"llm_fundamentals-{os.getuid()}"]


def _cpu_flags() -> str:
    """The CPU's feature flags (`-march=native` compiles for them), so a shared cache is per CPU model."""
    if sys.platform.startswith("linux"):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor()
