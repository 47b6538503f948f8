"""One metric-naming scheme, one ``summary.json`` schema and the run's provenance, for every
experiment.

Metric names (``metrics.jsonl`` and TensorBoard), the same in both trainers:

==========================  ========================================================================
``train/loss``              mean training loss (nats) since the previous log line
``train/learning_rate``     the schedule's value at the step
``train/grad_norm``         global norm of the gradient with respect to ``α = θ ⊙ A``
``train/exploration_penalty``  ``λ(½‖θ_A‖² + ½‖θ_{B∖A}‖²/D)`` (0 for dense and the baselines)
``train/steps_per_second``  training steps per second of *training* time (compilation, evaluation
                            and checkpoint time excluded; see ``progress.ProgressLogger``)
``train/<unit>_per_second`` throughput: ``tokens`` (language models) or ``examples`` (images)
``train/<score>``           ``bpc`` / ``perplexity`` (language models), ``top1`` in % (images)
``masks/<stat>``            ``tk.mask_stats`` (densities, churn, ``reservoir_activated``) and
                            ``masks/window_change/<layer>`` + ``_min/_mean/_max`` (paper Fig. 3)
``eval/<metric>``           periodic evaluation on the held-out split: ``loss`` and the scores
                            (accuracies in %)
``final/<split>_<metric>``  the final evaluation, e.g. ``final/test_bpc``, ``final/valid_top1``
==========================  ========================================================================

``summary.json`` holds :data:`SUMMARY_KEYS` (method, sparsities, realised densities, steps, time,
training FLOPs vs dense) plus the final metrics as ``<split>_<metric>`` (``test_bpc``,
``valid_top1``, ...) and ``final_metrics``, the list of those names. ``provenance.json`` records
what produced the run: package versions, git commit, devices.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

#: Keys every ``summary.json`` holds, whatever the experiment.
SUMMARY_KEYS = (
    "experiment",
    "data",
    "method",
    "forward_sparsity",
    "backward_sparsity",
    "total_params",
    "forward_nonzero",
    "backward_nonzero",
    "forward_density",
    "backward_density",
    "train_flops_vs_dense",
    "steps",
    "wall_seconds",
    "final_metrics",
)

#: The packages whose versions ``provenance.json`` records (absent ones are recorded as None).
PACKAGES = ("jax", "jaxlib", "optax", "flax", "numpy", "orbax-checkpoint", "ml_collections")

SUMMARY_FILE = "summary.json"
PROVENANCE_FILE = "provenance.json"


def realised_densities(params: Any, opt_state: Any) -> dict[str, float]:
    """Nonzero counts and densities of the final masks over *all* parameters.

    ``forward_nonzero`` = Σ|A_ℓ| over sparse leaves + Σ n_ℓ over dense leaves (same for B), and
    ``forward_density = forward_nonzero / total_params``.
    """
    import topkast_jax as tk

    masks = tk.get_masks(opt_state)
    flat_p = jax.tree.leaves(params)
    counts = {}
    for name, tree in (("forward", masks.forward), ("backward", masks.backward)):
        flat_m = jax.tree.leaves(tree, is_leaf=lambda x: x is None)
        counts[name] = sum(
            p.size if m is None else int(jnp.sum(m)) for p, m in zip(flat_p, flat_m, strict=True)
        )
    total = sum(p.size for p in flat_p)
    return {
        "total_params": int(total),
        "forward_nonzero": int(counts["forward"]),
        "backward_nonzero": int(counts["backward"]),
        "forward_density": counts["forward"] / total,
        "backward_density": counts["backward"] / total,
    }


def throughput(steps_per_second: float, items_per_step: int, unit: str) -> dict[str, float]:
    """``{"steps_per_second": r, "<unit>_per_second": r * items_per_step}`` (``unit``:
    ``"tokens"`` or ``"examples"``)."""
    return {
        "steps_per_second": steps_per_second,
        f"{unit}_per_second": steps_per_second * items_per_step,
    }


def exploration_penalty(params: Any, opt_state: Any) -> jax.Array:
    """``tk.exploration_penalty`` for Top-KAST (and dense, where it is 0); 0 for the baselines,
    which have no exploration penalty. Jit-able (the method is known at trace time)."""
    import topkast_jax as tk

    if not hasattr(tk.state.find_sparse_state(opt_state), "exploration_l2"):
        return jnp.zeros((), jnp.float32)
    return tk.exploration_penalty(params, opt_state)


def build_summary(
    *,
    experiment: str,
    data: str,
    method: str,
    forward_sparsity: float,
    backward_sparsity: float,
    densities: Mapping[str, float],
    train_flops_vs_dense: float,
    steps: int,
    wall_seconds: float,
    final: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` record: :data:`SUMMARY_KEYS`, the ``final`` metrics flat
    (``<split>_<metric>``), then ``extra`` (experiment-specific fields).

    Raises:
      ValueError: ``densities`` lacks a key of :func:`realised_densities`, ``final`` is empty, or
        ``extra`` / ``final`` would overwrite a schema key.
    """
    missing = {"total_params", "forward_nonzero", "backward_nonzero"} - set(densities)
    missing |= {"forward_density", "backward_density"} - set(densities)
    if missing:
        raise ValueError(f"densities is missing {sorted(missing)}")
    if not final:
        raise ValueError("final must hold at least one final metric")
    record: dict[str, Any] = {
        "experiment": experiment,
        "data": data,
        "method": method,
        "forward_sparsity": float(forward_sparsity),
        "backward_sparsity": float(backward_sparsity),
        **{k: densities[k] for k in SUMMARY_KEYS if k in densities},
        "train_flops_vs_dense": float(train_flops_vs_dense),
        "steps": int(steps),
        "wall_seconds": float(wall_seconds),
        "final_metrics": sorted(final),
    }
    for source, values in (("final", final), ("extra", extra or {})):
        clash = set(values) & set(record)
        if clash:
            raise ValueError(f"{source} would overwrite summary keys {sorted(clash)}")
        record.update({k: (float(v) if source == "final" else v) for k, v in values.items()})
    return record


def summary_of_run(
    experiment: str, config: Any, params: Any, opt_state: Any, **fields: Any
) -> dict[str, Any]:
    """:func:`build_summary` with what the config and the final state give: ``data``,
    ``method``, the planned sparsities (``config.sparsity``) and the realised densities;
    ``fields``: ``train_flops_vs_dense``, ``steps``, ``wall_seconds``, ``final``, ``extra``."""
    from experiments.common.sparsity import planned_densities

    forward, backward = planned_densities(config.sparsity)
    return build_summary(
        experiment=experiment,
        data=config.data.name,
        method=config.sparsity.method,
        forward_sparsity=forward,
        backward_sparsity=backward,
        densities=realised_densities(params, opt_state),
        **fields,
    )


def write_json(path: str, record: Mapping[str, Any]) -> None:
    """Write ``record`` as indented JSON, atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def write_summary(workdir: str, summary: Mapping[str, Any]) -> str:
    """Write ``<workdir>/summary.json`` and return its path."""
    path = os.path.join(workdir, SUMMARY_FILE)
    write_json(path, summary)
    return path


def read_summary(workdir: str) -> dict[str, Any] | None:
    """``<workdir>/summary.json`` as a dict, or None when the run has not finished."""
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (None for a package that is not installed)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(path: str) -> dict[str, Any]:
    """``{"commit": SHA or None, "dirty": bool or None}`` of the repository holding ``path``."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", path, *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def provenance() -> dict[str, Any]:
    """What produced a run: versions, the code's git commit, devices, processes, command."""
    import topkast_jax as tk

    devices = jax.devices()
    return {
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "topkast_jax": tk.__version__,
        "packages": package_versions(),
        "git": git_state(os.path.dirname(os.path.abspath(__file__))),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "argv": list(sys.argv),
    }


def write_provenance(workdir: str) -> dict[str, Any]:
    """Write ``<workdir>/provenance.json`` (a resumed run overwrites it: the latest code counts,
    and the previous record is kept as ``provenance.<created_utc>.json``) and return it."""
    record = provenance()
    path = os.path.join(workdir, PROVENANCE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        stamp = str(previous.get("created_utc", "previous")).replace(":", "")
        os.replace(path, os.path.join(workdir, f"provenance.{stamp}.json"))
    write_json(path, record)
    return record
