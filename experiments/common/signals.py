"""SIGTERM / SIGINT (cluster preemption, Ctrl-C): finish the step, checkpoint, exit non-zero.

The first signal only sets a flag: the training loop finishes its current step, saves a checkpoint
and raises :class:`Interrupted`, which the launcher turns into one line saying where to resume and
exit status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT). A second signal exits at once
(``os._exit``), as a crash would; rerunning resumes from the newest checkpoint either way.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

import numpy as np

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class StopSignals:
    """Context manager installing the handlers (main thread only; elsewhere a no-op).

    ``received`` is the first signal's number (None before); :meth:`should_stop` is what the loop
    polls; in a multi-process run the processes agree (one stops, all stop) at the steps where
    they poll together.
    """

    def __init__(self, log: Callable[[str], None] = _log):
        self.received: int | None = None
        self._log = log
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            self._log(
                f"received {name}: finishing the current step and saving a checkpoint "
                f"(send {name} again to exit at once)"
            )
            return
        self._log(f"received {name} again: exiting at once")
        os._exit(128 + signum)

    def should_stop(self) -> bool:
        """Whether a signal arrived here (or, with several processes, in any process; all
        processes must call this at the same steps)."""
        import jax

        local = self.received is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

    def interrupted(self, step: int, checkpoint_dir: str, saved: bool = True) -> Interrupted:
        """The exception to raise once checkpoint ``step`` is saved in ``checkpoint_dir``
        (``saved=False``: stopped before training a step, nothing new to save)."""
        signum = self.received if self.received is not None else signal.SIGTERM
        name = signal.Signals(signum).name
        where = f"checkpoint {step} is in {checkpoint_dir}" if saved else "nothing new to save"
        if not saved and os.path.isdir(os.path.join(checkpoint_dir, str(step))):
            where = f"nothing new to save; checkpoint {step} is in {checkpoint_dir}"
        return Interrupted(
            signum, f"stopped by {name} at step {step}; {where}. Rerun the same command to resume."
        )
