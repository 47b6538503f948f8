"""Stop training on a non-finite loss, before anything bad is checkpointed."""

from __future__ import annotations

import math


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the last good checkpoint is kept untouched."""


def check_finite(loss: float, step: int, last_good_checkpoint: int | None = None) -> None:
    """Raise ``NonFiniteLossError`` if ``loss`` is NaN or +-Inf.

    Call it on every step's loss *before* saving a checkpoint for that step, so the newest
    checkpoint on disk is always from a finite-loss state.
    """
    if math.isfinite(float(loss)):
        return
    where = (
        f"the last good checkpoint (step {last_good_checkpoint}) is kept"
        if last_good_checkpoint is not None
        else "no checkpoint had been written yet"
    )
    raise NonFiniteLossError(
        f"non-finite training loss {float(loss)} at step {step}; training stopped and {where}. "
        "Lower the learning rate or check the data, then rerun the same command to resume."
    )
