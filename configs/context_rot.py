"""The context-rot study's presets (experiments/context_rot.py), as data: what to train and what to measure.

Every model starts from the `retrieval` preset (configs/presets.py) and differs only in its attention-logit
scaling and seed. Two scalings are trained, `none` and `learned` (Scalable-Softmax's s * log n). The third,
`logn` (Qwen's max(1, log n / log L_train)), is 1 at every position within the training length, so
training with it is bit-identical to training without: the `none` runs are evaluated a second time with it
switched on, as Qwen applies it, and reported as the `logn` condition. The evaluations build their episodes
(research/needles.py) at context lengths within the training length and beyond it.

  smoke  a few training steps and a handful of episodes: the test suite runs it end to end (~1 minute)
  quick  the committed figures: 2 trained scalings x 3 seeds (1250 steps) on 2 CPU cores, then every
         evaluation, within 15 minutes
  full   longer training, longer contexts, more episodes per cell: for an accelerator
"""

from __future__ import annotations

import dataclasses

from models.config import ConfigError
from research.sweep import Grid, Sweep, zip_axis

TRAINED = ("none", "learned")  # attention-logit scalings trained; `logn` is evaluated on the `none` runs


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    train_length: int  # L_train: data.seq_len of every training run
    sweep: Sweep
    lengths: tuple[int, ...]  # context lengths (prompt tokens) of the length sweeps, within and beyond L_train
    examples: int  # episodes per cell
    depths: tuple[float, ...] = tuple(i / 10 for i in range(11))
    distractors: tuple[int, ...] = (0, 1, 4, 8)
    items: tuple[int, ...] = (10, 20, 30)  # lost in the middle: facts in the context
    item_tokens: int = 20  # context tokens per item (a fact and its share of filler)
    gold_positions: int = 5  # positions of the gold item per k, evenly spaced from first to last
    effective_fraction: float = 0.85  # RULER: effective length scores at least this share of the shortest length's
    learned_bar: float = 0.9  # in-distribution accuracy at the shortest length for "the task was learned"
    batch: int = 32  # episodes per forward pass

    def __post_init__(self) -> None:
        if any(n < 16 for n in self.lengths) or list(self.lengths) != sorted(set(self.lengths)):
            raise ConfigError(f"lengths={self.lengths}: expected increasing lengths of at least 16 tokens")
        if self.examples < 1:
            raise ConfigError(f"examples={self.examples}: expected a positive integer")


def sweep(name: str, train_length: int, overrides: tuple[str, ...], seeds: tuple[int, ...],
          scalings: tuple[str, ...] = TRAINED) -> Sweep:
    return Sweep(name, "retrieval", (f"data.seq_len={train_length}", f"model.logit_scaling_length={train_length}",
                                     *overrides),
                 (Grid("scaling", (zip_axis(scalings, model__attention_logit_scaling=scalings),), seeds=seeds),))


def smoke() -> Study:
    return Study("context-rot-smoke", 64,
                 sweep("context-rot-smoke", 64, ("steps=8", "log_every=4", "eval_every=8", "eval_batches=1",
                                                 "checkpoint_every=8", "data.batch_size=4", "data.max_bytes=400000",
                                                 "model.max_seq_len=256"),
                       (0,)),
                 lengths=(32, 64, 128), examples=2, depths=(0.0, 0.5, 1.0), distractors=(0, 1),
                 items=(2, 3), item_tokens=24, gold_positions=2, batch=8)


def quick() -> Study:
    return Study("context-rot-quick", 128, sweep("context-rot-quick", 128, ("steps=1250",), (0, 1, 2)),
                 lengths=(32, 64, 128, 256, 512), examples=16, item_tokens=10)


def full() -> Study:
    return Study("context-rot-full", 1024,
                 sweep("context-rot-full", 1024, ("steps=10000", "model.d_model=256", "model.num_layers=4",
                                                  "model.num_heads=8", "model.num_kv_heads=8", "model.d_ff=1024",
                                                  "model.max_seq_len=8192", "data.batch_size=32",
                                                  "checkpoint_every=2000", "eval_every=1000"), (0, 1, 2)),
                 lengths=(128, 256, 512, 1024, 2048, 4096, 8192), examples=64, item_tokens=30)


STUDIES = {"smoke": smoke, "quick": quick, "full": full}


def get_study(preset: str) -> Study:
    if preset not in STUDIES:
        raise ConfigError(f"--preset={preset!r}: expected one of {', '.join(STUDIES)}")
    return STUDIES[preset]()
