"""ProgressLogger with an injected fake clock: the rate counts training time only (compile, eval
and checkpoint time excluded) and the ETA includes the evaluation still planned."""

import pytest

from experiments.common.progress import ProgressLogger, format_duration


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_line_rate_and_eta_without_evaluation():
    clock = FakeClock()
    logger = ProgressLogger(total_steps=1000, start_step=0, clock=clock)
    clock.advance(10.0)  # 100 steps in 10 s -> 10 steps/s, 900 left -> 90 s
    line = logger.line(100, {"loss": 2.5, "bpc": 3.6})
    assert line == "step 100/1000 | loss 2.5 | bpc 3.6 | 10 steps/s | ETA 1m30s"
    assert logger.steps_per_second == 10.0


def test_compile_eval_and_checkpoint_time_do_not_count_as_training():
    clock = FakeClock()
    logger = ProgressLogger(total_steps=300, clock=clock)
    with logger.excluded("compile"):
        clock.advance(60.0)  # compiling the first step
    clock.advance(5.0)  # 100 steps of training: 20 steps/s
    assert logger.line(100, {}) == "step 100/300 | 20 steps/s | ETA 10s"
    with logger.excluded("eval"):
        clock.advance(30.0)
    with logger.excluded("checkpoint"):
        clock.advance(7.0)
    clock.advance(10.0)  # 100 more steps, slower: 10 steps/s over this interval
    line = logger.line(200, {})
    assert logger.steps_per_second == 10.0
    # cumulative training rate: 200 steps / 15 s; 100 steps left -> 7.5 s
    assert line == "step 200/300 | 10 steps/s | ETA 8s"
    assert logger.excluded_seconds() == {"compile": 60.0, "eval": 30.0, "checkpoint": 7.0}
    assert logger.training_seconds() == pytest.approx(15.0)


def test_eta_includes_the_remaining_evaluation_once_measured():
    clock = FakeClock()
    # evaluations of 10 units at steps 100 and 200, then a final one of 50 units; a line comes
    # before the evaluation of its step, so the units still to run at `step` are those at >= step
    plan = {100: 10, 200: 10, 300: 50}
    remaining = lambda step: sum(u for s, u in plan.items() if s >= step)
    logger = ProgressLogger(total_steps=300, eval_units_after=remaining, clock=clock)
    clock.advance(10.0)
    assert logger.line(50, {}) == "step 50/300 | 5 steps/s | ETA 50s + eval ?"
    clock.advance(10.0)
    logger.line(100, {})
    with logger.excluded("eval", eval_units=10):
        clock.advance(20.0)  # 2 s per unit
    clock.advance(20.0)
    # 200 steps in 40 s of training: 100 left -> 20 s; eval left: 10 + 50 units -> 120 s
    assert logger.line(200, {}) == "step 200/300 | 5 steps/s | ETA 2m20s (eval 2m00s)"
    with logger.excluded("eval", eval_units=10):
        clock.advance(10.0)  # the latest evaluation counts: 1 s per unit (the first compiled)
    clock.advance(20.0)
    assert logger.line(300, {}) == "step 300/300 | 5 steps/s | ETA 50s (eval 50s)"


def test_resumed_run_counts_from_its_start_step():
    clock = FakeClock()
    logger = ProgressLogger(total_steps=1000, start_step=900, clock=clock)
    clock.advance(4.0)
    assert logger.line(950, {"loss": 1.0}) == "step 950/1000 | loss 1 | 12.5 steps/s | ETA 4s"


def test_no_time_passed_gives_unknown_rate_not_an_error():
    clock = FakeClock()
    logger = ProgressLogger(total_steps=10, clock=clock)
    assert logger.line(0, {}) == "step 0/10 | nan steps/s | ETA ?"


def test_format_duration():
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(65) == "1m05s"
    assert format_duration(7.2) == "7s"
    assert format_duration(-3) == "0s"
