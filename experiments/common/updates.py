"""The trainers' update: one jitted train step and, at Top-KAST's ``refresh_every = N > 1``, the
refresh of A and B as a jitted program of its own after every ``N``-th step.

A loop that refreshed inside the step would compile two whole training steps (one with the
selection, one without); with :func:`topkast_jax.refresh_sets` it compiles the step once and
the selection alone, and trains bit for bit the same run (``BENCHMARKS.md``, "The refresh as a
program of its own").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from experiments.common import summary as summary_lib

State = dict[str, Any]


def make_refresh_step(tx: Any) -> Callable[[State], tuple[State, Any]]:
    """``refresh_step(state) -> (state, exploration_penalty)``: ``state["opt_state"]`` with A
    and B selected from ``state["params"]`` (:func:`topkast_jax.refresh_sets`), and the
    exploration penalty of the new sets — the metric a step that refreshed would report."""
    import topkast_jax as tk

    refresh = tk.refresh_sets(tx)

    def refresh_step(state: State) -> tuple[State, Any]:
        opt_state = refresh(state["opt_state"], state["params"])
        penalty = summary_lib.exploration_penalty(state["params"], opt_state)
        return dict(state, opt_state=opt_state), penalty

    return refresh_step


class Updates:
    """``updates(step, state, *batch) -> (state, metrics)``: the train step, then the refresh
    step where ``due(step)`` (``step`` = updates done before this one), its penalty replacing
    the metric's; the first call of each (its compile) is excluded from the progress's
    training time.

    Args:
      train_step: the jitted ``(state, *batch) -> (state, metrics)``.
      refresh_step: the jitted :func:`make_refresh_step`, or ``None``: the step refreshes by
        itself (``refresh_every = 1``, the baselines, the always-sparse mode).
      due: ``step -> bool``, :func:`experiments.common.sparsity.refresh_schedule`.
      progress: the loop's :class:`~experiments.common.progress.ProgressLogger`.
    """

    def __init__(
        self,
        train_step: Callable[..., tuple[State, dict[str, Any]]],
        refresh_step: Callable[[State], tuple[State, Any]] | None,
        due: Callable[[int], bool],
        progress: Any,
    ):
        self._train_step = train_step
        self._refresh_step = refresh_step
        self._due = due
        self._progress = progress
        self._compiled: set[str] = set()

    def _first_call(self, name: str) -> Any:
        if name in self._compiled:
            return contextlib.nullcontext()
        self._compiled.add(name)
        return self._progress.excluded("compile")

    def __call__(self, step: int, state: State, *batch: Any) -> tuple[State, dict[str, Any]]:
        with self._first_call("step"):
            state, metrics = self._train_step(state, *batch)
        if self._refresh_step is not None and self._due(step):
            with self._first_call("refresh"):
                state, penalty = self._refresh_step(state)
            metrics = dict(metrics, exploration_penalty=penalty)
        return state, metrics
