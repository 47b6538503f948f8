"""Stop training on a non-finite loss or state, before anything bad is checkpointed."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


class NonFiniteLossError(FloatingPointError):
    """The training loss or state became NaN or Inf; the last good checkpoint is kept untouched."""


def _kept(last_good_checkpoint: int | None) -> str:
    if last_good_checkpoint is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {last_good_checkpoint}) is kept"


def _advice(hint: str) -> str:
    return (
        " Training is deterministic: rerunning the same command resumes from that checkpoint and "
        f"repeats the divergence. Start a new --workdir with {hint}."
    )


DEFAULT_HINT = "a lower learning rate or a longer warmup, or check the data"


def check_finite(
    loss: float, step: int, last_good_checkpoint: int | None = None, hint: str = DEFAULT_HINT
) -> None:
    """Raise ``NonFiniteLossError`` if ``loss`` is NaN or +-Inf.

    Call it on every step's loss *before* saving a checkpoint for that step, so the newest
    checkpoint on disk is always from a finite-loss state.
    """
    if math.isfinite(float(loss)):
        return
    raise NonFiniteLossError(
        f"non-finite training loss {float(loss)} at step {step}; training stopped and "
        f"{_kept(last_good_checkpoint)}." + _advice(hint)
    )


def nonfinite_paths(tree: Any) -> list[str]:
    """Paths (``"params/Dense_0/kernel"``) of the floating leaves of ``tree`` holding NaN or Inf.

    One reduction per leaf on the device; only the per-leaf flags come to the host.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    floating = [(path, x) for path, x in flat if jnp.issubdtype(x.dtype, jnp.floating)]
    flags = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in floating])
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in floating]
    return [name for name, ok in zip(names, flags, strict=True) if not ok]


def check_state_finite(
    state: Any, step: int, last_good_checkpoint: int | None = None, hint: str = DEFAULT_HINT
) -> None:
    """Raise ``NonFiniteLossError`` if any floating leaf of ``state`` (params, optimizer state,
    ...) holds NaN or Inf. Call it right before saving ``state``: the loss is computed *before*
    an update, the saved weights come *after* it, so a finite loss does not make a finite state.
    """
    bad = nonfinite_paths(state)
    if not bad:
        return
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    raise NonFiniteLossError(
        f"non-finite values in the train state at step {step} ({shown}); it was not saved and "
        f"{_kept(last_good_checkpoint)}." + _advice(hint)
    )
