"""Decode throughput: greedy, top-p sampling and 4-beam search against Hugging Face `generate`, the cost
of streaming, and the KV cache against recomputing the whole sequence.

    python -m experiments.benchmark_decode [--out FILE] [--figure FILE] [--quick]

Shape: a 6.9M-param Llama (vocab 8000, d 256, ff 688, 4 layers, 8 heads, 2 kv heads, untied
head), fp32, 32-token prompts + 256 new tokens, batch 1 and 8. Tokens/s = batch x new tokens / wall time
of the whole call (prefill included), best of 3 rounds in which ours and the baseline alternate, so a
busy neighbour slows both. No stop tokens on either side: every row generates all its tokens.
The baseline (`pip install -e .[hf]`) is transformers' LlamaForCausalLM with the same weights (our random
params exported by research/hf_checkpoint.py and loaded with from_pretrained; both must pick the same
greedy tokens), run with the faster of 1 and all torch threads (probed first); without torch and
transformers it is recorded as "not installed". Batch-1 ratios are also given against the HF numbers
measured on an idle machine of this kind (shared/REFERENCES.md). `--quick` runs a tiny model, 8 tokens,
one round and no baseline, to check the script end to end.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import matplotlib
import numpy as np

from decoding.beam_search import BeamConfig, beam_search
from decoding.generate import generate, greedy_by_recompute
from decoding.sampling import make_sampler
from experiments.bench_common import environment, markdown_rows
from models.config import ModelConfig
from models.kernels import cpu
from models.transformer import init_params, unbox
from research.cli import ArgumentParser
from research.hf_checkpoint import save_weights
from research.hf_config import hf_config_from_model
from research.run_record import write_json_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_OUT = Path("experiments/results/benchmark_decode.json")
DEFAULT_FIGURE = Path("experiments/figures/decode_kv_cache_speedup.png")
TARGET_RATIO = 5.0  # the bar at batch 1
TOP_P = 0.9
NUM_BEAMS = 4
STRATEGIES = ("greedy", "top-p", "beam-4")
STREAM_EVERY = 8
# HF generate at batch 1 on this kind of machine when idle (shared/REFERENCES.md), tokens/s.
REFERENCE_HF_BATCH1 = {"greedy": 175.0, "top-p": 113.0, "beam-4": 83.0}


def llama_6m() -> ModelConfig:
    return ModelConfig(vocab_size=8000, d_model=256, d_ff=688, num_layers=4, num_heads=8, num_kv_heads=2,
                       max_seq_len=2048, tie_embeddings=False)


def quick_model() -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       max_seq_len=32, tie_embeddings=False)


def seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def best_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time of each fn over `repeats` rounds, the fns alternating within a round."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], seconds(fn))
    return best


def our_runs(params: Any, cfg: ModelConfig, prompt: np.ndarray, new_tokens: int) -> dict[str, Callable[[], Any]]:
    batch = prompt.shape[0]
    lengths = np.full((batch,), prompt.shape[1], np.int32)
    sampler, sampling = make_sampler(batch, top_p=TOP_P)
    key = jax.random.key(0)
    return {
        "greedy": lambda: generate(params, cfg, prompt, lengths, max_new_tokens=new_tokens).tokens,
        "top-p": lambda: generate(params, cfg, prompt, lengths, key, max_new_tokens=new_tokens, sampler=sampler,
                                  sampling=sampling).tokens,
        "beam-4": lambda: beam_search(params, cfg, prompt, lengths, max_new_tokens=new_tokens,
                                      beam=BeamConfig(num_beams=NUM_BEAMS)).tokens,
    }


def hf_model(cfg: ModelConfig, params: Any) -> Any:
    """transformers' LlamaForCausalLM with our `params` (exported to a Hugging Face folder), or "not installed"."""
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        return "not installed"
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(hf_config_from_model(cfg, "float32")))
        save_weights(Path(folder), params, cfg, "float32")
        return transformers.LlamaForCausalLM.from_pretrained(folder).eval()


def same_greedy_tokens(params: Any, cfg: ModelConfig, model: Any, new_tokens: int = 16) -> bool:
    """Whether ours and the baseline continue a batch of prompts with the same greedy tokens (same weights)."""
    import torch

    prompt = np.random.default_rng(3).integers(3, cfg.vocab_size, (2, 8)).astype(np.int32)
    ours = generate(params, cfg, prompt, np.full((2,), 8, np.int32), max_new_tokens=new_tokens).tokens[:, 0]
    with torch.inference_mode():
        theirs = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                                attention_mask=torch.ones(prompt.shape, dtype=torch.long))
    return bool(np.array_equal(np.asarray(ours), theirs[:, 8:].numpy()))


def hf_runs(model: Any, prompt: np.ndarray, new_tokens: int) -> dict[str, Callable[[], Any]]:
    import torch

    x = torch.from_numpy(prompt.astype(np.int64))
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                  attention_mask=torch.ones_like(x))

    def run(**kwargs: Any) -> Callable[[], Any]:
        def call() -> None:
            with torch.inference_mode():
                out = model.generate(x, **common, **kwargs)
            assert out.shape[1] == x.shape[1] + new_tokens

        return call

    return {"greedy": run(do_sample=False), "top-p": run(do_sample=True, top_p=TOP_P, top_k=0),
            "beam-4": run(num_beams=NUM_BEAMS, do_sample=False)}


def pick_torch_threads(model: Any, cfg: ModelConfig) -> dict[str, Any]:
    """Sets torch's thread count to the faster of 1 and all cores for batch-1 greedy decoding.

    With neighbours on a 2-core machine, torch's 2-thread kernels can run several times slower than one
    thread (threads wait for each other at every op), which would flatter our ratio; this gives the
    baseline its best setting in the current conditions.
    """
    import torch

    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 32)).astype(np.int32)
    greedy = hf_runs(model, prompt, 32)["greedy"]
    candidates = sorted({1, os.cpu_count() or 1})
    best = {n: float("inf") for n in candidates}
    for _ in range(2):
        for n in candidates:
            torch.set_num_threads(n)
            best[n] = min(best[n], seconds(greedy))
    chosen = min(best, key=best.get)
    torch.set_num_threads(chosen)
    return {"torch_threads": chosen, "probe_seconds_by_threads": {str(n): t for n, t in best.items()}}


def bench_throughput(params: Any, cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                     hf: Any) -> list[dict[str, Any]]:
    """Ours against HF generate (a model, or why there is none) for each strategy at one batch size."""
    prompt = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    ours = our_runs(params, cfg, prompt, new_tokens)
    compile_s = {name: seconds(fn) for name, fn in ours.items()}  # the first call compiles
    fns = {("ours", name): fn for name, fn in ours.items()}
    if not isinstance(hf, str):
        for name, fn in hf_runs(hf, prompt, new_tokens).items():
            fn()  # warm-up: first-call allocation and kernel selection
            fns[("hf", name)] = fn
    best = best_interleaved(fns, repeats)
    rows = []
    for name in STRATEGIES:
        tokens = batch * new_tokens
        row = {"strategy": name, "batch_size": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "repeats": repeats, "seconds": best[("ours", name)], "tokens_per_s": tokens / best[("ours", name)],
               "first_call_seconds": compile_s[name]}
        if isinstance(hf, str):
            row["hf_tokens_per_s"] = hf
        else:
            row["hf_seconds"] = best[("hf", name)]
            row["hf_tokens_per_s"] = tokens / best[("hf", name)]
            row["ratio_vs_hf"] = row["tokens_per_s"] / row["hf_tokens_per_s"]
        if batch == 1:
            row["ratio_vs_reference_hf"] = row["tokens_per_s"] / REFERENCE_HF_BATCH1[name]
        rows.append(row)
    return rows


def bench_streaming(params: Any, cfg: ModelConfig, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Greedy at batch 1 without streaming, and with a host callback (that only counts) every step and every
    STREAM_EVERY steps."""
    prompt = np.random.default_rng(1).integers(3, cfg.vocab_size, (1, prompt_len)).astype(np.int32)
    prompt_lengths = np.array([prompt_len], np.int32)
    calls: list[int] = []

    def count(tokens: np.ndarray, lengths: np.ndarray) -> None:
        calls.append(int(lengths[0]))

    def run(**kwargs: Any) -> Callable[[], Any]:
        return lambda: generate(params, cfg, prompt, prompt_lengths, max_new_tokens=new_tokens, **kwargs).tokens

    fns = {"plain": run(), "every step": run(stream=count, stream_every=1),
           f"every {STREAM_EVERY} steps": run(stream=count, stream_every=STREAM_EVERY)}
    for fn in fns.values():
        fn()
    calls.clear()
    best = best_interleaved(fns, repeats)
    assert len(calls) == repeats * (new_tokens + -(-new_tokens // STREAM_EVERY))  # every call arrived
    rows = {name: {"tokens_per_s": new_tokens / t, "overhead_per_token_us": (t - best["plain"]) / new_tokens * 1e6}
            for name, t in best.items()}
    return {"batch_size": 1, "new_tokens": new_tokens, "stream_every": STREAM_EVERY, "runs": rows}


def bench_cache_vs_recompute(params: Any, cfg: ModelConfig, prompt_len: int, lengths: list[int],
                             repeats: int) -> list[dict[str, Any]]:
    """Greedy at batch 1: KV-cache decoding against rerunning the model over the whole sequence each step."""
    prompt = np.random.default_rng(2).integers(3, cfg.vocab_size, (1, prompt_len)).astype(np.int32)
    prompt_lengths = np.array([prompt_len], np.int32)
    rows = []
    for n in lengths:
        fns = {"cache": lambda n=n: generate(params, cfg, prompt, prompt_lengths, max_new_tokens=n).tokens,
               "recompute": lambda n=n: greedy_by_recompute(params, cfg, prompt, prompt_lengths, max_new_tokens=n)[0]}
        cached, recomputed = (np.asarray(fn()) for fn in fns.values())
        best = best_interleaved(fns, repeats)
        rows.append({"new_tokens": n, "cache_seconds": best["cache"], "recompute_seconds": best["recompute"],
                     "speedup": best["recompute"] / best["cache"],
                     "same_tokens": bool(np.array_equal(cached[:, 0], recomputed))})
    return rows


def plot_cache_speedup(rows: list[dict[str, Any]], prompt_len: int, path: Path) -> None:
    n = [r["new_tokens"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(n, [x / r["cache_seconds"] for x, r in zip(n, rows)], "o-", label="KV cache")
    left.plot(n, [x / r["recompute_seconds"] for x, r in zip(n, rows)], "s-", label="full recompute")
    left.set(xscale="log", yscale="log", xlabel="generated tokens", ylabel="tokens/s", title="greedy, batch 1")
    left.legend()
    right.plot(n, [r["speedup"] for r in rows], "o-", color="C2")
    right.set(xscale="log", xlabel="generated tokens", ylabel="speedup (recompute time / cache time)",
              title=f"KV cache speedup ({prompt_len}-token prompt)")
    for ax in (left, right):
        ax.minorticks_off()
        ax.set_xticks(n, [str(x) for x in n])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(results: dict[str, Any]) -> str:
    rows = [("strategy", "batch", "ours (tok/s)", "HF generate, same run (tok/s)", "ratio",
             "ratio vs HF idle reference"), ("---", "---:", "---:", "---:", "---:", "---:")]
    for r in results["throughput"]:
        hf = r["hf_tokens_per_s"]
        rows.append((r["strategy"], str(r["batch_size"]), f"{r['tokens_per_s']:,.0f}",
                     f"{hf:,.0f}" if isinstance(hf, float) else hf,
                     f"{r['ratio_vs_hf']:.1f}x" if "ratio_vs_hf" in r else "",
                     f"{r['ratio_vs_reference_hf']:.1f}x" if "ratio_vs_reference_hf" in r else ""))
    s = results["streaming"]
    lines = [markdown_rows(rows), "",
             "| streaming (greedy, batch 1) | tok/s | cost per token (us) |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {r['tokens_per_s']:,.0f} | {r['overhead_per_token_us']:.0f} |"
              for name, r in s["runs"].items()]
    lines += ["", "| new tokens | KV cache (s) | recompute (s) | speedup |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['new_tokens']} | {r['cache_seconds']:.3f} | {r['recompute_seconds']:.3f} | {r['speedup']:.1f}x |"
              for r in results["cache_vs_recompute"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--figure", type=Path, default=None,
                        help=f"KV cache figure (default {DEFAULT_FIGURE}; with --quick, next to --out)")
    parser.add_argument("--quick", action="store_true", help="smoke-sized model, few tokens, no HF")
    args = parser.parse_args(argv)
    figure = args.figure or (args.out.with_suffix(".png") if args.quick else DEFAULT_FIGURE)

    cfg = quick_model() if args.quick else llama_6m()
    prompt_len, new_tokens, repeats = (8, 8, 1) if args.quick else (32, 256, 3)
    batches = (1,) if args.quick else (1, 8)
    cache_lengths = [new_tokens] if args.quick else [16, 32, 64, 128, 256]
    params = unbox(init_params(cfg, jax.random.key(0)))

    load_start = os.getloadavg()
    hf = "skipped (--quick)" if args.quick else hf_model(cfg, params)
    same_tokens = same_greedy_tokens(params, cfg, hf) if not isinstance(hf, str) else hf
    torch_threads = pick_torch_threads(hf, cfg) if not isinstance(hf, str) else hf
    throughput = [row for b in batches for row in bench_throughput(params, cfg, b, prompt_len, new_tokens, repeats, hf)]
    streaming = bench_streaming(params, cfg, prompt_len, new_tokens, 2 * repeats - 1)  # short calls: more rounds
    cache = bench_cache_vs_recompute(params, cfg, prompt_len, cache_lengths, repeats)
    plot_cache_speedup(cache, prompt_len, figure)

    results = {
        "quick": args.quick,
        "model": {"config": cfg.__dict__, "resolved": cfg.resolved().__dict__, "param_count": cfg.param_count()},
        "throughput": throughput,
        "target_ratio_vs_hf_batch1": TARGET_RATIO,
        "reference_hf_batch1_tokens_per_s": REFERENCE_HF_BATCH1,
        "hf_torch_threads": torch_threads,
        "hf_same_greedy_tokens": same_tokens,
        # What ran the decode steps' weight matmuls (models.transformer.prepare_params): the panel kernel on
        # packed weights (up to linear.PACKED_MAX_ROWS rows), or XLA's matmul.
        "decode_weight_matmuls": ("panel_matmul kernel" if cpu.available()
                                  else f"xla (kernel unavailable: {cpu.unavailable_reason()})"),
        "streaming": streaming,
        "cache_vs_recompute": cache,
        "figure": str(figure),
        **environment(load_start),
    }
    write_json_atomic(args.out, results)
    print(markdown_table(results))
    print(f"wrote {args.out} and {figure}")
    return results


if __name__ == "__main__":
    main()
