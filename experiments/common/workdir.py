"""A workdir is one experiment: its identity, a lock, and a log of its resumes.

* **Identity.** ``config.json`` is the experiment. Once the workdir holds a checkpoint or a
  ``summary.json``, a rerun with a config that differs in any field outside
  :data:`RESUMABLE_CHANGES` is refused with the differing fields (old -> new); a rerun whose
  changes are all allowed resumes, and every resume is appended to ``resumes.jsonl`` with its
  changed fields.
* **Lock.** ``lock.json`` holds the pid, host and start time of the process using the workdir; a
  second process is refused at once. The file is removed on exit; a lock whose process no longer
  runs on this host (a crash, SIGKILL) is stale and taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from experiments.common import config_utils, signals
from experiments.common import summary as summary_lib

#: Config fields that may change when a run is resumed: the run's length (schedules that depend on
#: it follow the new length from the resumed step on) and what is logged, evaluated, reported or
#: kept. To branch a run with any other change, copy its ``checkpoints/`` into a new workdir.
RESUMABLE_CHANGES = (
    "num_train_steps",
    "log_every_steps",
    "checkpoint_every_steps",
    "eval_every_steps",
    "eval_max_windows",
    "final_eval_max_windows",
    "max_checkpoints_to_keep",
    "mask_stats_every_steps",
    "reference_steps",
    "export_at_end",
    "data.num_threads",
    "data.num_workers",
)

CONFIG_FILE = "config.json"
LOCK_FILE = "lock.json"
RESUMES_FILE = "resumes.jsonl"
SUMMARY_FILE = summary_lib.SUMMARY_FILE


class WorkdirError(ValueError):
    """The workdir belongs to another experiment, or another process is using it."""


# ----------------------------------------------------------------------------- identity
def config_record(config: Any) -> dict[str, Any]:
    """The config as the JSON object ``config.json`` holds (tuples become lists, etc.)."""
    return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = prefix + key
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted field: (old, new)}`` for every field that differs (absent shows as None)."""
    old_flat, new_flat = flatten(old), flatten(new)
    return {
        k: (old_flat.get(k), new_flat.get(k))
        for k in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(k) != new_flat.get(k) or (k in old_flat) != (k in new_flat)
    }


def has_progress(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint (any numbered entry) or a summary."""
    checkpoints = os.path.join(workdir, "checkpoints")
    numbered = os.path.isdir(checkpoints) and any(
        name.split(".")[0].isdigit() for name in os.listdir(checkpoints)
    )
    return numbered or os.path.exists(os.path.join(workdir, SUMMARY_FILE))


def check_identity(
    workdir: str, config: Any, allowed: tuple[str, ...] = RESUMABLE_CHANGES
) -> dict[str, tuple[Any, Any]]:
    """The allowed changes of ``config`` against the workdir's ``config.json``.

    A field present on one side only was added or removed by a change of the code (a command line
    can only set existing fields): it is allowed and reported with the value None on the side
    that lacks it.

    Returns ``{}`` for a new workdir, or one without checkpoints or summary (nothing to mix).

    Raises:
      WorkdirError: a field outside ``allowed`` present on both sides differs; the message lists
        every such field as ``old -> new`` and how to proceed.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path) or not has_progress(workdir):
        return {}
    with open(path) as f:
        old = json.load(f)
    new = config_record(config)
    changes = changed_fields(old, new)
    both = set(flatten(old)) & set(flatten(new))
    refused = {k: v for k, v in changes.items() if k not in allowed and k in both}
    if refused:
        lines = "\n".join(f"  config.{k}: {o!r} -> {n!r}" for k, (o, n) in refused.items())
        raise WorkdirError(
            f"{workdir} holds another experiment: these fields differ from its {CONFIG_FILE} "
            f"(old -> new):\n{lines}\nA workdir is one experiment. Rerun with the same config "
            "to resume it, or pass a new --workdir to start this one. Fields that may change on "
            f"resume: {', '.join(allowed)}."
        )
    return changes


def record_resume(workdir: str, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append ``{"time", "step", "host", "pid", "changed": {field: [old, new]}}`` to
    ``resumes.jsonl``."""
    record = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "step": int(step),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "changed": {k: list(v) for k, v in changes.items()},
    }
    with open(os.path.join(workdir, RESUMES_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- lock
def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of ``/proc/<pid>/stat``), or None if the
    process does not exist (or there is no ``/proc``). Guards against a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def is_running(pid: int, started: str | None) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start_time(pid)
    return started is None or now is None or now == started


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "pid_start": process_start_time(os.getpid()),
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _read_lock(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_stale(holder: dict[str, Any] | None) -> bool:
    if holder is None:  # unreadable: its writer died while writing it
        return True
    if holder.get("host") != socket.gethostname():
        return False  # cannot tell from here
    return not is_running(int(holder["pid"]), holder.get("pid_start"))


def acquire_lock(workdir: str, log: Callable[[str], None] = print) -> str:
    """Create ``<workdir>/lock.json`` for this process; return its path.

    Raises:
      WorkdirError: another live process holds the lock (the message names its pid, host and
        start time and how to proceed).
    """
    path = os.path.join(workdir, LOCK_FILE)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if not _is_stale(holder):
                raise WorkdirError(
                    f"{workdir} is in use by pid {holder['pid']} on host {holder['host']} (since "
                    f"{holder['since']}; lock file {path}). Wait for that run to end or stop it. "
                    "If it is gone (e.g. its machine died), delete the lock file and rerun."
                ) from None
            log(f"removing the stale lock {path} of a process that no longer runs: {holder}")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_holder(), f)
        return path
    raise WorkdirError(f"could not take the lock {path}: another process is taking it too")


def release_lock(path: str) -> None:
    """Remove the lock file if this process holds it."""
    holder = _read_lock(path)
    if holder is not None and holder.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def locked(
    workdir: str, enabled: bool = True, log: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold the workdir's lock for the ``with`` block (``enabled=False``: a no-op, for the
    non-primary processes of a multi-process run). Creates ``workdir``."""
    if not enabled:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = acquire_lock(workdir, log)
    try:
        yield
    finally:
        release_lock(path)


# ----------------------------------------------------------------------------- a run's session
@dataclasses.dataclass
class Session:
    """What a training run holds while it uses its workdir (see :func:`session`).

    Attributes:
      workdir: absolute path.
      changes: allowed config changes against the workdir's ``config.json`` (``{}`` if none).
      stop: the SIGTERM/SIGINT flag (:class:`~experiments.common.signals.StopSignals`).
      finished: ``summary.json`` if the run already ended at ``config.num_train_steps``.
      primary: whether this process writes the workdir's files.
    """

    workdir: str
    changes: dict[str, tuple[Any, Any]]
    stop: signals.StopSignals
    finished: dict[str, Any] | None
    primary: bool

    def resumed(self, step: int) -> None:
        """Record a resume at ``step`` (primary process only)."""
        if self.primary:
            record_resume(self.workdir, step, self.changes)

    def should_stop(self, at_sync_point: bool) -> bool:
        """Whether to stop on a signal now. One process polls every step; several processes poll
        together only at sync points (e.g. logging steps), where they agree."""
        if self.stop.received is None and not at_sync_point:
            return False
        import jax

        if jax.process_count() > 1 and not at_sync_point:
            return False
        return self.stop.should_stop()


@contextlib.contextmanager
def session(
    workdir: str, config: Any, primary: bool = True, log: Callable[[str], None] = print
) -> Iterator[Session]:
    """Lock ``workdir``, install the signal handlers, check the config against the workdir's
    identity and write ``config.json``; undo the lock and the handlers on exit.

    Raises:
      WorkdirError: the workdir is locked by a live process or holds another experiment.
    """
    workdir = os.path.abspath(workdir)
    with locked(workdir, enabled=primary, log=log), signals.StopSignals() as stop:
        changes = check_identity(workdir, config) if primary else {}
        summary = summary_lib.read_summary(workdir)
        finished = summary if summary and summary.get("steps") == config.num_train_steps else None
        if primary and finished is None:
            config_utils.save_config(config, workdir, CONFIG_FILE)
        yield Session(workdir, changes, stop, finished, primary)
