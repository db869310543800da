"""Accelerators we plan for: vendor peak FLOP/s per dtype and memory per device, keyed by jax's device_kind.

MFU is measured against the chip's published dense peak (`research/flops.py: mfu_peak`); ahead-of-time
compilation (`research/aot.py`) checks a program's memory against the chip's HBM. Pure data: no jax here,
so the command lines can read it before jax starts.

Figures are per chip (one jax device: TPU v4/v5p run both TensorCores as one "megacore" device), dense
(NVIDIA's headline numbers assume 2:4 sparsity; these are half of them). Vendors' "GB" of HBM are binary
(5 stacks of 16 GiB make an H100's "80GB"), so memory is stored in GiB.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30
T = 1e12


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    platform: str  # "gpu" | "tpu": the jax platform that compiles for it
    device_kinds: tuple[str, ...]  # jax.Device.device_kind strings that mean this chip
    peak: dict[str, float]  # dtype -> dense FLOP/s per device; an unpublished dtype is absent
    hbm_bytes: int


ACCELERATORS: tuple[Accelerator, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5: BF16/FP16 1,979 and TF32 989 TFLOP/s with sparsity.
    # float32 is TF32: JAX's default matmul precision runs f32 dots on the tensor cores (Ampere and later).
    Accelerator("h100-sxm", "gpu", ("NVIDIA H100 80GB HBM3",),
                {"bfloat16": 989.4 * T, "float16": 989.4 * T, "float32": 494.7 * T}, 80 * GiB),
    # NVIDIA H200 datasheet, SXM: the H100's compute (same figures) with 141 GB of HBM3e at 4.8 TB/s.
    Accelerator("h200", "gpu", ("NVIDIA H200",),
                {"bfloat16": 989.4 * T, "float16": 989.4 * T, "float32": 494.7 * T}, 141 * GiB),
    # NVIDIA A100 datasheet, 80GB SXM and PCIe: BF16/FP16 312, TF32 156 TFLOP/s dense.
    Accelerator("a100-80gb", "gpu", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
                {"bfloat16": 312 * T, "float16": 312 * T, "float32": 156 * T}, 80 * GiB),
    # Google Cloud TPU system architecture pages (bf16 peak per chip, HBM per chip). Google publishes no
    # float32 peak: f32 matmuls run as bf16 passes, so MFU in float32 falls back to a measured peak.
    Accelerator("tpu-v4", "tpu", ("TPU v4",), {"bfloat16": 275 * T}, 32 * GiB),
    # v5e reports "TPU v5 lite" and v5p "TPU v5" on TPU VMs ("TPU v5e" / "TPU v5p" under Pathways).
    Accelerator("tpu-v5e", "tpu", ("TPU v5 lite", "TPU v5e"), {"bfloat16": 197 * T}, 16 * GiB),
    Accelerator("tpu-v5p", "tpu", ("TPU v5", "TPU v5p"), {"bfloat16": 459 * T}, 95 * GiB),
    # Trillium.
    Accelerator("tpu-v6e", "tpu", ("TPU v6 lite", "TPU v6e"), {"bfloat16": 918 * T}, 32 * GiB),
)

_BY_KIND = {kind.lower(): acc for acc in ACCELERATORS for kind in acc.device_kinds}
_BY_NAME = {acc.name: acc for acc in ACCELERATORS}

# Spellings accepted for a dtype (model configs say "bfloat16" / "float32"; tf32 is how GPUs run float32).
DTYPE_ALIASES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                 "f16": "float16", "half": "float16", "float32": "float32", "fp32": "float32", "f32": "float32",
                 "tf32": "float32"}


def canonical_dtype(dtype: str) -> str:
    name = str(dtype).lower()
    if name not in DTYPE_ALIASES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[name]


def accelerator(device_kind: str) -> Accelerator | None:
    """The table's entry for a jax device_kind (case and surrounding spaces ignored); None for CPUs and
    chips not in the table."""
    return _BY_KIND.get(device_kind.strip().lower())


def by_name(name: str) -> Accelerator:
    if name not in _BY_NAME:
        raise ValueError(f"accelerator={name!r}: expected one of {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in `dtype`; None for an unknown chip (CPUs included) or
    a dtype the vendor publishes no figure for."""
    dtype = canonical_dtype(dtype)
    acc = accelerator(device_kind)
    return None if acc is None else acc.peak.get(dtype)


def hbm_bytes(device_kind: str) -> int | None:
    acc = accelerator(device_kind)
    return None if acc is None else acc.hbm_bytes
