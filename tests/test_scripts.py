"""The reproduce scripts work when pasted: from another directory, with only ``python3`` (no
``python``) on PATH and no ``.venv`` — here on ``--dry_run`` of one row each (no data, no
weights), then the table of results (rows not run show "-")."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> str:
    """A checkout without .venv: the scripts copied, the code linked."""
    repo = tmp_path_factory.mktemp("clone")
    shutil.copytree(os.path.join(ROOT, "scripts"), repo / "scripts")
    for name in ("experiments", "configs", "topkast_jax"):
        os.symlink(os.path.join(ROOT, name), repo / name)
    return str(repo)


@pytest.fixture(scope="module")
def only_python3(tmp_path_factory) -> str:
    """A PATH directory with ``python3`` (this interpreter) and the shell tools, no ``python``."""
    bin_dir = tmp_path_factory.mktemp("bin")
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(python3.stat().st_mode | stat.S_IXUSR)
    for tool in ("bash", "sh", "dirname", "env"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return str(bin_dir)


@pytest.mark.parametrize(
    "script, row, metric",
    [
        ("reproduce_table2.sh", "0.8,0.8", "bpc"),
        ("reproduce_table3.sh", "0.9,0.8", "perplexity"),
        ("reproduce_table5.sh", "0.8,0.6", "bpc"),
    ],
)
def test_reproduce_script_runs_from_another_directory_with_only_python3(
    clone, only_python3, tmp_path, script, row, metric
):
    env = {"PATH": only_python3, "HOME": str(tmp_path), "ROWS": row, "PRUNING": ""}
    out = subprocess.run(
        ["bash", os.path.join(clone, "scripts", script), "runs", "--dry_run"],
        cwd=tmp_path,  # not the repository
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    fwd, bwd = row.split(",")
    workdir = tmp_path / "runs" / f"fwd{fwd}_bwd{bwd}"  # RUNS_DIR taken from the caller's cwd
    record = json.loads((workdir / "dry_run.json").read_text())
    assert record["forward_sparsity"] == pytest.approx(float(fwd))
    assert f"| run | fwd | bwd | params (nonzero) | test {metric} |" in out.stdout
    assert f"| fwd{fwd}_bwd{bwd} | - |" in out.stdout  # dry run: no summary yet


def test_scripts_never_call_a_bare_python():
    for name in sorted(os.listdir(os.path.join(ROOT, "scripts"))):
        if name.endswith(".sh"):
            with open(os.path.join(ROOT, "scripts", name)) as f:
                for line in f:
                    code = line.split("#")[0].split()
                    assert "python" not in code, f"{name}: {line.strip()}"
