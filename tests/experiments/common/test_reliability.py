"""Reliability of the shared experiment pieces: corrupt checkpoints, failed saves, the finite-state
guard, workdir identity and lock, metrics on resume, and the signal handlers."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.common import guard, signals
from experiments.common import workdir as workdir_lib
from experiments.common.checkpoint import Checkpointer, CheckpointError
from experiments.common.metrics import MetricsWriter, read_metrics

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _state(value):
    return {"w": jnp.full((64, 8), value, jnp.float32), "n": jnp.asarray(int(value), jnp.int32)}


#: The experiments restore onto ``jax.eval_shape`` output, as here.
ABSTRACT = jax.eval_shape(lambda: _state(0.0))


def _two_checkpoints(directory):
    ckpt = Checkpointer(directory, max_to_keep=3)
    ckpt.save(1, _state(1.0), {"step": 1})
    ckpt.save(2, _state(2.0), {"step": 2})
    ckpt.close()


def _largest_file(root):
    files = [f for f in glob.glob(os.path.join(root, "**"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_file(os.path.join(step_dir, "state"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(step_dir):
    path = _largest_file(os.path.join(step_dir, "state"))
    data = bytearray(open(path, "rb").read())
    for i in range(0, len(data), 7):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _delete_item(step_dir):
    import shutil

    shutil.rmtree(os.path.join(step_dir, "meta"))


def _empty_step_dir(step_dir):
    import shutil

    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


CORRUPTIONS = {
    "truncated": _truncate,
    "flipped_bytes": _flip_bytes,
    "deleted_item": _delete_item,
    "empty_step_dir": _empty_step_dir,
    "missing_metadata": _delete_metadata,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, corruption):
    directory = str(tmp_path / "ckpt")
    _two_checkpoints(directory)
    CORRUPTIONS[corruption](os.path.join(directory, "2"))
    logged = []
    ckpt = Checkpointer(directory)
    state, meta = ckpt.restore_latest(ABSTRACT, log=logged.append)
    assert meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((64, 8), np.float32))
    assert len(logged) == 1 and "checkpoint 2" in logged[0] and "does not restore" in logged[0]
    assert os.path.isdir(os.path.join(directory, "2.corrupt"))  # moved aside, not deleted
    assert ckpt.all_steps() == [1]
    ckpt.save(3, _state(3.0), {"step": 3})  # and training goes on
    ckpt.close()
    assert Checkpointer(directory).all_steps() == [1, 3]


def test_no_restorable_checkpoint_fails_naming_the_directory(tmp_path):
    directory = str(tmp_path / "ckpt")
    _two_checkpoints(directory)
    for step in ("1", "2"):
        _delete_metadata(os.path.join(directory, step))
    with pytest.raises(CheckpointError, match=f"no checkpoint in {directory} restores"):
        Checkpointer(directory).restore_latest(ABSTRACT, log=lambda _: None)
    assert sorted(os.listdir(directory)) == ["1", "2"]  # maybe incompatible: left in place


def test_only_empty_step_directories_mean_a_fresh_start(tmp_path):
    directory = tmp_path / "ckpt"
    os.makedirs(directory / "50")  # killed while creating its first checkpoint
    logged = []
    assert Checkpointer(str(directory)).restore_latest(ABSTRACT, log=logged.append) is None
    assert os.listdir(directory) == ["50.corrupt"] and "empty step directory" in logged[0]


def test_no_checkpoint_at_all_is_not_an_error(tmp_path):
    assert Checkpointer(str(tmp_path / "new")).restore_latest(_state(0.0)) is None


def test_checkpoint_with_non_finite_values_is_not_restored(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory)
    ckpt.save(1, _state(1.0), {"step": 1})
    nan_state = {"w": jnp.full((64, 8), np.nan), "n": jnp.asarray(2, jnp.int32)}
    ckpt.save(2, nan_state, {"step": 2})  # as an older version without the state guard could
    _, meta = ckpt.restore_latest(_state(0.0), log=lambda _: None)
    ckpt.close()
    assert meta["step"] == 1


SAVE_UNTIL_FULL = """
import os, resource, signal, sys
sys.path.insert(0, {repo!r})
import jax.numpy as jnp
import numpy as np
from experiments.common.checkpoint import CheckpointError, Checkpointer

ckpt = Checkpointer({directory!r})
ckpt.save(1, {{"w": jnp.ones((4,), jnp.float32)}}, {{"step": 1}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    noise = np.random.default_rng(0).random(1_000_000, np.float32)  # 4 MB, incompressible
    ckpt.save(2, {{"w": jnp.asarray(noise)}}, {{"step": 2}})
except CheckpointError as e:
    print("FAILED AT SAVE 2:", e)
ckpt.close()
"""


def test_failed_save_surfaces_at_that_save_and_keeps_the_previous_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    script = SAVE_UNTIL_FULL.format(repo=REPO, directory=directory)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FAILED AT SAVE 2: saving checkpoint 2" in out.stdout
    assert "checkpoint 1 is intact" in out.stdout and "File too large" in out.stdout
    assert sorted(os.listdir(directory)) == ["1"]  # no partial or temporary directory left
    state, meta = Checkpointer(directory).restore({"w": jnp.zeros((4,), jnp.float32)})
    assert meta == {"step": 1} and float(state["w"][0]) == 1.0


def test_free_space_is_checked_before_training(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.check_free_space({"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
    huge = {"w": jax.ShapeDtypeStruct((2**40,), jnp.float32)}  # 4 TiB
    with pytest.raises(CheckpointError, match="MiB free in .* a checkpoint needs about"):
        ckpt.check_free_space(huge)


# ---- the finite-state guard ------------------------------------------------------------------


def test_state_guard_names_the_non_finite_leaves_and_the_last_good_checkpoint():
    state = {"params": {"a": jnp.ones(3), "b": jnp.array([1.0, np.inf])}, "mu": jnp.zeros(2)}
    guard.check_state_finite(jax.tree.map(jnp.zeros_like, state), step=4)
    state["mu"] = jnp.array([np.nan, 0.0])
    with pytest.raises(guard.NonFiniteLossError) as info:
        guard.check_state_finite(state, step=7, last_good_checkpoint=5, hint="a lower lr")
    message = str(info.value)
    assert "step 7 (mu, params/b)" in message and "last good checkpoint (step 5)" in message
    assert "repeats the divergence" in message and "a lower lr" in message
    assert guard.nonfinite_paths({"i": jnp.arange(3), "x": jnp.ones(2, jnp.bfloat16)}) == []


# ---- workdir identity -------------------------------------------------------------------------


def _config(**overrides):
    c = ml_collections.ConfigDict(
        {"num_train_steps": 10, "seed": 0, "sparsity": {"forward": 0.8}, "data": {"path": "a"}}
    )
    for k, v in overrides.items():
        parent, _, leaf = k.rpartition(".")
        (c[parent] if parent else c)[leaf] = v
    return c


def _workdir_with_progress(tmp_path, config):
    workdir = str(tmp_path / "w")
    os.makedirs(os.path.join(workdir, "checkpoints", "5"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    return workdir


def test_identity_refuses_another_experiment_listing_old_and_new(tmp_path):
    workdir = _workdir_with_progress(tmp_path, _config())
    new = _config(**{"sparsity.forward": 0.9, "data.path": "b", "num_train_steps": 20})
    with pytest.raises(workdir_lib.WorkdirError) as info:
        workdir_lib.check_identity(workdir, new)
    message = str(info.value)
    assert "config.sparsity.forward: 0.8 -> 0.9" in message
    assert "config.data.path: 'a' -> 'b'" in message
    assert "num_train_steps" not in message.split("Fields that may change")[0]
    assert "new --workdir" in message


def test_identity_allows_the_listed_changes_and_records_each_resume(tmp_path):
    workdir = _workdir_with_progress(tmp_path, _config())
    changes = workdir_lib.check_identity(workdir, _config(num_train_steps=20))
    assert changes == {"num_train_steps": (10, 20)}
    assert workdir_lib.check_identity(workdir, _config()) == {}
    workdir_lib.record_resume(workdir, 5, changes)
    workdir_lib.record_resume(workdir, 9, {})
    with open(os.path.join(workdir, "resumes.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [5, 9]
    assert records[0]["changed"] == {"num_train_steps": [10, 20]} and records[1]["changed"] == {}


def test_export_at_end_may_change_on_resume(tmp_path):
    """Whether the run writes its export at the end does not change what it trains."""
    workdir = _workdir_with_progress(tmp_path, _config(export_at_end=True))
    changes = workdir_lib.check_identity(workdir, _config(export_at_end=False))
    assert changes == {"export_at_end": (True, False)}


def test_fields_added_or_removed_by_the_code_are_allowed_and_recorded(tmp_path):
    workdir = _workdir_with_progress(tmp_path, _config())
    upgraded = _config()
    upgraded.sparsity.track_reservoir = True  # a field a newer version of the code added
    del upgraded["seed"]  # and one it dropped
    changes = workdir_lib.check_identity(workdir, upgraded)
    assert changes == {"seed": (0, None), "sparsity.track_reservoir": (None, True)}


def test_identity_is_free_while_nothing_was_trained(tmp_path):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(_config().to_dict(), f)
    assert workdir_lib.check_identity(workdir, _config(seed=3)) == {}


# ---- workdir lock -----------------------------------------------------------------------------


def test_second_process_is_refused_and_the_lock_is_released_on_exit(tmp_path):
    workdir = str(tmp_path / "w")
    with workdir_lib.locked(workdir):
        lock = json.load(open(os.path.join(workdir, "lock.json")))
        assert lock["pid"] == os.getpid()
        with pytest.raises(workdir_lib.WorkdirError, match=f"in use by pid {os.getpid()} on host"):
            workdir_lib.acquire_lock(workdir)
    assert not os.path.exists(os.path.join(workdir, "lock.json"))


def _write_lock(workdir, **holder):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "lock.json"), "w") as f:
        json.dump({"since": "then", **holder}, f)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    workdir = str(tmp_path / "w")
    _write_lock(workdir, pid=dead.pid, host=os.uname().nodename, pid_start=None)
    logged = []
    path = workdir_lib.acquire_lock(workdir, log=logged.append)
    assert json.load(open(path))["pid"] == os.getpid() and "stale lock" in logged[0]
    workdir_lib.release_lock(path)


def test_lock_of_a_reused_pid_is_stale_and_another_hosts_lock_is_respected(tmp_path):
    workdir = str(tmp_path / "w")
    _write_lock(workdir, pid=os.getpid(), host=os.uname().nodename, pid_start="0")
    workdir_lib.release_lock(workdir_lib.acquire_lock(workdir, log=lambda _: None))
    _write_lock(workdir, pid=1, host="another-host", pid_start=None)
    with pytest.raises(workdir_lib.WorkdirError, match="on host another-host"):
        workdir_lib.acquire_lock(workdir)


# ---- metrics on resume --------------------------------------------------------------------------


def test_resumed_metrics_drop_later_steps_and_never_repeat_a_step(tmp_path):
    workdir = str(tmp_path)
    writer = MetricsWriter(workdir)
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": float(step)}, prefix="train/")
    writer.write(3, {"bpc": 9.0}, prefix="valid/")
    writer.close()
    writer = MetricsWriter(workdir, start_step=3)  # resumed from checkpoint 3
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 3]
    writer.write(3, {"bpc": 9.0}, prefix="valid/")  # already logged: skipped
    writer.write(4, {"loss": 4.5}, prefix="train/")
    writer.close()
    records = read_metrics(workdir)
    assert [(r["step"], sorted(r)) for r in records][-2:] == [
        (3, ["step", "valid/bpc"]),
        (4, ["step", "train/loss"]),
    ]
    assert records[-1]["train/loss"] == 4.5


# ---- signals ----------------------------------------------------------------------------------


def test_first_signal_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with signals.StopSignals(log=lambda _: None) as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and stop.should_stop()
        error = stop.interrupted(12, "/ckpt")
    assert signal.getsignal(signal.SIGTERM) is before
    assert error.exit_code == 143
    assert str(error) == (
        "stopped by SIGTERM at step 12; checkpoint 12 is in /ckpt. "
        "Rerun the same command to resume."
    )


SECOND_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from experiments.common.signals import StopSignals
    with StopSignals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    print("not reached")
    """
)


def test_second_signal_exits_at_once():
    out = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL.format(repo=REPO)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 128 + signal.SIGTERM
    assert "received SIGINT: finishing the current step" in out.stderr
    assert "received SIGTERM again: exiting at once" in out.stderr
    assert "not reached" not in out.stdout


def test_stop_before_any_new_step_names_the_existing_checkpoint(tmp_path):
    os.makedirs(tmp_path / "7")
    with signals.StopSignals(log=lambda _: None) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        error = stop.interrupted(7, str(tmp_path), saved=False)
    assert error.exit_code == 130
    assert f"at step 7; nothing new to save; checkpoint 7 is in {tmp_path}." in str(error)
    assert "nothing new to save. Rerun" in str(stop.interrupted(0, str(tmp_path), saved=False))
