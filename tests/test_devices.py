"""The accelerator table (research/devices.py) and the MFU peak it feeds (research/flops.py: mfu_peak)."""

import dataclasses

import jax
import pytest

from research import devices, flops

# device_kind strings as jax reports them (TPU ones also as libtpu's compile-only topologies report them).
KINDS = {
    "NVIDIA H100 80GB HBM3": ("h100-sxm", 989.4e12),
    "NVIDIA H200": ("h200", 989.4e12),
    "NVIDIA A100-SXM4-80GB": ("a100-80gb", 312e12),
    "NVIDIA A100 80GB PCIe": ("a100-80gb", 312e12),
    "TPU v4": ("tpu-v4", 275e12),
    "TPU v5 lite": ("tpu-v5e", 197e12),
    "TPU v5e": ("tpu-v5e", 197e12),
    "TPU v5": ("tpu-v5p", 459e12),
    "TPU v5p": ("tpu-v5p", 459e12),
    "TPU v6 lite": ("tpu-v6e", 918e12),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_device_kinds_map_to_the_table(kind: str) -> None:
    name, bf16 = KINDS[kind]
    assert devices.accelerator(kind).name == name
    assert devices.peak_flops(kind, "bfloat16") == pytest.approx(bf16)
    assert devices.accelerator(f"  {kind.upper()} ").name == name  # case and spaces do not matter


def test_unknown_and_cpu_kinds_have_no_peak() -> None:
    for kind in ("cpu", "Intel(R) Xeon(R)", "NVIDIA GeForce RTX 4090", "TPU v7x", "NVIDIA H100 PCIe", ""):
        assert devices.accelerator(kind) is None
        assert devices.peak_flops(kind, "bfloat16") is None
        assert devices.hbm_bytes(kind) is None


def test_dtype_spellings_and_unpublished_dtypes() -> None:
    h100 = "NVIDIA H100 80GB HBM3"
    assert devices.peak_flops(h100, "bf16") == devices.peak_flops(h100, "bfloat16")
    # float32 on a GPU runs as TF32 (half the bf16 rate); Google publishes no float32 peak for TPUs.
    assert devices.peak_flops("NVIDIA H100 80GB HBM3", "float32") == pytest.approx(494.7e12)
    assert devices.peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == pytest.approx(156e12)
    assert devices.peak_flops("TPU v5 lite", "float32") is None
    with pytest.raises(ValueError, match=r"dtype='int4': expected one of .*bfloat16"):
        devices.peak_flops("TPU v5 lite", "int4")


def test_table_is_consistent() -> None:
    assert len({a.name for a in devices.ACCELERATORS}) == len(devices.ACCELERATORS)
    for acc in devices.ACCELERATORS:
        assert acc.platform in ("gpu", "tpu") and acc.hbm_bytes >= 16 * devices.GiB
        assert set(acc.peak) <= set(devices.DTYPE_ALIASES.values()) and "bfloat16" in acc.peak
        assert acc.peak.get("float32", 0) <= acc.peak["bfloat16"]
    assert devices.hbm_bytes("TPU v5 lite") == 16 * devices.GiB
    assert devices.by_name("tpu-v5p").hbm_bytes == 95 * devices.GiB
    with pytest.raises(ValueError, match="accelerator='v9': expected one of h100-sxm"):
        devices.by_name("v9")


@dataclasses.dataclass
class FakeDevice:
    device_kind: str


def test_mfu_peak_uses_the_table_on_a_known_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: pytest.fail("measured on a known chip"))
    assert flops.mfu_peak("bfloat16", FakeDevice("TPU v5 lite")) == (197e12, "table:tpu-v5e")
    assert flops.mfu_peak("float32", FakeDevice("NVIDIA H100 80GB HBM3")) == (494.7e12, "table:h100-sxm")


def test_mfu_peak_measures_on_cpu_and_unpublished_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda dtype: asked.append(dtype) or 1.5e11)
    assert jax.devices()[0].platform == "cpu"
    assert flops.mfu_peak("bf16") == (1.5e11, "measured")  # the default device: this CPU
    assert flops.mfu_peak("float32", FakeDevice("TPU v4")) == (1.5e11, "measured")
    assert asked == ["bfloat16", "float32"]  # measured in the canonical dtype name jnp understands


def test_measured_peak_on_cpu_is_a_positive_rate() -> None:
    peak, source = flops.mfu_peak("float32")
    assert source == "measured" and peak > 1e8
