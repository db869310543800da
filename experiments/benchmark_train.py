"""Training and forward throughput on one device: tokens/s and MFU, and forward speed against HF Llama.

    python -m experiments.benchmark_train [--out FILE] [--quick]

Everything is measured in one process and one run, so the ratios compare like with like on a noisy
machine: our forward and Hugging Face's are timed round-robin (best of FORWARD_REPEATS rounds), so a
neighbour's load falls on both alike. MFU is achieved model FLOP/s over the measured fp32 matmul peak
(`research.flops`). The peak's matmul chain is timed at the start, at the end and in every timed round
next to the contenders, and the largest of all is used: a neighbour that slows the machine during a
peak measurement would otherwise lower the peak and inflate every MFU.

The Hugging Face baseline (`pip install -e .[hf]`) is optional: without torch and transformers it is
recorded as "not installed". `--quick` runs smoke-sized shapes with 2 timed steps and no baseline.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from configs.presets import bench_512, smoke
from experiments.bench_common import (PEAK_SIZE, QUICK_PEAK_SIZE, Runner, bench_args, environment, forward_runner,
                                      interleaved_best, markdown_rows, random_tokens, resolved_config, train_runner)
from models.config import ModelConfig
from research.config import DataConfig, TrainConfig
from research.flops import forward_flops_per_token, matmul_chain, measure_matmul_peak, train_flops_per_token
from research.run_record import write_json_atomic

DEFAULT_OUT = Path("experiments/results/benchmark_train.json")
PEAK_DTYPE = "float32"  # all benchmarked models compute in fp32
MFU_TARGET = 0.5  # the MFU bar for d_model >= 512 on CPU
REPEATS = 4  # timed rounds of the train loop (each with a peak measurement); the best is reported
FORWARD_REPEATS = 7  # rounds of (ours, HF); forward passes are short


def llama_6m() -> TrainConfig:
    """HF LlamaConfig's architecture (RMSNorm, SwiGLU, RoPE, GQA, untied head) at 6.9M parameters."""
    model = ModelConfig(vocab_size=8000, d_model=256, d_ff=688, num_layers=4, num_heads=8, num_kv_heads=2,
                        max_seq_len=2048, norm="rmsnorm", mlp="swiglu", position="rope",
                        tie_embeddings=False)
    return TrainConfig(name="llama-6.9m", model=model, data=DataConfig(seq_len=512, batch_size=8))


def quick_configs() -> list[TrainConfig]:
    """Smoke-sized stand-ins for the two models, one layer each: compile time dominates the test."""
    base = smoke()
    dense = dataclasses.replace(base, name="smoke-1layer", model=dataclasses.replace(base.model, num_layers=1))
    llama = dataclasses.replace(dense, name="llama-smoke-1layer",
                                model=dataclasses.replace(dense.model, tie_embeddings=False))
    return [dense, llama]


def bench_train(cfg: TrainConfig, steps: int, peak: Runner) -> tuple[dict[str, Any], float]:
    """Best-of-REPEATS tokens/s of `steps` consecutive train steps, and the best seconds of the peak's
    matmul chain timed in the same rounds (MFU is filled in once the peak is known)."""
    b, t = cfg.data.batch_size, cfg.data.seq_len
    seconds = interleaved_best({"train": train_runner(cfg, steps), "peak": peak}, REPEATS)
    return {"name": cfg.name, "config": resolved_config(cfg), "batch_size": b, "seq_len": t, "steps": steps,
            "repeats": REPEATS, "seconds": seconds["train"], "tokens_per_s": b * t * steps / seconds["train"],
            "flops_per_token": train_flops_per_token(cfg.model, t)}, seconds["peak"]


def hf_llama_runner(model_cfg: ModelConfig, tokens: np.ndarray) -> tuple[Runner, dict[str, Any]] | str:
    """transformers' LlamaForCausalLM of the same shape (runner, facts), or "not installed"."""
    try:
        import torch
        import transformers
    except ImportError:
        return "not installed"
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model, intermediate_size=model_cfg.d_ff,
        num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads, max_position_embeddings=model_cfg.max_seq_len,
        rms_norm_eps=model_cfg.norm_eps, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    x = torch.from_numpy(tokens.astype(np.int64))

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=x, use_cache=False)

    forward()  # first call allocates and picks kernels
    return forward, {"params": sum(p.numel() for p in model.parameters()),
                     "attn_implementation": model.config._attn_implementation,
                     "torch_threads": torch.get_num_threads()}


def markdown_table(results: dict[str, Any]) -> str:
    peak = results["matmul_peak_flops"]
    rows = [("measurement", "ours", "baseline", "ratio"), ("---", "---:", "---:", "---:"),
            (f"matmul peak, {PEAK_DTYPE} (GFLOP/s)", f"{peak / 1e9:.1f}", "", "")]
    for run in results["train"]:
        shape = f"{run['batch_size']} x {run['seq_len']}"
        rows.append((f"train {run['name']} {shape} (tokens/s)", f"{run['tokens_per_s']:,.0f}", "", ""))
        rows.append((f"train {run['name']} MFU", f"{run['mfu']:.1%}", f"{MFU_TARGET:.0%} (target)",
                     f"{run['mfu'] / MFU_TARGET:.2f}"))
    fwd, hf = results["forward"], results["hf"]
    shape = f"{fwd['batch_size']} x {fwd['seq_len']}"
    base = f"{hf['tokens_per_s']:,.0f} (HF)" if isinstance(hf, dict) else f"HF {hf}"
    ratio = f"{fwd['ratio_vs_hf']:.2f}" if isinstance(hf, dict) else ""
    rows.append((f"forward {fwd['name']} {shape} (tokens/s)", f"{fwd['tokens_per_s']:,.0f}", base, ratio))
    return markdown_rows(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(argv, __doc__, DEFAULT_OUT, "smoke-sized shapes, 2 timed steps, no HF")

    load_start = os.getloadavg()
    peak_size = QUICK_PEAK_SIZE if args.quick else PEAK_SIZE
    peaks = [measure_matmul_peak(PEAK_DTYPE, n=peak_size)]
    peak_run, peak_flops = matmul_chain(PEAK_DTYPE, n=peak_size)

    train_cfgs = quick_configs() if args.quick else [bench_512(), llama_6m()]
    steps = 2 if args.quick else 5
    train = []
    for cfg in train_cfgs:
        run, peak_seconds = bench_train(cfg, steps, peak_run)
        train.append(run)
        peaks.append(peak_flops / peak_seconds)

    llama = train_cfgs[1]
    tokens = random_tokens(llama.model.vocab_size, (llama.data.batch_size, llama.data.seq_len), seed=1)
    runners = {"ours": forward_runner(llama, tokens)}
    hf = "skipped (--quick)" if args.quick else hf_llama_runner(llama.model, tokens)
    if isinstance(hf, tuple):
        runners["hf"], hf = hf
    forward_seconds = interleaved_best({**runners, "peak": peak_run}, FORWARD_REPEATS)
    ours = tokens.size / forward_seconds["ours"]

    peaks += [peak_flops / forward_seconds["peak"], measure_matmul_peak(PEAK_DTYPE, n=peak_size)]
    peak = max(peaks)
    for run in train:
        run["mfu"] = run["tokens_per_s"] * run["flops_per_token"] / peak
    forward_flops = forward_flops_per_token(llama.model, llama.data.seq_len)
    forward = {"name": llama.name, "config": resolved_config(llama), "batch_size": tokens.shape[0],
               "seq_len": tokens.shape[1], "repeats": FORWARD_REPEATS, "tokens_per_s": ours,
               "flops_per_token": forward_flops, "mfu": ours * forward_flops / peak}
    if isinstance(hf, dict):
        hf["tokens_per_s"] = tokens.size / forward_seconds["hf"]
        hf["mfu"] = hf["tokens_per_s"] * forward_flops / peak
        forward["ratio_vs_hf"] = ours / hf["tokens_per_s"]

    results = {
        "quick": args.quick,
        "matmul_peak_flops": peak,
        "matmul_peak_dtype": PEAK_DTYPE,
        "matmul_peak_size": peak_size,
        "matmul_peak_measurements": peaks,  # start, with each train config, with the forward, end
        "mfu_target": MFU_TARGET,
        "train": train,
        "forward": forward,
        "hf": hf,
        **environment(load_start),
    }
    write_json_atomic(args.out, results)
    print(markdown_table(results))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
