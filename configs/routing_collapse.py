"""The routing-collapse study's sweeps (experiments/routing_collapse.py), as data.

Every cell starts from the `micro-moe` preset: dropless top-1 routing with no balancing term, so each
condition switches on exactly the mechanism it tests. Condition labels are what the figures and the
summary group by; the capacity grid zips the train and eval capacity factors, so validation loss is
measured with the capacity the run trained with.

  smoke  2 cells, 12 steps: the test suite runs it end to end
  quick  the README's main job: the headline remedies over 2 seeds, the alpha trade-off and the
         capacity factor at 300 steps (about 15 minutes on 2 CPU cores)
  full   the whole grid (E in {8, 16}, top-1 and top-2, 3 seeds, 1000 steps): an accelerator
         or a long CPU run
"""

from __future__ import annotations

from models.config import ConfigError
from research.sweep import Grid, Option, Sweep, axis, zip_axis

NONE = "none"  # the condition every remedy is compared with


def option(label: str, *overrides: str) -> Option:
    return label, tuple(overrides)


def switch(alpha: float) -> Option:
    return option(f"switch {alpha:g}", f"model.moe.switch_loss_weight={alpha}")


def bias(rate: float) -> Option:
    return option(f"bias {rate:g}", f"model.moe.bias_update_rate={rate}")


# Shazeer et al. start both router matrices at zero and use loss weights of 0.1 for their LMs.
NOISY = ("model.moe.router=noisy", "model.moe.zero_init_router=true")
NOISY_WITH_LOSSES = option("noisy + losses", *NOISY, "model.moe.importance_loss_weight=0.1",
                           "model.moe.load_loss_weight=0.1")
NOISY_ONLY = option("noisy", *NOISY)
Z_LOSS = option("z-loss 1e-3", "model.moe.z_loss_weight=1e-3")

# Balancing remedies: the summary checks each of these brings max/mean load below 2.
HEADLINE = (option(NONE), switch(1e-2), NOISY_WITH_LOSSES, bias(1e-3))
CAPACITY_FACTORS = (1.0, 1.25, 2.0)


def capacity_axis(factors: tuple[float, ...]) -> tuple[Option, ...]:
    return zip_axis([f"capacity {f:g}" for f in factors], model__moe__capacity_factor=factors,
                    model__moe__eval_capacity_factor=factors)


def smoke() -> Sweep:
    return Sweep("routing-collapse-smoke", "micro-moe",
                 ("steps=12", "log_every=4", "eval_every=12", "eval_batches=2", "checkpoint_every=6",
                  "data.max_bytes=200000", "data.tokenizer=bpe", "model.vocab_size=384", "data.batch_size=8",
                  "data.seq_len=32"),
                 (Grid("headline", ((option(NONE), switch(1e-2)),)),))


def quick() -> Sweep:
    return Sweep("routing-collapse-quick", "micro-moe", (), (
        Grid("headline", (HEADLINE,), seeds=(0, 1)),
        Grid("alpha", ((switch(1e-3), switch(1e-1), bias(1e-2)),)),
        Grid("capacity", ((option(NONE), switch(1e-2)), capacity_axis(CAPACITY_FACTORS))),
    ))


def full() -> Sweep:
    conditions = (option(NONE), *(switch(a) for a in (1e-4, 1e-3, 1e-2, 1e-1)), NOISY_ONLY, NOISY_WITH_LOSSES,
                  Z_LOSS, *(bias(u) for u in (1e-4, 1e-3, 1e-2)))
    shape = (axis("model.moe.num_experts", (8, 16), "E"), axis("model.moe.top_k", (1, 2), "top"))
    return Sweep("routing-collapse-full", "micro-moe", ("steps=1000", "checkpoint_every=250"), (
        Grid("headline", (conditions,), seeds=(0, 1, 2)),
        Grid("capacity", ((option(NONE), switch(1e-2)), capacity_axis(CAPACITY_FACTORS)), seeds=(0, 1, 2)),
        Grid("shape", (conditions, *shape), seeds=(0, 1, 2)),
    ))


SWEEPS = {"smoke": smoke, "quick": quick, "full": full}


def get_sweep(preset: str) -> Sweep:
    if preset not in SWEEPS:
        raise ConfigError(f"--preset={preset!r}: expected one of {', '.join(SWEEPS)}")
    return SWEEPS[preset]()
