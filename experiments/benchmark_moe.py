"""Mixture-of-experts speed: train steps against dense baselines, dispatch layouts, forward against HF Mixtral.

    python -m experiments.benchmark_moe [--out FILE] [--quick]

All in one process and one run, and the contenders of each comparison are timed round-robin (best of
REPEATS rounds), so a neighbour's load falls on all of them alike:
  train     train-step tokens/s of the Mixtral-shaped preset (top-2 of 8; dropless and with capacity
            factor 1.25) against a dense model with the same active parameters (d_ff = 2 x 688) and
            against the dense-MoE mode (every expert on every token);
  dispatch  one MoE FFN layer, forward + backward, with each token-to-expert layout: ours (gather into
            capacity buffers; sorted dropless blocks) and GShard's one-hot dispatch/combine einsums;
  forward   forward tokens/s of mixtral-22m against transformers' MixtralForCausalLM (PyTorch CPU,
            random init, same dimensions). Optional (`pip install -e .[hf]`): recorded as "not installed".
            Ours twice: with XLA's ops, and with the CPU kernels (model.matmul_impl=cpu_panel and
            model.attention_impl=cpu_fused: models/kernels/cpu/), recorded as unavailable if they cannot be built.
            Chains of square matmuls (1024 and 2048) run in the same rounds: the best FLOP/s (the
            machine's matmul peak) gives the forwards' MFU and the ratio to HF that ours would reach
            at that peak.
`--quick` runs smoke-sized shapes with 2 timed steps and no HF baseline.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from configs.presets import mixtral_22m, smoke
from experiments.bench_common import (PEAK_SIZE, QUICK_PEAK_SIZE, Runner, bench_args, environment, forward_runner,
                                      interleaved_best, markdown_rows, random_tokens, resolved_config, train_runner)
from models.config import ModelConfig
from models.kernels import cpu
from models.mlp import MLP
from models.moe import MoE, expert_capacity, expert_ffn, slot_positions
from models.transformer import unbox
from research.config import TrainConfig
from research.flops import forward_flops_per_token, matmul_chain
from research.run_record import write_json_atomic

DEFAULT_OUT = Path("experiments/results/benchmark_moe.json")
# The train-step cost bar. The forward has none: CPU speed work is frozen, the ratio is reported as measured.
TARGETS = {"moe_cost_vs_dense_max": 1.6}
CPU_KERNELS = {"matmul_impl": "cpu_panel", "attention_impl": "cpu_fused"}  # the forward's second contender
TRAIN_CAPACITY_FACTOR = 1.25
REPEATS = 3  # rounds; each contender's best round is reported
FORWARD_REPEATS = 5  # forward passes are short: more rounds for the same time


def with_model(cfg: TrainConfig, name: str, **model: Any) -> TrainConfig:
    moe = model.pop("moe", {})
    new = dataclasses.replace(cfg.model, **model, moe=dataclasses.replace(cfg.model.moe, **moe))
    return dataclasses.replace(cfg, name=name, model=new)


def train_configs(base: TrainConfig) -> dict[str, TrainConfig]:
    """The MoE preset, its capacity-factor variant, the dense model of equal active params, dense-MoE."""
    moe = base.model.moe
    return {
        "moe_dropless": with_model(base, f"{base.name} (dropless)", moe={"capacity_factor": 0.0}),
        "moe_capacity": with_model(base, f"{base.name} (capacity {TRAIN_CAPACITY_FACTOR})",
                                   moe={"capacity_factor": TRAIN_CAPACITY_FACTOR}),
        "dense_same_active": with_model(base, f"dense d_ff={moe.top_k * base.model.d_ff}",
                                        d_ff=moe.top_k * base.model.d_ff, moe={"num_experts": 0}),
        "dense_moe": with_model(base, f"{base.name} (dense-MoE mode)", moe={"router": "dense"}),
    }


def quick_config() -> TrainConfig:
    base = smoke()
    return with_model(base, "moe-smoke-1layer", num_layers=1,
                      moe={"num_experts": 4, "top_k": 2, "renormalize": True, "capacity_factor": 0.0,
                           "eval_capacity_factor": 0.0})


def einsum_dispatch_moe(cfg: ModelConfig, params: dict[str, jax.Array], x: jax.Array,
                        capacity: int) -> jax.Array:
    """GShard's layout, for comparison: one-hot dispatch [B, T, E, C] and combine tensors, two einsums.

    Same router, queue order and capacity as models.moe (softmax top-k, sequence order), so its output
    equals the gather layout's.
    """
    moe = cfg.moe
    probs = jax.nn.softmax(jnp.einsum("btd,de->bte", x, params["router"]), axis=-1)
    top_probs, experts = jax.lax.top_k(probs, moe.top_k)
    gates = top_probs / jnp.sum(top_probs, -1, keepdims=True) if moe.renormalize else top_probs
    pos = slot_positions(experts, None, moe.num_experts)
    # A dropped assignment's position is >= capacity, whose one-hot row is all zeros.
    mask = jax.nn.one_hot(experts, moe.num_experts)[..., None] * jax.nn.one_hot(pos, capacity)[..., None, :]
    dispatch, combine = jnp.sum(mask, axis=2), jnp.sum(mask * gates[..., None, None], axis=2)
    h = jnp.einsum("btec,btd->ebcd", dispatch, x)
    y = expert_ffn(h, {n: params[n] for n in ("w_up", "w_gate", "w_down")}, cfg.mlp)
    return jnp.einsum("btec,ebcd->btd", combine, y)


def jitted_init(module: Any, *args: Any) -> Any:
    """Parameters from a compiled init: run op by op, init compiles every op separately (slow on CPU)."""
    return jax.jit(lambda key: unbox(module.init(key, *args)["params"]))(jax.random.key(0))


def layer_runner(fn: Callable[[Any, jax.Array], jax.Array], params: Any, x: jax.Array) -> Runner:
    """One compiled forward + backward (gradients w.r.t. params and input)."""
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) ** 2), argnums=(0, 1)))
    jax.block_until_ready(step(params, x))  # compile
    return lambda: jax.block_until_ready(step(params, x))


def bench_dispatch(cfg: ModelConfig, batch: int, seq_len: int) -> dict[str, Any]:
    """One MoE FFN layer (capacity factor 1.25, dropless, GShard einsum) and a dense MLP of equal active size."""
    capacity_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, eval_capacity_factor=TRAIN_CAPACITY_FACTOR))
    dropless_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, eval_capacity_factor=0.0))
    x = jax.random.normal(jax.random.key(0), (batch, seq_len, cfg.d_model))
    params = jitted_init(MoE(capacity_cfg), x[:1, :8])
    capacity = expert_capacity(seq_len, cfg.moe.top_k, cfg.moe.num_experts, TRAIN_CAPACITY_FACTOR)
    mlp = MLP(cfg.d_model, cfg.moe.top_k * cfg.d_ff, cfg.mlp)
    mlp_params = jitted_init(mlp, x[:1, :8])

    def ours(layer_cfg: ModelConfig) -> Callable:
        return lambda p, x: MoE(layer_cfg).apply({"params": p}, x)[0]

    kernel_cfg = dataclasses.replace(dropless_cfg, **CPU_KERNELS)

    def gshard(p: Any, x: jax.Array) -> jax.Array:
        return einsum_dispatch_moe(cfg, p, x, capacity)

    reference = jax.jit(gshard)(params, x)
    diff = jnp.max(jnp.abs(jax.jit(ours(capacity_cfg))(params, x) - reference)) / jnp.max(jnp.abs(reference))
    runners = {
        "gather_capacity": layer_runner(ours(capacity_cfg), params, x),
        "sorted_dropless": layer_runner(ours(dropless_cfg), params, x),
        "onehot_einsum_capacity": layer_runner(gshard, params, x),
        "dense_mlp_same_active": layer_runner(lambda p, x: mlp.apply({"params": p}, x), mlp_params, x),
    }
    if cpu.available():  # sorted rows without padding, the experts by the grouped CPU kernel
        runners["sorted_dropless_cpu_kernel"] = layer_runner(ours(kernel_cfg), params, x)
    seconds = interleaved_best(runners, REPEATS)
    return {"batch_size": batch, "seq_len": seq_len, "capacity_factor": TRAIN_CAPACITY_FACTOR,
            "capacity": capacity, "repeats": REPEATS, "fwd_bwd_seconds": seconds,
            "max_rel_diff_gather_vs_einsum": float(diff)}  # max |difference| / max |output|


def hf_mixtral_runner(model_cfg: ModelConfig, tokens: np.ndarray) -> tuple[Runner, dict[str, Any]] | str:
    """transformers' MixtralForCausalLM of the same shape (runner, facts), or "not installed"."""
    try:
        import torch
        import transformers
    except ImportError:
        return "not installed"
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model,
        intermediate_size=model_cfg.moe.d_ff or model_cfg.d_ff, num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_kv_heads,
        num_local_experts=model_cfg.moe.num_experts, num_experts_per_tok=model_cfg.moe.top_k,
        max_position_embeddings=model_cfg.max_seq_len, rms_norm_eps=model_cfg.norm_eps,
        sliding_window=model_cfg.sliding_window or None, tie_word_embeddings=model_cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_theta})
    model = transformers.MixtralForCausalLM(config).eval()
    x = torch.from_numpy(tokens.astype(np.int64))

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=x, use_cache=False)

    forward()  # first call allocates and picks kernels
    return forward, {"params": sum(p.numel() for p in model.parameters()),
                     "attn_implementation": model.config._attn_implementation,
                     "experts_implementation": str(getattr(model.config, "_experts_implementation", None)),
                     "torch_threads": torch.get_num_threads()}


def markdown_table(results: dict[str, Any]) -> str:
    rows = [("measurement", "tokens/s", "relative cost vs dense", "target"), ("---", "---:", "---:", "---:")]
    train, dense = results["train"], results["train"]["dense_same_active"]["tokens_per_s"]
    for key, run in train.items():
        target = f"<= {TARGETS['moe_cost_vs_dense_max']}" if key.startswith("moe_") else ""
        rows.append((f"train {run['name']} {run['batch_size']} x {run['seq_len']}", f"{run['tokens_per_s']:,.0f}",
                     f"{dense / run['tokens_per_s']:.2f}", target))
    layer = results["dispatch"]
    base = layer["fwd_bwd_seconds"]["dense_mlp_same_active"]
    for key, seconds in layer["fwd_bwd_seconds"].items():
        tokens = layer["batch_size"] * layer["seq_len"]
        rows.append((f"one FFN layer fwd+bwd: {key}", f"{tokens / seconds:,.0f}", f"{seconds / base:.2f}", ""))
    hf = results["hf"]
    mfus = []
    for label, fwd in (("XLA ops", results["forward"]), ("CPU kernels", results["forward_cpu_kernels"])):
        if not isinstance(fwd, dict):
            rows.append((f"forward, {label}: {fwd}", "", "", ""))
            continue
        ratio = f"{fwd['ratio_vs_hf']:.2f}x HF ({hf['tokens_per_s']:,.0f})" if isinstance(hf, dict) else f"HF {hf}"
        rows.append((f"forward {fwd['name']} {fwd['batch_size']} x {fwd['seq_len']}, {label}",
                     f"{fwd['tokens_per_s']:,.0f}", ratio, ""))
        mfus.append(f"{label} {fwd['mfu']:.0%}")
    peak = f"matmul peak {results['matmul_peak_flops'] / 1e9:.0f} GFLOP/s; forward MFU " + ", ".join(mfus)
    if isinstance(hf, dict):
        peak += (f", HF {hf['mfu']:.0%}; at the peak end to end ours would be "
                 f"{results['forward']['ratio_vs_hf_at_peak']:.2f}x HF")
    rows.append((peak, "", "", ""))
    return markdown_rows(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(argv, __doc__, DEFAULT_OUT, "smoke-sized shapes, 2 timed steps, no HF")

    load_start = os.getloadavg()
    base = quick_config() if args.quick else mixtral_22m()
    b, t = base.data.batch_size, base.data.seq_len
    steps = 2 if args.quick else 3
    configs = train_configs(base)
    seconds = interleaved_best({key: train_runner(cfg, steps) for key, cfg in configs.items()}, REPEATS)
    train = {key: {"name": cfg.name, "config": resolved_config(cfg), "batch_size": b, "seq_len": t, "steps": steps,
                   "repeats": REPEATS, "seconds": seconds[key], "tokens_per_s": b * t * steps / seconds[key]}
             for key, cfg in configs.items()}
    ratios = {f"{key}_cost_vs_dense": seconds[key] / seconds["dense_same_active"] for key in configs}

    dispatch = bench_dispatch(base.model, b, t)

    tokens = random_tokens(base.model.vocab_size, (b, t), seed=1)
    # Two sizes: the larger square matmul ran faster in some processes, and the bound should use the best.
    peak_sizes = (QUICK_PEAK_SIZE,) if args.quick else (PEAK_SIZE, 2 * PEAK_SIZE)
    runners, peak_flops = {"ours": forward_runner(base, tokens)}, {}
    kernel_base = dataclasses.replace(base, model=dataclasses.replace(base.model, **CPU_KERNELS))
    if cpu.available():
        runners["ours_cpu_kernels"] = forward_runner(kernel_base, tokens)
    for n in peak_sizes:
        runners[f"peak_{n}"], peak_flops[n] = matmul_chain(base.model.dtype, n=n)
    hf = "skipped (--quick)" if args.quick else hf_mixtral_runner(base.model, tokens)
    if isinstance(hf, tuple):
        runners["hf"], hf = hf
    forward_seconds = interleaved_best(runners, FORWARD_REPEATS)
    peak_by_size = {n: peak_flops[n] / forward_seconds[f"peak_{n}"] for n in peak_sizes}
    peak_size = max(peak_by_size, key=peak_by_size.get)
    peak = peak_by_size[peak_size]
    flops = forward_flops_per_token(base.model, t)
    if "hf" in forward_seconds:
        hf["tokens_per_s"] = tokens.size / forward_seconds["hf"]
        hf["mfu"] = hf["tokens_per_s"] * flops / peak

    def forward_result(cfg: TrainConfig, runner: str) -> dict[str, Any]:
        ours = tokens.size / forward_seconds[runner]
        result = {"name": cfg.name, "config": resolved_config(cfg), "batch_size": b, "seq_len": t,
                  "repeats": FORWARD_REPEATS, "tokens_per_s": ours, "flops_per_token": flops, "mfu": ours * flops / peak}
        if "hf" in forward_seconds:
            result["ratio_vs_hf"] = ours / hf["tokens_per_s"]
            result["ratio_vs_hf_at_peak"] = 1.0 / hf["mfu"]  # ours at MFU 1: the most any implementation could reach
        return result

    forward = forward_result(base, "ours")
    forward_cpu_kernels = (forward_result(kernel_base, "ours_cpu_kernels") if "ours_cpu_kernels" in forward_seconds
                           else f"unavailable: {cpu.unavailable_reason()}")

    results = {
        "quick": args.quick,
        "targets": TARGETS,
        "matmul_peak_flops": peak,  # best of FORWARD_REPEATS chains of square matmuls, timed with the forwards
        "matmul_peak_size": peak_size,  # the chain size that reached it
        "matmul_peak_flops_by_size": peak_by_size,
        "train": train,
        "train_cost_vs_dense": ratios,
        "dispatch": dispatch,
        "forward": forward,  # our forward with XLA's ops
        "forward_cpu_kernels": forward_cpu_kernels,  # the same with CPU_KERNELS
        "hf": hf,
        **environment(load_start),
    }
    write_json_atomic(args.out, results)
    print(markdown_table(results))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
