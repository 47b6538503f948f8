"""The LM experiment end to end under faults: SIGTERM/SIGINT to the real CLI, a workdir rerun with
another config, a second process on the same workdir, a corrupt newest checkpoint, a state that
turns non-finite while the loss is still finite."""

import json
import os
import signal
import time

import numpy as np
import pytest
from test_lm_train import (
    _checkpoint_steps,
    _free_port,
    _run,
    _wait,
    cli_flags,
    read_summary,
    text_file,  # noqa: F401  (module fixture)
    tiny_config,
    train_losses,
)

from experiments.common import workdir as workdir_lib
from experiments.common.checkpoint import Checkpointer
from experiments.common.guard import NonFiniteLossError
from experiments.common.metrics import read_metrics
from experiments.language_model import train

#: A constant learning rate after the warmup, so the run's length does not change the schedule.
CONSTANT_LR = ["--config.optim.end_lr=1e-2", "--config.eval_every_steps=0"]
CPU = {"JAX_PLATFORMS": "cpu"}


def _wait_for_train_lines(proc, workdir, n, timeout=300):
    deadline = time.monotonic() + timeout
    while len(train_losses(workdir)) < n:
        assert proc.poll() is None, "the run ended before it could be signalled"
        assert time.monotonic() < deadline, f"fewer than {n} logged steps within {timeout} s"
        time.sleep(0.05)


def _stop_with(signum, text_file, workdir, while_running=None):  # noqa: F811
    """Run the CLI towards 100,000 steps, send ``signum`` after 10 logged steps; return
    ``(output, step it stopped at)``. ``while_running(args)`` is called before the signal."""
    args = [*cli_flags(text_file), *CONSTANT_LR, "--config.num_train_steps=100000"]
    args += ["--config.checkpoint_every_steps=100000", f"--workdir={workdir}"]
    proc = _run(args, CPU)
    try:
        _wait_for_train_lines(proc, workdir, 10)
        if while_running is not None:
            while_running(args, proc.pid)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, out[-3000:]
    steps = _checkpoint_steps(workdir)
    assert len(steps) == 1 and steps[0] >= 10, steps
    return out, steps[0]


def test_sigterm_saves_the_current_step_and_resuming_equals_uninterrupted(text_file, tmp_path):  # noqa: F811
    stopped, reference = str(tmp_path / "stopped"), str(tmp_path / "reference")
    out, step = _stop_with(signal.SIGTERM, text_file, stopped)
    assert "received SIGTERM: finishing the current step and saving a checkpoint" in out
    assert f"stopped by SIGTERM at step {step}; checkpoint {step} is in" in out
    assert "Rerun the same command to resume." in out and "Traceback" not in out
    assert not os.path.exists(os.path.join(stopped, "lock.json"))
    assert max(r["step"] for r in read_metrics(stopped)) == step

    end = [f"--config.num_train_steps={step + 5}", "--config.checkpoint_every_steps=100000"]
    resumed = _wait(_run([*cli_flags(text_file), *CONSTANT_LR, *end, f"--workdir={stopped}"], CPU))
    assert f"resumed from step {step}" in resumed
    _wait(_run([*cli_flags(text_file), *CONSTANT_LR, *end, f"--workdir={reference}"], CPU))
    np.testing.assert_array_equal(train_losses(stopped), train_losses(reference))
    assert len(train_losses(stopped)) == step + 5  # one line per step, none repeated
    assert read_summary(stopped)["test_bpc"] == read_summary(reference)["test_bpc"]
    with open(os.path.join(stopped, "resumes.jsonl")) as f:
        (record,) = [json.loads(line) for line in f]
    assert record["step"] == step
    assert record["changed"] == {"num_train_steps": [100000, step + 5]}


def _second_process_is_refused(args, pid):
    second = _run(args, CPU)
    out, _ = second.communicate(timeout=300)
    assert second.returncode != 0
    assert f"is in use by pid {pid} on host" in out


def test_second_cli_on_a_running_workdir_is_refused_and_sigint_exits_130(text_file, tmp_path):  # noqa: F811
    workdir = str(tmp_path / "w")
    out, step = _stop_with(signal.SIGINT, text_file, workdir, _second_process_is_refused)
    assert f"stopped by SIGINT at step {step}; checkpoint {step} is in" in out
    assert "KeyboardInterrupt" not in out
    steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert steps == list(range(1, step + 1))  # the refused process wrote nothing


@pytest.fixture(scope="module")
def finished(text_file, tmp_path_factory):  # noqa: F811
    workdir = str(tmp_path_factory.mktemp("finished"))
    config = tiny_config(text_file, eval_every_steps=0)
    summary = train.train_and_evaluate(config, workdir)
    return workdir, config, summary


def _file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_finished_workdir_returns_its_summary_without_recomputing(finished):
    workdir, config, summary = finished
    metrics = _file_bytes(os.path.join(workdir, "metrics.jsonl"))
    again = train.train_and_evaluate(config, workdir)
    assert again == summary
    assert _file_bytes(os.path.join(workdir, "metrics.jsonl")) == metrics
    assert not os.path.exists(os.path.join(workdir, "resumes.jsonl"))


def test_another_config_on_a_workdir_is_refused_naming_the_fields(finished):
    workdir, config, _ = finished
    before = _file_bytes(os.path.join(workdir, "config.json"))
    other = tiny_config(config.data.path, eval_every_steps=0, **{"sparsity.forward": 0.9})
    other.seq_len = 16
    with pytest.raises(workdir_lib.WorkdirError) as info:
        train.train_and_evaluate(other, workdir)
    message = str(info.value)
    assert "config.sparsity.forward: 0.8 -> 0.9" in message
    assert "config.seq_len: 8 -> 16" in message and "new --workdir" in message
    assert _file_bytes(os.path.join(workdir, "config.json")) == before


def test_second_process_on_a_workdir_is_refused_at_once(finished):
    workdir, config, _ = finished
    with workdir_lib.locked(workdir):
        with pytest.raises(workdir_lib.WorkdirError, match=f"in use by pid {os.getpid()}"):
            train.train_and_evaluate(config, workdir)


def test_corrupt_newest_checkpoint_costs_one_checkpoint(finished, tmp_path):
    import shutil

    source, config, _ = finished
    workdir = str(tmp_path / "w")
    shutil.copytree(source, workdir)
    os.remove(os.path.join(workdir, "checkpoints", "6", "state", "_METADATA"))
    config = tiny_config(config.data.path, eval_every_steps=0, num_train_steps=8)
    summary = train.train_and_evaluate(config, workdir)
    assert summary["steps"] == 8
    # checkpoint 6 is trained again beside the moved-aside one; max_to_keep=2 drops 3
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6", "6.corrupt", "8"]
    steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert steps == list(range(1, 9))  # 4..6 retrained once, not logged twice
    with open(os.path.join(workdir, "resumes.jsonl")) as f:
        (record,) = [json.loads(line) for line in f]
    assert record["step"] == 3 and record["changed"] == {"num_train_steps": [6, 8]}


def test_state_that_turns_non_finite_is_never_saved(text_file, tmp_path):  # noqa: F811
    """A float32 learning rate of inf: the step-1 loss (computed before the update) is finite,
    the updated weights are not. Nothing may be checkpointed."""
    lr = {"optim.lr": 1e39, "optim.warmup_init_lr": 1e39, "optim.warmup_steps": 0}
    config = tiny_config(text_file, checkpoint_every_steps=1, eval_every_steps=0, **lr)
    workdir = str(tmp_path / "w")
    with pytest.raises(NonFiniteLossError, match="non-finite values in the train state at step 1"):
        train.train_and_evaluate(config, workdir)
    assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() is None
    assert not os.path.exists(os.path.join(workdir, "lock.json"))


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(text_file, tmp_path):  # noqa: F811
    """Several hosts: the processes agree at logging steps, so a signal to one stops all, with
    one checkpoint of the same step."""
    workdir = str(tmp_path / "gloo")
    port = _free_port()
    args = [*cli_flags(text_file), *CONSTANT_LR, "--config.num_train_steps=100000"]
    args += ["--config.checkpoint_every_steps=100000", f"--workdir={workdir}"]
    procs = [
        _run(
            [
                *args,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--cpu_collectives=gloo",
            ],
            CPU,
        )
        for i in range(2)
    ]
    try:
        _wait_for_train_lines(procs[0], workdir, 5)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143, 143], outs[0][-2000:] + outs[1][-2000:]
    (step,) = _checkpoint_steps(workdir)
    assert f"stopped by SIGTERM at step {step}" in outs[1]
    assert f"at step {step}; checkpoint {step} is in" in outs[0]
