"""Compact export of an experiment's model (issue 12): ``θ ⊙ A`` through :mod:`topkast_jax.export`.

* At the end of a run (``config.export_at_end``), :func:`export_final` writes
  ``<workdir>/export`` and logs its bytes on disk beside the final checkpoint's (params and
  optimizer state) and the dense params' bytes in memory.
* For any finished or running masked workdir of the LM or ImageNet experiment,
  :func:`export_workdir` restores the latest checkpoint (its abstract state rebuilt from
  ``config.json``), writes the export and reports the same, plus the bytes of the dense
  ``θ ⊙ A`` written by orbax the same way (orbax compresses, so the zeros cost little there);
  ``scripts/export.py WORKDIR OUT`` is its command line.

The LM's export is its params pytree, ImageNet's the ResNet's Flax variables ``{"params",
"batch_stats"}`` (:func:`exported_model`).  It loads with ``tk.export.load(path, like=...)`` and
runs densified (``tk.export.densify``) or as BCOO leaves (``tk.export.to_bcoo``); the LM
evaluates it with ``--eval_only --from_export=PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

import topkast_jax as tk
from experiments.common.checkpoint import Checkpointer

#: Where :func:`export_final` writes, inside the workdir.
EXPORT_DIR = "export"
MIB = 2**20


def export_state(
    workdir: str,
    params: Any,
    opt_state: Any,
    checkpoint_dir: str | None,
    log: Callable[[str], None] = print,
    batch_stats: Any = None,
) -> dict[str, int]:
    """:func:`export_final` of :func:`exported_model` of a masked trainer's state."""
    return export_final(
        workdir, exported_model(params, opt_state, batch_stats), checkpoint_dir, log
    )


def exported_model(params: Any, opt_state: Any, batch_stats: Any = None) -> Any:
    """What an experiment exports: ``tk.export.sparse_params(params, opt_state)`` (the LM), or
    with ``batch_stats`` (ImageNet's ResNet) the Flax variables ``{"params": that,
    "batch_stats": batch_stats}``, so ``model.apply(tk.export.densify(...), x, train=False)``
    runs it."""
    exported = tk.export.sparse_params(host_copy(params), host_copy(opt_state))
    if batch_stats is None:
        return exported
    return {"params": exported, "batch_stats": host_copy(batch_stats)}


def host_copy(tree: Any) -> Any:
    """Every array of ``tree`` as host numpy: fully addressable arrays as they are, replicated
    ones (several processes) from this process's copy."""

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_fully_replicated:
                raise ValueError(
                    f"export needs replicated params and optimizer state; an array of shape "
                    f"{x.shape} is sharded over processes ({x.sharding})."
                )
            x = x.addressable_data(0)
        return np.asarray(x)

    return jax.tree.map(local, tree)


def write(path: str, exported: Any) -> int:
    """Save ``exported`` at ``path`` (replacing an older export there; written beside it and
    renamed, so ``path`` never holds half an export) and return its bytes on disk."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    os.rmdir(tmp)
    try:
        tk.export.save(tmp, exported)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tk.export.disk_bytes(path)


def dense_bytes(exported: Any) -> int:
    """Bytes of the dense params an export stands for (each compact leaf at its full shape)."""
    leaves = jax.tree.leaves(exported, is_leaf=tk.export.is_compact)
    return sum(
        int(np.prod(x.shape)) * np.asarray(x.values).dtype.itemsize
        if tk.export.is_compact(x)
        else np.asarray(x).nbytes
        for x in leaves
    )


def sizes(export_bytes: int, checkpoint_dir: str | None, exported: Any) -> dict[str, int]:
    """``export_bytes``, ``checkpoint_bytes`` (on disk; absent without a checkpoint) and
    ``dense_params_bytes`` (the dense params in memory)."""
    out = {"export_bytes": int(export_bytes), "dense_params_bytes": dense_bytes(exported)}
    if checkpoint_dir is not None and os.path.isdir(checkpoint_dir):
        out["checkpoint_bytes"] = tk.export.disk_bytes(checkpoint_dir)
    return out


def format_sizes(path: str, record: dict[str, int]) -> str:
    """One line: the export's bytes on disk against the checkpoint's and the dense params'."""
    e = record["export_bytes"]
    parts = [f"export {path}: {e / MIB:.3f} MiB on disk (theta*A, compact)"]
    if "checkpoint_bytes" in record:
        c = record["checkpoint_bytes"]
        parts.append(
            f"checkpoint {c / MIB:.3f} MiB on disk (params + optimizer state, {c / e:.1f}x)"
        )
    if "dense_export_bytes" in record:
        d = record["dense_export_bytes"]
        parts.append(f"dense theta*A through orbax {d / MIB:.3f} MiB ({d / e:.1f}x)")
    d = record["dense_params_bytes"]
    parts.append(f"dense params {d / MIB:.3f} MiB in memory ({d / e:.1f}x)")
    return " | ".join(parts)


def export_final(
    workdir: str,
    exported: Any,
    checkpoint_dir: str | None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Write ``exported`` to ``<workdir>/export``, log :func:`format_sizes` against the
    checkpoint directory ``checkpoint_dir`` (one step's), return the sizes."""
    path = os.path.join(workdir, EXPORT_DIR)
    record = sizes(write(path, exported), checkpoint_dir, exported)
    log(format_sizes(path, record))
    return record


# ----------------------------------------------------------------------------- any workdir
def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The workdir's ``config.json`` as a ConfigDict.

    Raises:
      FileNotFoundError: no ``config.json`` (not an experiment workdir).
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not an experiment workdir: no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def abstract_train_state(config: ml_collections.ConfigDict) -> tuple[str, Any]:
    """``(experiment, abstract train state)`` of an LM or ImageNet workdir's config (the
    masked trainers' state; every leaf on the first device).

    Raises:
      ValueError: an always-sparse LM workdir (its run writes the export at the end).
    """
    if "image_size" in config:
        from experiments.imagenet import train as imagenet

        model = imagenet.create_model(config)
        params = imagenet.abstract_variables(model, config.image_size)["params"]
        tx, _ = imagenet.make_optimizer(config, params, imagenet.sparsify_fn(config))
        experiment, abstract = (
            "imagenet",
            jax.eval_shape(lambda: imagenet.init_state(model, tx, config)),
        )
    else:
        from experiments.language_model import models
        from experiments.language_model import train as lm

        if config.sparsity.get("always_sparse", False):
            raise ValueError(
                "an always-sparse LM workdir: its checkpoint holds the B-state, not (params, "
                "opt_state); the run writes <workdir>/export at its end (config.export_at_end)."
            )
        model = models.model_from_config(config.model)
        tx, _ = lm.make_optimizer(config, lm.sparsify_fn(config))
        experiment, abstract = (
            "language_model",
            jax.eval_shape(lambda: lm.init_state(config, model, tx)),
        )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return experiment, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )


def export_workdir(workdir: str, out: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export the latest checkpoint of ``workdir`` to ``out`` and report the sizes: the export,
    the checkpoint, the dense ``θ ⊙ A`` saved by orbax (in a temporary directory, removed) and
    the dense params in memory.

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint.
      ValueError: an always-sparse LM workdir; ``out`` exists.
    """
    if os.path.exists(out):
        raise ValueError(f"OUT {out} exists; choose a new path.")
    config = read_config(workdir)
    experiment, abstract = abstract_train_state(config)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), primary=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
        state, _ = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    exported = exported_model(state["params"], state["opt_state"], state.get("batch_stats"))
    record = sizes(write(out, exported), os.path.join(ckpt.directory, str(step)), exported)
    with tempfile.TemporaryDirectory() as tmp:
        dense = os.path.join(tmp, "dense")
        tk.export.save(dense, jax.device_get(tk.export.densify(exported)))
        record["dense_export_bytes"] = tk.export.disk_bytes(dense)
    log(f"{experiment} workdir {workdir}, checkpoint step {step}")
    log(format_sizes(out, record))
    return {"experiment": experiment, "step": step, **record}
