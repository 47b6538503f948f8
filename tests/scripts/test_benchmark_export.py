"""scripts/benchmark_export.py on a small layer: the three ways of running an export compute the
same layer (checked inside ``measure``), and one table row per sparsity is printed."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "benchmark_export", os.path.join(ROOT, "scripts", "benchmark_export.py")
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_rows_and_ratios(capsys):
    assert bench.main(["--features=64", "--batch=4", "--sparsities=0.5,0.9", "--rounds=2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| 50%", "| 90%"]
    row = bench.measure(64, 4, 0.75, rounds=2)
    assert len(row["ratios"]["bcoo"]) == len(row["ratios"]["todense"]) == 2
    assert row["dense_kernel_bytes"] == 64 * 64 * 4
    assert set(row["disk"]) == {"bitmap", "indices", "dense"}
