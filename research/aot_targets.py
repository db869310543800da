"""Named compile targets (`v5e:2x2`, `v5p:2x2x1`, `h100x8`, ...) and the compile-only devices that stand in
for them on a host without the hardware (research/aot.py compiles for these).

TPU: libtpu describes any slice (`jax.experimental.topologies.get_topology_desc(platform="tpu")`).
GPU: the CUDA plugin compiles "devicelessly" for a topology built from a GPU target config, a
`stream_executor.GpuTargetConfigProto` in text form that we write from the chip's published figures
(`_GPU_FACTS`). Both need the optional `aot` extra (pyproject.toml); without it a target is refused in one
line. Parsing needs no jax, so bad targets are refused before jax starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import tempfile
from typing import Any, Iterator

from research.devices import Accelerator, by_name

KiB, MiB = 2**10, 2**20


@dataclasses.dataclass(frozen=True)
class TpuFamily:
    accelerator: str
    rank: int  # 2-D torus (v5e, v6e) or 3-D (v4, v5p)
    chip_config: str  # "megacore": the chip's two TensorCores are one jax device, as jax runs v4 and v5p
    cloud_type: str  # the Cloud accelerator type for n chips (v4 and v5p count TensorCores)


TPU_FAMILIES = {
    "v4": TpuFamily("tpu-v4", 3, "megacore", "v4-{cores}"),
    "v5p": TpuFamily("tpu-v5p", 3, "megacore", "v5p-{cores}"),
    "v5e": TpuFamily("tpu-v5e", 2, "default", "v5litepod-{chips}"),
    "v6e": TpuFamily("tpu-v6e", 2, "default", "v6e-{chips}"),
}
GPU_FAMILIES = {"h100": "h100-sxm", "h200": "h200", "a100": "a100-80gb"}
GPUS_PER_HOST = 8
TARGET_FORMS = "v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB (TPU chips), or h100xN, h200xN, a100xN (GPUs)"


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str  # as written on the command line
    family: str  # key of TPU_FAMILIES or GPU_FAMILIES
    accelerator: Accelerator
    dims: tuple[int, ...]  # TPU: chips along each torus axis; GPU: (hosts, GPUs per host)

    @property
    def platform(self) -> str:
        return self.accelerator.platform

    @property
    def num_devices(self) -> int:
        return math.prod(self.dims)


def parse_target(spec: str) -> Target:
    """'v5e:2x2' -> Target; a malformed or unknown target is a one-line ValueError naming the forms allowed."""
    text = spec.strip().lower()
    tpu = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)", text)
    gpu = re.fullmatch(r"([a-z]\d+)x(\d+)", text)
    if tpu and tpu.group(1) in TPU_FAMILIES:
        family = TPU_FAMILIES[tpu.group(1)]
        dims = tuple(int(d) for d in tpu.group(2).split("x"))
        if len(dims) != family.rank or min(dims) < 1:
            raise ValueError(f"target={spec!r}: {tpu.group(1)} slices have {family.rank} positive dimensions, "
                             f"e.g. {tpu.group(1)}:{'x'.join(['2'] * family.rank)}")
        return Target(spec, tpu.group(1), by_name(family.accelerator), dims)
    if gpu and gpu.group(1) in GPU_FAMILIES:
        n = int(gpu.group(2))
        if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
            raise ValueError(f"target={spec!r}: expected 1 to {GPUS_PER_HOST} GPUs on one host, or whole hosts "
                             f"of {GPUS_PER_HOST} (16, 24, ...)")
        hosts = max(1, n // GPUS_PER_HOST)
        return Target(spec, gpu.group(1), by_name(GPU_FAMILIES[gpu.group(1)]), (hosts, n // hosts))
    raise ValueError(f"target={spec!r}: expected one of {TARGET_FORMS}")


def toolchain_missing(platform: str) -> str | None:
    """Why this host cannot compile for `platform` ("tpu" / "gpu"), or None when it can."""
    module, what = {"tpu": ("libtpu", "libtpu"), "gpu": ("jax_plugins.xla_cuda12", "jax-cuda12-plugin")}[platform]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return None
    return f"compiling for {platform.upper()} targets needs {what}: pip install -e '.[aot]'"


def prepare_environment(target: Target) -> None:
    """Before jax starts: compile on this host's CPU client, and tell libtpu which slice it stands in for
    (without these it looks for TPU metadata it cannot find and logs a page of warnings). XLA's native
    logs are off unless TF_CPP_MIN_LOG_LEVEL says otherwise: what matters comes back as a Python error,
    and the GPU scheduler logs errors for programs over its memory limit that are our verdict to give."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if target.platform == "tpu":
        family = TPU_FAMILIES[target.family]
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # one name: research/mesh.py sees no cluster
        os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                              family.cloud_type.format(chips=target.num_devices, cores=2 * target.num_devices))


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Drops what native code writes to stderr meanwhile: the CUDA plugin announces on import and on every
    backend start that this host has no GPU driver, which is expected here. Python errors still propagate."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# Per-chip figures the GPU compiler reads (CUDA C++ Programming Guide, compute capability tables; NVIDIA
# datasheets for SMs, clocks, L2 and memory bandwidth). Missing ones make XLA divide by zero.
_GPU_COMMON = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * KiB,
                   threads_per_core_limit=2048, registers_per_core_limit=65536, registers_per_block_limit=65536,
                   block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535)
_GPU_FACTS = {
    "h100-sxm": dict(cc=(9, 0), core_count=132, fpus_per_core=128, clock_rate_ghz=1.98, memory_bandwidth=3.35e12,
                     l2_cache_size=50 * MiB, shared_memory_per_core=228 * KiB,
                     shared_memory_per_block_optin=227 * KiB),
    "h200": dict(cc=(9, 0), core_count=132, fpus_per_core=128, clock_rate_ghz=1.98, memory_bandwidth=4.8e12,
                 l2_cache_size=50 * MiB, shared_memory_per_core=228 * KiB, shared_memory_per_block_optin=227 * KiB),
    "a100-80gb": dict(cc=(8, 0), core_count=108, fpus_per_core=64, clock_rate_ghz=1.41, memory_bandwidth=2.039e12,
                      l2_cache_size=40 * MiB, shared_memory_per_core=164 * KiB,
                      shared_memory_per_block_optin=163 * KiB),
}


def gpu_target_config(acc: Accelerator) -> str:
    """The GpuTargetConfigProto (text format) of one GPU; its name is the device_kind jax will report."""
    facts = dict(_GPU_FACTS[acc.name])
    major, minor = facts.pop("cc")
    fields = {**_GPU_COMMON, **facts, "device_memory_size": acc.hbm_bytes}
    body = " ".join(f"{k}: {int(v) if k != 'clock_rate_ghz' else v}" for k, v in fields.items())
    name = acc.device_kinds[0]
    return (f"gpu_device_info {{ {body} cuda_compute_capability {{ major: {major} minor: {minor} }} "
            f'name: "{name}" }} platform_name: "CUDA" device_description_str: "{name}"')


def topology_devices(target: Target) -> list[Any]:
    """Compile-only devices of the target (jax must be importable; call prepare_environment first)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        family = TPU_FAMILIES[target.family]
        dims = target.dims + (1,) * (3 - len(target.dims))
        return topologies.get_topology_desc(
            topology_name=f"{target.family}:{'x'.join(map(str, target.dims))}", platform="tpu",
            chip_config_name=family.chip_config, num_slices=1,
            chips_per_host_bounds=tuple(min(d, b) for d, b in zip(dims, (2, 2, 1))),  # 4 chips per TPU VM
            wrap=(family.rank == 3 and min(dims) >= 4,) * 3).devices  # whole 4x4x4 cubes close their torus
    hosts, per_host = target.dims
    return topologies.get_topology_desc(
        topology_name=target.spec, platform="cuda", target_config=gpu_target_config(target.accelerator),
        topology=f"1x{hosts}x{per_host}").devices  # slices x hosts x GPUs per host
