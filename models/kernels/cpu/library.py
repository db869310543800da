"""The CPU kernels' shared library: compiled with the host's C++ compiler on first use, registered with XLA.

The FFI handlers in `panel_matmul.cc` and `attention.cc` (with `tile.h`) are built into one library,
cached under `$XDG_CACHE_HOME/llm_fundamentals` (default ~/.cache; the temp folder if that cannot be
written), keyed by the sources, jax's version, the compiler and the CPU, and written whole or not at all.
Where that cannot be done (no compiler, not a CPU backend), `available()` is False with the reason in
`unavailable_reason()`; callers then keep XLA's ops, and a RuntimeWarning says so, once.
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

_DIR = pathlib.Path(__file__).parent
_SOURCES = (_DIR / "panel_matmul.cc", _DIR / "attention.cc")
_HEADERS = (_DIR / "tile.h", _DIR / "share.h")
# FFI target name -> the handler symbol the library exports.
TARGETS = {
    "llmf_panel_matmul": "LlmfPanelMatmul",
    "llmf_grouped_panel_matmul": "LlmfGroupedPanelMatmul",
    "llmf_causal_attention": "LlmfCausalAttention",
}


def available() -> bool:
    """Whether the kernels are compiled and registered (on a CPU backend); builds them on the first call."""
    return _build()[0]


def unavailable_reason() -> str:
    return _build()[1]


@functools.lru_cache(maxsize=None)
def _build() -> tuple[bool, str]:
    if jax.default_backend() != "cpu":
        return False, f"the default backend is {jax.default_backend()}, not cpu"
    try:
        library = _compiled_library()
        loaded = ctypes.cdll.LoadLibrary(str(library))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or ""
        reason = f"{type(error).__name__}: {error} {detail.strip()[-300:]}".strip()
        # Once per process (cached): the fallback is correct but slower, so say so rather than stay silent.
        warnings.warn(f"CPU kernels not built ({reason}); XLA's ops run instead (slower)",
                      RuntimeWarning, stacklevel=2)
        return False, reason
    return True, ""


def _compiled_library() -> pathlib.Path:
    """The kernels' shared library, compiled into the cache if not there yet (written whole or not at all)."""
    compiler = os.environ.get("CXX", "c++")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
    sources = [path.read_text() for path in _SOURCES + _HEADERS]
    key = hashlib.sha256("\n".join([*sources, jax.__version__, compiler, *flags, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    for cache in _cache_dirs():
        library = cache / f"cpu_kernels-{key}.so"
        if library.exists():
            return library
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(dir=cache))
        except OSError:
            continue  # not writable (a read-only home): try the next place
        try:
            subprocess.run([compiler, *flags, *map(str, _SOURCES), "-o", str(tmp / library.name)], check=True,
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
