"""Orbax checkpointing of a train-state pytree plus JSON metadata (e.g. the data position).

Every restore goes through an abstract target (``jax.eval_shape`` output or the live state) so
optax NamedTuple states, shardings and dtypes come back exactly as saved.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A small wrapper around ``ocp.CheckpointManager``.

    A checkpoint at ``step`` holds two items: ``state`` (any pytree of arrays: params, optimizer
    and mask state, RNG, memories, ...) and ``meta`` (a JSON-serialisable dict, e.g. the data
    position). Usage::

        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(abstract_state)
        ckpt.save(step, state, {"position": 17})
        ckpt.close()
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = True) -> None:
        """Save ``state`` and ``meta`` as checkpoint ``step`` (asynchronous; see ``wait``)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
        )
        self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore ``(state, meta)`` at ``step`` (default: latest) onto ``abstract_state``.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings) or live arrays
            with the structure of the saved state.
          step: which checkpoint; None means the latest.

        Raises:
          FileNotFoundError: if there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(_as_abstract, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
