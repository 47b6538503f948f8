"""Progress lines that tell the truth: the training rate counts training time only, and the ETA
includes the evaluation still to come.

Wall time is split into *training* time and *excluded* time — whatever runs inside
``with progress.excluded(kind):`` (compilation of the first step, evaluation, checkpoints).
The rate is ``steps / training seconds``; the ETA is

    remaining_steps / rate  +  remaining_eval_units × seconds_per_eval_unit,

where the cost of one evaluation *unit* (a batch or a window of the held-out split, as the trainer
counts them) is that of the latest evaluation — or of the first while it is the only one, which
also paid for compiling the evaluation step, so the first estimate errs long — and
``eval_units_after(step)`` says how many units are still to run when training is at ``step``
(the periodic ones at ``step`` and later — a progress line comes before its step's evaluation —
and the final evaluation). Before the first evaluation has been timed the line says
``+ eval ?``.

Each call to :meth:`ProgressLogger.line` returns one plain line (no carriage returns, no colour), so
the output reads the same on a terminal and in a cluster log file.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


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
    """Formats ``step 120/1000 | loss 2.310 | 4.21 steps/s | ETA 3m29s (eval 40s)``.

    Args:
      total_steps: the step training ends at.
      start_step: the step training starts (or resumes) from.
      eval_units_after: ``step -> units`` of evaluation still to run when training is at ``step``
        (None: no evaluation is planned).
      clock: seconds, monotonic (``time.monotonic``; tests inject a fake clock).
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        eval_units_after: Callable[[int], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps = total_steps
        self._eval_units_after = eval_units_after or (lambda step: 0.0)
        self._clock = clock
        self._excluded = 0.0  # seconds inside `excluded` since the start
        self._excluded_by_kind: dict[str, float] = {}
        self._eval_timings: list[tuple[float, float]] = []  # (seconds, units) per evaluation
        self._start_time = clock()
        self._start_step = start_step
        self._last = (start_step, self._start_time, 0.0)  # step, time, excluded at last line
        self.steps_per_second = float("nan")

    @contextlib.contextmanager
    def excluded(self, kind: str, eval_units: float = 0.0) -> Iterator[None]:
        """Time spent inside is not training time. ``kind="eval"`` with ``eval_units`` > 0 also
        measures the cost of one evaluation unit for the ETA (the latest evaluation counts)."""
        t0 = self._clock()
        try:
            yield
        finally:
            dt = self._clock() - t0
            self._excluded += dt
            self._excluded_by_kind[kind] = self._excluded_by_kind.get(kind, 0.0) + dt
            if kind == "eval" and eval_units > 0:
                self._eval_timings.append((dt, float(eval_units)))

    def excluded_seconds(self) -> dict[str, float]:
        """Seconds spent so far in each excluded kind (``{"compile": ..., "eval": ...}``)."""
        return dict(self._excluded_by_kind)

    def training_seconds(self) -> float:
        """Wall seconds since the start minus the excluded time."""
        return self._clock() - self._start_time - self._excluded

    def rate(self) -> float:
        """Steps per training second since the start (nan before any step or time passed)."""
        steps = self._last[0] - self._start_step
        seconds = self._last[1] - self._start_time - self._last[2]
        return steps / seconds if steps > 0 and seconds > 0 else float("nan")

    def eta_seconds(self, step: int) -> tuple[float, float | None]:
        """``(training seconds left, evaluation seconds left or None if not yet measurable)``."""
        rate = self.rate()
        train = (self.total_steps - step) / rate if rate == rate else float("nan")
        units = float(self._eval_units_after(step))
        if units <= 0:
            return train, 0.0
        if not self._eval_timings:
            return train, None
        seconds, done = self._eval_timings[-1]
        return train, units * seconds / done

    def interval_rate(self, step: int) -> float:
        """Steps per training second since the previous :meth:`line` (nan if no time passed)."""
        last_step, last_time, last_excluded = self._last
        seconds = (self._clock() - last_time) - (self._excluded - last_excluded)
        return (step - last_step) / seconds if seconds > 0 else float("nan")

    def line(self, step: int, metrics: dict[str, float]) -> str:
        """The progress line at ``step``; also sets :attr:`steps_per_second`, the rate over the
        interval since the previous line (training time only), for logging as throughput."""
        self.steps_per_second = self.interval_rate(step)
        self._last = (step, self._clock(), self._excluded)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {float(v):.4g}" for k, v in metrics.items()]
        parts.append(f"{self.steps_per_second:.3g} steps/s")
        train, evaluation = self.eta_seconds(step)
        if train != train:
            eta = "ETA ?"
        elif evaluation is None:
            eta = f"ETA {format_duration(train)} + eval ?"
        elif evaluation > 0:
            eta = f"ETA {format_duration(train + evaluation)} (eval {format_duration(evaluation)})"
        else:
            eta = f"ETA {format_duration(train)}"
        parts.append(eta)
        return " | ".join(parts)
