"""scripts/benchmark_compile.py on a tiny MLP: every program's row, its ratio to the dense step
and the summary line computed from the rows (no timing is asserted)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUMBER = r"([0-9.]+)"
PROGRAMS = (
    "dense step",
    "no-refresh step",
    "refresh step",
    "refresh program",
    "selection, cold",
    "selection, guessed",
    "packing",
    "one scatter pass",
)


def _run() -> str:
    command = [
        sys.executable, os.path.join(ROOT, "scripts", "benchmark_compile.py"), "--models=mlp",
        "--width=64", "--repeats=1",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_rows_ratios_and_the_budget_line():
    text = _run()
    rows = {}
    for name in PROGRAMS:
        match = re.search(rf"^{re.escape(name)} +{NUMBER} +{NUMBER}x +(\d+)$", text, re.M)
        assert match, (name, text)
        rows[name] = (float(match.group(1)), float(match.group(2)), int(match.group(3)))
    dense = rows["dense step"][0]
    for name, (seconds, ratio, kernels) in rows.items():
        # Printed to 3 decimals (seconds) and 2 (ratio): the ratio of the rounded seconds can
        # be off by the ratio's rounding plus the seconds' relative rounding errors.
        bound = 0.005 + seconds / dense * (0.0005 / max(seconds, 0.0005) + 0.0005 / dense) + 1e-9
        assert abs(ratio - seconds / dense) <= bound, name
        assert kernels > 0, name
    # The refresh is more program than the step without it; the floor is less than a selection.
    assert rows["refresh step"][2] > rows["no-refresh step"][2]
    assert rows["one scatter pass"][2] < rows["selection, cold"][2]
    summary = re.search(
        rf"at 1.5x the dense step: {NUMBER} s; the refresh adds {NUMBER} s in the step; "
        rf"floor \(one scatter pass \+ packing\): {NUMBER} s",
        text,
    )
    assert summary, text
    budget, added, floor = (float(summary.group(i)) for i in (1, 2, 3))
    assert abs(budget - (1.5 * dense - rows["no-refresh step"][0])) <= 0.0025
    assert abs(added - (rows["refresh step"][0] - rows["no-refresh step"][0])) <= 0.0015
    assert abs(floor - (rows["one scatter pass"][0] + rows["packing"][0])) <= 0.0015
