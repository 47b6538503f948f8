"""Human-readable progress lines: step, named metrics, steps/s and ETA."""

from __future__ import annotations

import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """``3725.0 -> '1h02m05s'``, ``65 -> '1m05s'``, ``7.2 -> '7s'``."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class ProgressLogger:
    """Formats ``step 120/1000 | loss 2.310 | bpc 3.333 | 4.21 steps/s | ETA 3m29s``.

    The rate is measured between consecutive calls to ``line`` (so compile time only affects
    the first line), the ETA is ``(total - step) / rate``.
    """

    def __init__(
        self, total_steps: int, start_step: int = 0, clock: Callable[[], float] = time.monotonic
    ):
        self.total_steps = total_steps
        self._clock = clock
        self._last_step = start_step
        self._last_time = clock()

    def line(self, step: int, metrics: dict[str, float]) -> str:
        now = self._clock()
        elapsed = now - self._last_time
        rate = (step - self._last_step) / elapsed if elapsed > 0 else float("nan")
        self._last_step, self._last_time = step, now
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {float(v):.4g}" for k, v in metrics.items()]
        parts.append(f"{rate:.3g} steps/s")
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        parts.append("ETA " + (format_duration(eta) if eta == eta else "?"))
        return " | ".join(parts)
