"""Test setup: 8 fake CPU devices (for the sharding tests) and a shared cache for tokenizers/corpora."""

import os

# Must happen before jax is imported anywhere. Test shapes are tiny, so compile time dominates:
# LLVM at -O0 compiles about 3x faster here and the run time of tiny programs does not matter.
_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One cache per test session, so the embedded corpus and tokenizers are built once."""
    return str(tmp_path_factory.mktemp("cache"))
