"""Both CLIs: ``--help`` lists the experiment flags (not only under ``--helpfull``)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ("--config", "--workdir", "--dry_run", "--coordinator_address", "--verbose_logs")


@pytest.mark.parametrize("experiment", ["language_model", "imagenet"])
def test_help_lists_the_experiment_flags(experiment):
    out = subprocess.run(
        [sys.executable, "-m", f"experiments.{experiment}.main", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in out.stderr, out.stderr  # absl's --help exits with status 1
    for flag in FLAGS:
        assert f"  {flag}" in out.stdout or f"  --[no]{flag[2:]}" in out.stdout, flag
    assert f"python -m experiments.{experiment}.main" in out.stdout  # the module docstring
