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


def test_eval_only_needs_from_export(tmp_path):
    """``--eval_only`` without ``--from_export`` is a usage error naming both flags."""
    out = subprocess.run(
        [sys.executable, "-m", "experiments.language_model.main",
         f"--config={os.path.join(ROOT, 'configs', 'demo.py')}", f"--workdir={tmp_path}",
         "--eval_only"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert "--eval_only and --from_export=PATH go together" in out.stderr
