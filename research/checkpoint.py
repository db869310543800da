"""Checkpoints with orbax's CheckpointManager.

Orbax writes each step into a temporary directory and renames it into place only once complete, so a
process killed mid-save leaves the previous checkpoints intact and `latest_step` never sees the partial
one. The data order is a pure function of the step, so the train state is all a resume needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Starts an (asynchronous) save of `state` at `step`; a second save of the same step is a no-op."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores into the structure, dtypes and shardings of `abstract_state` (ShapeDtypeStructs)."""
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the params (e.g. for decoding): from a train state, or from a params-only checkpoint
        ({"params": ...}, as research/convert.py writes). The optimizer state is never read."""
        target = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        return self._manager.restore(step, args=args)["params"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
