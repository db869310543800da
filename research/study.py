"""What every one-command study (experiments/routing_collapse.py, experiments/context_rot.py) writes the same
way: figures as PNG + PDF, text files, per-condition statistics over seeds, and the record's header.

Every file goes through a temp file and a rename, so an interrupted study never leaves half a file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from research.run_record import library_versions  # noqa: E402


def save_figure(fig: plt.Figure, out: Path, name: str) -> list[str]:
    """Writes out/name.png (small, for the repo) and out/name.pdf; returns the PNG path."""
    out.mkdir(parents=True, exist_ok=True)
    for ext, dpi in (("png", 80), ("pdf", None)):
        tmp = out / f".{name}.tmp.{ext}"
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext)
        os.replace(tmp, out / f"{name}.{ext}")
    plt.close(fig)
    return [str(out / f"{name}.png")]


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def seed_stats(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample std over seeds; 0 for one seed), min and max."""
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def record_header(study: str, preset: str, argv: Sequence[str] | None, wall_seconds: float) -> dict[str, Any]:
    """The fields every study's summary.json starts with: what ran, how long, with which versions."""
    import jax

    return {"preset": preset, "command": " ".join([f"python -m experiments.{study}", *(argv if argv is not None
                                                                                       else sys.argv[1:])]),
            "wall_seconds": wall_seconds, "versions": {**library_versions(), "backend": jax.default_backend()}}
