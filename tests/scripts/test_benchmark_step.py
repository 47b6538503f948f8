"""scripts/benchmark_step.py on a tiny MLP: every row printed, and the refresh-100 summary lines
computed from the rows above them (no timing is asserted)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUMBER = r"([0-9.]+)"


def _run() -> str:
    command = [
        sys.executable, os.path.join(ROOT, "scripts", "benchmark_step.py"), "--models=mlp",
        "--width=64", "--pairs=2", "--sparsities=0.8/0.5",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(label))
    return line[len(label) :].split()


def test_rows_and_the_refresh_100_summary():
    text = _run()
    rows = {
        name: _row(text, f"0.8/0.5 r100 {name} ")
        for name in ("cond", "no-refresh", "refresh", "program")
    }
    _row(text, "0.8/0.5 r1 ")
    _row(text, "dense optax ")
    compile_s = {name: float(cols[7]) for name, cols in rows.items()}
    wall = {name: float(cols[9]) for name, cols in rows.items()}
    loop = re.search(
        rf"two steps {NUMBER} s \({NUMBER}x\), step \+ program {NUMBER} s \({NUMBER}x\)", text
    )
    assert loop, text
    two, with_program = float(loop.group(1)), float(loop.group(3))
    assert abs(two - compile_s["no-refresh"] - compile_s["refresh"]) <= 0.011
    assert abs(with_program - compile_s["no-refresh"] - compile_s["program"]) <= 0.011
    amortised = re.search(rf"refresh 100: {NUMBER} \(in-step refresh\), {NUMBER} \(program\)", text)
    assert amortised, text
    in_step = (99 * wall["no-refresh"] + wall["refresh"]) / 100
    split = (99 * wall["no-refresh"] + wall["program"]) / 100
    assert abs(float(amortised.group(1)) - in_step) <= 0.0015
    assert abs(float(amortised.group(2)) - split) <= 0.0015
    # The program holds no training step: it reads fewer bytes than the refresh step.
    accessed = {name: float(rows[name][5].rstrip("x")) for name in ("program", "refresh")}
    assert accessed["program"] < accessed["refresh"]
