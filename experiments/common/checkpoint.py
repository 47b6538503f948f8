"""Orbax checkpointing of a train-state pytree plus JSON metadata (e.g. the data position).

Every restore goes through an abstract target (``jax.eval_shape`` output or the live state) so
optax NamedTuple states, shardings and dtypes come back exactly as saved.

Failure handling:

* **A corrupt checkpoint costs one checkpoint.** :meth:`Checkpointer.restore_latest` tries the
  checkpoints newest first; those that do not restore (truncated or flipped bytes, a deleted
  item, an empty step directory, a missing ``_METADATA``) or restore with non-finite values,
  newer than the one that does, are reported and moved aside as ``<step>.corrupt`` (never
  deleted). With none restorable it raises :class:`CheckpointError` naming the directory and
  moves nothing (they may be incompatible rather than corrupt).
* **A failed save surfaces at that save.** :meth:`Checkpointer.save` waits for the write to land;
  on failure (e.g. disk full) the partial ``<step>.orbax-checkpoint-tmp-*`` directory is removed,
  the previous checkpoint stays intact and :class:`CheckpointError` says so.
  :meth:`Checkpointer.check_free_space` fails before training when a checkpoint cannot fit.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.common.guard import nonfinite_paths
from topkast_jax.state import legacy_format, packing_changed, without_key_history
from topkast_jax.tree import path_name

#: Suffix of a checkpoint directory moved aside because it does not restore.
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(RuntimeError):
    """No checkpoint restores, or a checkpoint could not be written."""


class Checkpointer:
    """A small wrapper around ``ocp.CheckpointManager``.

    A checkpoint at ``step`` holds two items: ``state`` (any pytree of arrays: params, optimizer
    and mask state, RNG, memories, ...) and ``meta`` (a JSON-serialisable dict, e.g. the data
    position). Usage::

        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
        restored = ckpt.restore_latest(abstract_state)  # None if there is no checkpoint
        ckpt.save(step, state, {"position": 17})
        ckpt.close()

    Args:
      directory: where the numbered step directories live.
      max_to_keep: how many of the newest checkpoints to keep (>= 1).
      primary: whether this process may move corrupt checkpoints aside and remove partial ones
        (one process of a multi-process run; ``mesh.is_primary()``).
    """

    def __init__(self, directory: str, max_to_keep: int = 2, primary: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        self.primary = primary
        self._failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = True) -> None:
        """Save ``state`` and ``meta`` as checkpoint ``step`` and wait until it is on disk.

        Raises:
          CheckpointError: the write failed (e.g. no space left); the partial directory is
            removed and the previous checkpoint is left as it was.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
        )
        try:
            self._manager.save(step, args=args, force=force)
            self._manager.wait_until_finished()
        except Exception as e:  # orbax/TensorStore raise many types; all mean "not saved"
            self._failed = True
            self._remove_partial(step)
            previous = [s for s in self.all_steps() if s < step]
            kept = f"checkpoint {previous[-1]} is intact" if previous else "no checkpoint exists"
            raise CheckpointError(
                f"saving checkpoint {step} in {self.directory} failed ({_reason(e)}); the partial "
                f"checkpoint was removed and {kept}. Fix the cause (e.g. free disk space), then "
                "rerun the same command to resume."
            ) from e

    def _remove_partial(self, step: int) -> None:
        if not self.primary:
            return
        for path in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(path, ignore_errors=True)
        try:
            self._manager.reload()
        except Exception:  # a manager that failed mid-save may not reload; the files are clean
            pass

    def check_free_space(self, state: Any, slack: float = 1.1) -> None:
        """Fail now if the disk cannot hold one more checkpoint of ``state`` (``slack`` × its
        array bytes), rather than after training up to the first save.

        Raises:
          CheckpointError: naming the directory, the free and the needed bytes.
        """
        needed = slack * sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
        )
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointError(
                f"only {free / 2**20:.1f} MiB free in {self.directory}, a checkpoint needs about "
                f"{needed / 2**20:.1f} MiB; free some space, then rerun the same command."
            )

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
        self._check_format(step, target)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], dict(restored["meta"])

    def _check_format(self, step: int, target: Any) -> None:
        """Raise :class:`CheckpointError` naming the format when checkpoint ``step`` holds an
        optimizer state of an older topkast-jax format (it would fail with a structure error)."""
        reader = ocp.StandardCheckpointer()
        try:
            saved = reader.metadata(os.path.join(self.directory, str(step), "state")).item_metadata
        except Exception:  # no readable metadata: the restore itself reports what is wrong
            return
        finally:
            reader.close()
        saved_paths, target_paths = _paths(saved), _paths(target)
        problem = (
            legacy_format(saved_paths, target_paths)
            or without_key_history(saved_paths, target_paths)
            or packing_changed(_shapes(saved), _shapes(target))
        )
        if problem:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot restore: {problem}"
            )

    def restore_latest(
        self, abstract_state: Any, log: Callable[[str], None] = print
    ) -> tuple[Any, dict[str, Any]] | None:
        """``(state, meta)`` of the newest checkpoint that restores with finite values.

        Checkpoints are tried newest first. Those newer than the one that restores are corrupt:
        each is logged with its reason and moved aside to ``<step>.corrupt`` (never deleted). An
        empty step directory holds nothing and is always moved aside. When no checkpoint
        restores, nothing else is moved: they may be incompatible (written by other code or for
        another config) rather than corrupt.

        Returns:
          None if the directory holds no checkpoint (or only empty step directories).

        Raises:
          CheckpointError: there are checkpoints but none restores (the message names the
            directory and each checkpoint's reason).
        """
        failures: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            if not os.listdir(os.path.join(self.directory, str(step))):
                failures.append((step, "empty step directory"))
                continue
            try:
                state, meta = self.restore(abstract_state, step)
                bad = nonfinite_paths(state)
                if bad:
                    raise ValueError(f"non-finite values in {', '.join(bad[:3])}")
            except Exception as e:  # any failure to read means this checkpoint is unusable
                failures.append((step, _reason(e)))
                continue
            self._set_aside(failures, log)
            return state, meta
        self._set_aside([f for f in failures if f[1] == "empty step directory"], log)
        if all(reason == "empty step directory" for _, reason in failures):
            return None
        reasons = "; ".join(f"step {step}: {reason}" for step, reason in failures)
        raise CheckpointError(
            f"no checkpoint in {self.directory} restores ({reasons}). If the code or the config "
            "changed since they were written they may be incompatible rather than corrupt; "
            "otherwise start over with a new --workdir (or delete this one)."
        )

    def _set_aside(self, failures: list[tuple[int, str]], log: Callable[[str], None]) -> None:
        for step, reason in failures:
            moved = self._move_aside(step)
            log(
                f"checkpoint {step} in {self.directory} does not restore ({reason}); "
                f"moved aside to {moved}"
            )

    def _move_aside(self, step: int) -> str:
        source = os.path.join(self.directory, str(step))
        target = source + CORRUPT_SUFFIX
        if self.primary and os.path.exists(source):
            n = 1
            while os.path.exists(target):
                n, target = n + 1, f"{source}{CORRUPT_SUFFIX}{n + 1}"
            os.rename(source, target)
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager (after a failed save, which was already
        reported by :meth:`save`, without raising again)."""
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        except Exception:
            if not self._failed:
                raise


def _reason(e: BaseException, limit: int = 400) -> str:
    """``"Type: first line"``, long lines cut in the middle (the OS error is at the end)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(first) > limit:
        first = first[: limit // 3] + " ... " + first[-(2 * limit) // 3 :]
    return f"{type(e).__name__}: {first}"


def _paths(tree: Any) -> list[str]:
    """``"a/b/c"`` key paths of every leaf of ``tree``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [path_name(path) for path, _ in flat]


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``"a/b/c"`` key path → shape of every leaf of ``tree`` that has one (arrays, abstract
    arrays, orbax array metadata)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        path_name(path): tuple(x.shape) for path, x in flat if getattr(x, "shape", None) is not None
    }


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
