"""scripts/benchmark_selection.py: the paired ratio of the "≥ 40× an argsort" goal."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "benchmark_selection", os.path.join(ROOT, "scripts", "benchmark_selection.py")
)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up
_spec.loader.exec_module(bench)


class FakeClock:
    """``time.perf_counter`` that only the timed calls move (no real time is measured)."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def perf_counter(self) -> float:
        return self.now

    def call(self, name: str, seconds: float):
        def run():
            self.calls.append(name)
            self.now += seconds

        return run


def test_paired_alternates_and_divides_within_each_pair(monkeypatch):
    """Each pair times three fast calls and then one slow call, and its ratio is the slow
    call over the median of those three: a slow 4 s call against fast calls of 90, 100 and
    130 ms is 40×, whatever the fast calls of other pairs took."""
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
    fast_seconds = iter([0.09, 0.13, 0.10, 0.2, 0.2, 0.2])

    def fast():
        clock.call("fast", next(fast_seconds))()

    slow_seconds = iter([4.0, 6.0])

    def slow():
        clock.call("slow", next(slow_seconds))()

    result = bench.paired(fast, slow, pairs=2)
    assert clock.calls == ["fast"] * 3 + ["slow"] + ["fast"] * 3 + ["slow"]
    assert result.ratios == pytest.approx((40.0, 30.0))
    assert result.describe() == "35.0x (min-max 30.0-40.0x, 2 pairs)"


def test_pairs_flag_rejects_negative_counts(monkeypatch):
    """``--pairs=-1`` is refused with an error naming the flag."""
    monkeypatch.setattr("sys.argv", ["benchmark_selection.py", "--pairs=-1"])
    with pytest.raises(SystemExit):
        bench.parse_args()


def test_quick_runs_one_pair(monkeypatch):
    """``--quick`` (the smoke run) times one pair per table whatever ``--pairs`` says."""
    monkeypatch.setattr("sys.argv", ["benchmark_selection.py", "--quick", "--pairs=5"])
    assert bench.parse_args().pairs == 1
    monkeypatch.setattr("sys.argv", ["benchmark_selection.py", "--pairs=5"])
    assert bench.parse_args().pairs == 5
