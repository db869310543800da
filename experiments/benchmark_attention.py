"""Attention kernels on a GPU: flash attention TFLOP/s against jax.nn.dot_product_attention (XLA and
cuDNN), and the decode kernel's achieved memory bandwidth against the device's peak.

    python -m experiments.benchmark_attention [--out FILE] [--quick]

Everything is measured in one run. Flash attention: causal, bf16, MHA, sequence lengths 1k-16k at
head dims 64 and 128, batch x length held at 16k tokens and heads x head dim at 2048; forward and
forward+backward (FLOPs: 4 B N T^2 H / 2 for a causal forward, 2.5x that for the backward). Each
Pallas tile choice in FLASH_TILES is timed and the best is reported; the forward is compared with the
measured bf16 matmul peak. Decode: one token per row over a full bf16 cache (Llama-like GQA: 32
query heads, 8 kv heads, head dim 128), bytes read / time against the spec-sheet HBM bandwidth (and a
measured copy). A configuration that fails (e.g. XLA out of memory at 16k) is recorded, not fatal.

Without a GPU it says so, writes a results file recording that, and exits 0.
`--quick` times fewer shapes and tiles.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from models.attention import masked_attention
from models.kernels.decode_attention import DecodeBlockSizes, decode_attention
from models.kernels.flash_attention import BlockSizes, flash_attention
from experiments.bench_common import bench_args
from research.flops import measure_matmul_peak
from research.run_record import device_info, git_commit, library_versions, write_json_atomic

DEFAULT_OUT = Path("experiments/results/benchmark_attention.json")
SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
TOKENS = 16384  # batch x sequence length
WIDTH = 2048  # query heads x head dim
FLASH_TILES = (BlockSizes(128, 64, 64, 64, num_warps=4, num_stages=2),
               BlockSizes(128, 128, 64, 64, num_warps=8, num_stages=2),
               BlockSizes(64, 64, 32, 64, num_warps=4, num_stages=3))
DECODE_BATCH, DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM = 8, 32, 8, 128
DECODE_LENS = (4096, 16384, 65536)
DECODE_TILES = (DecodeBlockSizes(64, 16), DecodeBlockSizes(128, 16), DecodeBlockSizes(128, 32),
                DecodeBlockSizes(256, 8, num_warps=8))
# The kernels' targets.
TARGET_FWD_BWD_VS_CUDNN = 1.0
TARGET_FWD_VS_MATMUL_PEAK = 0.5  # at sequence length >= 4096
TARGET_DECODE_VS_PEAK_BW = 0.6
# Spec-sheet HBM bandwidth (bytes/s), matched against jax's device_kind, most specific first.
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100-PCIE-80GB", 1.935e12), ("A100", 1.555e12),
                  ("L40S", 0.864e12), ("L4", 0.3e12))


def seconds_per_call(fn: Callable[..., Any], *args: Any, calls: int = 10, repeats: int = 3) -> float:
    """Best over `repeats` of the mean time of `calls` back-to-back calls (the first call compiles)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def attempt(measure: Callable[[], float]) -> float | str:
    """The measurement, or the first line of the error that stopped it."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 -- e.g. out of memory: recorded per configuration
        return f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def attention_fn(impl: str, tiles: BlockSizes | None) -> Callable[..., jax.Array]:
    if impl == "pallas":
        return functools.partial(flash_attention, causal=True, block_sizes=tiles, interpret=False)
    return functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=impl)


def bench_flash(seq: int, head_dim: int, impl: str, tiles: BlockSizes | None) -> dict[str, Any]:
    b, n = TOKENS // seq, WIDTH // head_dim
    keys = jax.random.split(jax.random.key(seq + head_dim), 4)
    q, k, v, do = (jax.random.normal(key, (b, seq, n, head_dim), jnp.bfloat16) for key in keys)
    f = attention_fn(impl, tiles)
    fwd = jax.jit(f)
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
    flops = 4.0 * b * n * seq * seq * head_dim / 2
    row: dict[str, Any] = {"impl": impl, "seq": seq, "head_dim": head_dim, "batch": b, "heads": n,
                           "tiles": None if tiles is None else dataclasses.asdict(tiles)}
    for name, fn, args, work in (("fwd", fwd, (q, k, v), flops), ("fwd_bwd", fwd_bwd, (q, k, v, do), 3.5 * flops)):
        seconds = attempt(lambda: seconds_per_call(fn, *args))
        row[name + "_tflops"] = work / seconds / 1e12 if isinstance(seconds, float) else seconds
    return row


def best_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """(impl, seq, head_dim) -> the row with the best forward+backward (pallas: over its tile choices)."""
    def score(row: dict[str, Any]) -> float:
        return sum(x for x in (row["fwd_tflops"], row["fwd_bwd_tflops"]) if isinstance(x, float))

    best: dict[tuple[str, int, int], dict[str, Any]] = {}
    for row in rows:
        key = (row["impl"], row["seq"], row["head_dim"])
        if key not in best or score(row) > score(best[key]):
            best[key] = row
    return best


def bench_decode(cache_len: int, tiles: DecodeBlockSizes | None) -> dict[str, Any]:
    """Achieved bandwidth: the cache bytes the kernel must read (K and V, full rows) / time."""
    b, n, kh, h = DECODE_BATCH, DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM
    keys = jax.random.split(jax.random.key(cache_len), 3)
    q = jax.random.normal(keys[0], (b, n, h), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, cache_len, kh, h), jnp.bfloat16) for key in keys[1:])
    lengths = jnp.full((b,), cache_len, jnp.int32)
    if tiles is None:  # the model's XLA path: masked attention over the whole cache
        slots = jnp.broadcast_to(jnp.arange(cache_len), (b, cache_len))
        fn = jax.jit(lambda q, k, v, lengths: masked_attention(q[:, None], k, v, lengths[:, None] - 1, slots,
                                                            lengths, 0))
    else:
        fn = jax.jit(functools.partial(decode_attention, block_sizes=tiles, interpret=False))
    seconds = attempt(lambda: seconds_per_call(fn, q, k, v, lengths, calls=50))
    nbytes = k.nbytes + v.nbytes + 2 * q.nbytes
    return {"impl": "xla" if tiles is None else "pallas", "cache_len": cache_len, "batch": b, "heads": n,
            "kv_heads": kh, "head_dim": h, "tiles": None if tiles is None else dataclasses.asdict(tiles),
            "bytes": nbytes, "bandwidth": nbytes / seconds if isinstance(seconds, float) else seconds}


def measure_copy_bandwidth(nbytes: int = 2 ** 31) -> float:
    """Bytes read + written per second by a jitted elementwise pass over a large bf16 array."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    return 2 * nbytes / seconds_per_call(jax.jit(lambda x: x * 2), x)


def spec_bandwidth(device_kind: str) -> float | None:
    return next((bw for name, bw in PEAK_BANDWIDTH if name in device_kind), None)


def fmt(x: float | str | None, scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
    """A number for the table; a recorded error shows as "failed", a ratio missing its input as "n/a"."""
    if isinstance(x, float):
        return f"{x / scale:,.{digits}f}{unit}"
    return "failed" if isinstance(x, str) else "n/a"


def markdown_table(results: dict[str, Any]) -> str:
    """Flash TFLOP/s per shape (best tiles) and decode bandwidth; the device is named in the header."""
    peak = results["matmul_peak_bf16_flops"]
    lines = [f"Flash attention, causal, bf16, on {results['device']} (bf16 matmul peak {peak / 1e12:.0f} TFLOP/s):",
             "", "| seq | head dim | pass | pallas TFLOP/s | cuDNN | XLA | pallas / cuDNN | pallas / matmul peak |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    best = best_rows(results["flash"])
    for seq, h in sorted({(r["seq"], r["head_dim"]) for r in results["flash"]}):
        rows = {impl: best.get((impl, seq, h), {}) for impl in ("pallas", "cudnn", "xla")}
        for name in ("fwd", "fwd_bwd"):
            ours, cudnn, xla = (rows[impl].get(name + "_tflops") for impl in ("pallas", "cudnn", "xla"))
            vs_cudnn = ours / cudnn if isinstance(ours, float) and isinstance(cudnn, float) else None
            vs_peak = ours * 1e12 / peak if isinstance(ours, float) else None
            lines.append(f"| {seq} | {h} | {name.replace('_', '+')} | {fmt(ours, digits=1)} | {fmt(cudnn, digits=1)} "
                         f"| {fmt(xla, digits=1)} | {fmt(vs_cudnn, digits=2)} | {fmt(vs_peak, 0.01, unit='%')} |")
    peak_bw = results["peak_bandwidth"]
    lines += ["", f"Decode, bf16 cache, batch {DECODE_BATCH}, {DECODE_HEADS} query / {DECODE_KV_HEADS} kv heads, "
              f"head dim {DECODE_HEAD_DIM} (peak {fmt(peak_bw, 1e9)} GB/s, measured copy "
              f"{fmt(results['copy_bandwidth'], 1e9)} GB/s):", "",
              "| cache length | pallas GB/s | XLA GB/s | pallas / peak |", "| ---: | ---: | ---: | ---: |"]
    for length in sorted({r["cache_len"] for r in results["decode"]}):
        rows = [r for r in results["decode"] if r["cache_len"] == length]
        ours = max((r["bandwidth"] for r in rows if r["impl"] == "pallas" and isinstance(r["bandwidth"], float)),
                   default=None)
        xla = next((r["bandwidth"] for r in rows if r["impl"] == "xla"), None)
        ratio = ours / peak_bw if isinstance(ours, float) and isinstance(peak_bw, float) else None
        lines.append(f"| {length} | {fmt(ours, 1e9)} | {fmt(xla, 1e9)} | {fmt(ratio, 0.01, unit='%')} |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, bool | None]:
    """The targets, each True/False, or None when a number it needs is missing."""
    best = best_rows(results["flash"])
    peak = results["matmul_peak_bf16_flops"]
    fwd_bwd, fwd = [], []
    for (impl, seq, h), row in best.items():
        cudnn = best.get(("cudnn", seq, h), {}).get("fwd_bwd_tflops")
        if impl == "pallas" and isinstance(row["fwd_bwd_tflops"], float) and isinstance(cudnn, float):
            fwd_bwd.append(row["fwd_bwd_tflops"] >= TARGET_FWD_BWD_VS_CUDNN * cudnn)
        if impl == "pallas" and seq >= 4096 and isinstance(row["fwd_tflops"], float):
            fwd.append(row["fwd_tflops"] * 1e12 >= TARGET_FWD_VS_MATMUL_PEAK * peak)
    best_decode: dict[int, float] = {}  # cache length -> best pallas bandwidth over its tile choices
    for r in results["decode"]:
        if r["impl"] == "pallas" and isinstance(r["bandwidth"], float):
            best_decode[r["cache_len"]] = max(r["bandwidth"], best_decode.get(r["cache_len"], 0.0))
    decode = [bw >= TARGET_DECODE_VS_PEAK_BW * results["peak_bandwidth"] for bw in best_decode.values()]
    return {"fwd_bwd_ge_cudnn": all(fwd_bwd) if fwd_bwd else None,
            "fwd_ge_half_matmul_peak_at_4k_plus": all(fwd) if fwd else None,
            "decode_ge_60pct_peak_bandwidth": all(decode) if decode else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(argv, __doc__, DEFAULT_OUT, "fewer shapes and tile choices")
    results: dict[str, Any] = {
        "quick": args.quick, "gpu_available": jax.default_backend() == "gpu", "devices": device_info(),
        "device": jax.devices()[0].device_kind, "versions": library_versions(), "git_commit": git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not results["gpu_available"]:
        results["note"] = (f"no GPU available (default backend: {jax.default_backend()}): nothing was measured; "
                           "run this script on a CUDA GPU")
        write_json_atomic(args.out, results)
        print(f"benchmark_attention: {results['note']}. Wrote {args.out}")
        return results

    seqs, tiles, decode_tiles = SEQ_LENS, FLASH_TILES, DECODE_TILES
    if args.quick:
        seqs, tiles, decode_tiles = (1024, 4096), FLASH_TILES[:1], DECODE_TILES[1:2]
    results["matmul_peak_bf16_flops"] = measure_matmul_peak("bfloat16", n=8192)
    results["copy_bandwidth"] = measure_copy_bandwidth()
    spec = spec_bandwidth(results["device"])  # an unknown device falls back to the measured copy
    results["peak_bandwidth"] = spec or results["copy_bandwidth"]
    results["peak_bandwidth_source"] = "spec sheet" if spec else "measured copy"
    flash = []
    for seq in seqs:
        for h in HEAD_DIMS:
            flash += [bench_flash(seq, h, "pallas", t) for t in tiles]
            flash += [bench_flash(seq, h, impl, None) for impl in ("cudnn", "xla")]
            print(f"flash seq={seq} head_dim={h} done", flush=True)
    results["flash"] = flash
    results["decode"] = [bench_decode(length, t) for length in DECODE_LENS for t in (*decode_tiles, None)]
    results["targets"] = targets(results)
    results["note"] = f"measured on {results['device']}"
    write_json_atomic(args.out, results)
    print(markdown_table(results))
    print(f"targets: {results['targets']}\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
