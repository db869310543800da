"""Ahead-of-time compilation for a named target, from this CPU host: does a config's train step (and its
decode step) fit the target's devices, and how much memory and work per device does it take?

    python -m research.aot --config llama-100m --target v5e:2x2 [--mesh data=2,fsdp=2] [--set KEY=VALUE ...]

The steps are the ones training and decoding run: `research/train_step.build_steps` on a mesh of the
target's compile-only devices (research/aot_targets.py), and `decoding/steps.decode_step` on
`data.batch_size` rows with a cache of `model.max_seq_len` slots, with the model config resolved for the
target's backend. Per device it prints `compiled.memory_analysis()` (arguments, outputs, what outputs reuse
of the donated arguments, temporaries, generated code; total = arguments + outputs - aliased + temporaries +
code) against the chip's HBM (research/devices.py), XLA's FLOPs (`cost_analysis()`; loop bodies such as the
chunked LM head's are counted once, and the GPU compiler reports none) beside the model's
(research/flops.py), and the compile time. Exit status 2 with one line when a program does not fit: the TPU
compiler refuses it itself, the GPU compiler does not (compare with HBM; note also that JAX's GPU client
takes 75% of memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise), or when the target cannot be
compiled for here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Callable, Sequence

from research import aot_targets
from research.cli import ArgumentParser
from research.devices import GiB

MiB = 2**20

MESH_KEYS = ("data", "fsdp", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program, per device."""

    name: str
    arguments: int
    outputs: int
    aliased: int  # outputs that reuse donated argument buffers
    temporaries: int
    code: int
    xla_flops: float | None
    model_flops: float
    compile_s: float

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def memory_report(name: str, stats: Any, xla_flops: float | None, model_flops: float,
                  compile_s: float) -> ProgramReport:
    """From a `compiled.memory_analysis()` (or anything with its *_size_in_bytes attributes)."""
    return ProgramReport(name, stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
                         stats.temp_size_in_bytes, stats.generated_code_size_in_bytes, xla_flops, model_flops,
                         compile_s)


def does_not_fit(reports: Sequence[ProgramReport], hbm_bytes: int, where: str) -> str | None:
    """The one-line reason the first program over `hbm_bytes` does not fit, or None when all fit."""
    for r in reports:
        if r.total > hbm_bytes:
            return (f"the {r.name} step needs {r.total / GiB:.2f} GiB per device, more than the "
                    f"{hbm_bytes / GiB:.0f} GiB of HBM of {where}")
    return None


def parse_mesh(text: str) -> list[str]:
    """'data=2,fsdp=2' -> config overrides ['mesh.data=2', 'mesh.fsdp=2']; the sizes are checked by MeshConfig."""
    overrides = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in MESH_KEYS:
            raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS one of "
                             f"{', '.join(MESH_KEYS)}, e.g. data=2,fsdp=2")
        overrides.append(f"mesh.{key.strip()}={value.strip()}")
    return overrides


def first_line(error: BaseException, limit: int = 300) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return text if len(text) <= limit else text[:limit] + "..."


def _xla_flops(compiled: Any) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # one dict per program in some jax versions
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def _compile(name: str, lower: Callable[[], Any], model_flops: float) -> ProgramReport:
    start = time.perf_counter()
    compiled = lower().compile()
    seconds = time.perf_counter() - start
    return memory_report(name, compiled.memory_analysis(), _xla_flops(compiled), model_flops, seconds)


def compile_programs(cfg: Any, devices: list[Any]) -> list[ProgramReport]:
    """Lowers and compiles the train and decode steps of `cfg` (resolved for the devices' backend) for
    `devices`, on the mesh cfg.mesh asks for."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from decoding.steps import decode_step
    from models.kv_cache import init_cache
    from models.sharding import DEFAULT_RULES, sharding_for
    from models.transformer import prepare_params
    from research.flops import forward_flops_per_token, train_flops_per_token
    from research.mesh import make_mesh
    from research.train_step import build_steps

    mesh = make_mesh(cfg.mesh, devices)
    n, model = len(devices), cfg.model
    steps = build_steps(cfg, mesh, DEFAULT_RULES)
    batch = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), jnp.int32,
                                 sharding=steps.batch_sharding)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    train = _compile("train", lambda: steps.train.lower(steps.abstract_state, batch),
                        train_flops_per_token(model, cfg.data.seq_len) * tokens / n)

    def sharded(shapes: Any, shardings: Any) -> Any:
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    rows, slots = cfg.data.batch_size, model.max_seq_len
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        # Decoding first prepares the params (cast to the compute dtype) once; where the compiler puts the
        # prepared weights is the decode step's input layout.
        prepare = jax.jit(lambda p: prepare_params(p, model, rows), in_shardings=(steps.state_sharding.params,))
        prepared_compiled = prepare.lower(steps.abstract_state.params).compile()
        prepared = sharded(jax.eval_shape(prepare, steps.abstract_state.params), prepared_compiled.output_shardings)
        cache_shapes = jax.eval_shape(lambda: init_cache(model, rows, slots))
        # k, v [B, S, K, H]: rows over the batch axes, kv heads over tensor; lengths [B].
        names = {4: ("batch", "length", "act_heads", None), 1: ("batch",)}
        cache_sharding = jax.tree.map(
            lambda s: sharding_for(names[s.ndim], s.shape, mesh) if s.ndim in names else NamedSharding(mesh, P()),
            cache_shapes)
        token_sharding = sharding_for(("batch",), (rows,), mesh)
        logits_sharding = sharding_for(("batch", "act_vocab"), (rows, model.vocab_size), mesh)
        step = jax.jit(lambda p, t, c: decode_step(p, model, t, c),
                       in_shardings=(prepared_compiled.output_shardings, token_sharding, cache_sharding),
                       out_shardings=(logits_sharding, cache_sharding), donate_argnums=(2,))
        abstract = (prepared, jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=token_sharding),
                    sharded(cache_shapes, cache_sharding))
        # Model FLOPs of one token per row attending to every slot (the step's largest cost).
        decode = _compile("decode", lambda: step.lower(*abstract), forward_flops_per_token(model, slots) * rows / n)
    return [train, decode]


def _size(x: int) -> str:
    return f"{x / GiB:.2f}G" if x >= GiB else f"{x / MiB:.1f}M"


def format_table(reports: Sequence[ProgramReport], hbm_bytes: int) -> str:
    header = (f"{'program':8} {'args':>7} {'outputs':>7} {'aliased':>7} {'temps':>7} {'code':>6} {'total':>7} "
              f"{'of HBM':>7} {'fits':>4} {'XLA FLOPs':>10} {'model FLOPs':>11} {'compile':>8}")
    lines = [header + "   (bytes and FLOPs per device)"]
    for r in reports:
        xla = f"{r.xla_flops:.3g}" if r.xla_flops is not None else "n/a"
        lines.append(f"{r.name:8} {_size(r.arguments):>7} {_size(r.outputs):>7} {_size(r.aliased):>7} "
                     f"{_size(r.temporaries):>7} {_size(r.code):>6} {_size(r.total):>7} "
                     f"{100 * r.total / hbm_bytes:>6.0f}% {'yes' if r.total <= hbm_bytes else 'no':>4} "
                     f"{xla:>10} {r.model_flops:>11.3g} {r.compile_s:>7.1f}s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m research.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a preset name (configs/presets.py)")
    parser.add_argument("--target", required=True, help=aot_targets.TARGET_FORMS)
    parser.add_argument("--mesh", default="", help="mesh axis sizes, e.g. data=2,fsdp=2 (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    try:
        target = aot_targets.parse_target(args.target)
        mesh_overrides = parse_mesh(args.mesh)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    missing = aot_targets.toolchain_missing(target.platform)
    if missing:
        parser.exit(2, f"{parser.prog}: error: {missing}\n")

    aot_targets.prepare_environment(target)  # before jax starts
    with aot_targets.quiet_native_logs():
        import jax

        jax.devices()  # starts the (CPU) backend now, while the CUDA plugin's start-up notices are dropped
        from configs.presets import get_config
        from research.config import apply_overrides
    try:
        cfg = apply_overrides(get_config(args.config), list(args.set) + mesh_overrides)
        cfg = dataclasses.replace(cfg, model=cfg.model.resolved(target.platform))  # "auto" as the target runs it
        with aot_targets.quiet_native_logs():
            devices = aot_targets.topology_devices(target)
        from research.mesh import mesh_shape
        shape = dict(zip(MESH_KEYS, mesh_shape(cfg.mesh, len(devices))))
    except ValueError as e:  # a bad config, override or mesh (ConfigError is a ValueError)
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except Exception as e:  # the toolchain refused the target
        parser.exit(2, f"{parser.prog}: error: target {args.target}: {first_line(e)}\n")

    hbm = target.accelerator.hbm_bytes
    where = (f"{len(devices)} x {devices[0].device_kind} ({args.target}), "
             f"mesh {','.join(f'{k}={v}' for k, v in shape.items())}")
    try:
        reports = compile_programs(cfg, devices)
    except Exception as e:
        reason = first_line(e)
        if "RESOURCE_EXHAUSTED" in reason:  # the TPU compiler's own out-of-memory verdict
            parser.exit(2, f"{parser.prog}: error: {args.config} does not fit {where}: {reason}\n")
        parser.exit(2, f"{parser.prog}: error: compiling {args.config} for {where} failed: {reason}\n")

    if args.json:
        print(json.dumps({"config": args.config, "target": args.target, "device_kind": devices[0].device_kind,
                          "num_devices": len(devices), "mesh": shape, "hbm_bytes": hbm,
                          "programs": [{**dataclasses.asdict(r), "total": r.total, "fits": r.total <= hbm}
                                       for r in reports]}))
    else:
        print(f"{args.config} on {where}: {hbm / GiB:.0f} GiB HBM per device")
        print(format_table(reports, hbm))
    reason = does_not_fit(reports, hbm, where)
    if reason:
        parser.exit(2, f"{parser.prog}: error: {reason}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
