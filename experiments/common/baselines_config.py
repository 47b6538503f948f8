"""``config.sparsity`` -> a baseline optimizer (static, pruning, SET, RigL) from ``tk.baselines``.

:func:`make_baseline_optimizer` is what ``experiments/common/sparsity.py:make_sparse_optimizer``
dispatches to for ``config.sparsity.method`` in :data:`BASELINE_METHODS`.  The baselines train the
weights they use (``B = A``), so their sparsity is ``config.sparsity.forward`` and
``config.sparsity.backward`` is ignored.

Fields (:func:`baseline_fields` holds the defaults; :func:`add_baseline_fields` adds the missing
ones to a config so that ``--config.sparsity.<field>=...`` works on the command line):

=====================  ==============  =========================================================
field                  default         meaning
=====================  ==============  =========================================================
``update_every``       100             SET/RigL: ``ΔT``, steps between mask updates (RigL: 100)
``drop_fraction``      0.3             SET/RigL: ``ζ`` / ``α`` (Mocanu et al. 2018 and RigL: 0.3)
``drop_schedule``      ``""``          SET/RigL: ``"constant"`` or ``"cosine"``; ``""`` = the
                                       method's own (SET constant, RigL cosine)
``end_step``           -1              SET/RigL: ``T_end``, last mask update; pruning: last
                                       pruning step. -1: ``end_fraction · num_train_steps``
``end_fraction``       0.75            RigL: ``T_end`` = 75% of training (Evci et al. 2020); the
                                       same for SET and for the end of pruning
``begin_step``         -1              pruning: ``t₀``. -1: ``begin_fraction · num_train_steps``
``begin_fraction``     0.25            pruning: start after a quarter of training (Zhu & Gupta
                                       prune a partly trained network and stop before the end so
                                       it can recover; the exact fractions are our choice)
``pruning_frequency``  100             pruning: ``Δt`` (Zhu & Gupta: 100 to 1000 steps)
``initial_sparsity``   0.0             pruning: ``s_i``
=====================  ==============  =========================================================
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import optax

BASELINE_METHODS = ("static", "pruning", "set", "rigl")


def baseline_fields() -> ml_collections.ConfigDict:
    """The baselines' hyperparameters with their default values (see the module docstring)."""
    return ml_collections.ConfigDict(
        {
            "update_every": 100,
            "drop_fraction": 0.3,
            "drop_schedule": "",
            "end_step": -1,
            "end_fraction": 0.75,
            "begin_step": -1,
            "begin_fraction": 0.25,
            "pruning_frequency": 100,
            "initial_sparsity": 0.0,
        }
    )


def add_baseline_fields(sparsity: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the fields of :func:`baseline_fields` that ``sparsity`` lacks (in place); returns it."""
    for name, value in baseline_fields().items():
        if name not in sparsity:
            sparsity[name] = value
    return sparsity


def _field(sparsity: Any, name: str) -> Any:
    return sparsity.get(name, baseline_fields()[name])


def resolve_step(sparsity: Any, name: str, num_train_steps: int | None) -> int:
    """``sparsity.<name>_step``, or ``⌊<name>_fraction · num_train_steps⌋`` when it is -1.

    Raises:
      ValueError: the step is -1 and ``num_train_steps`` is unknown, or the fraction is not in
        ``[0, 1]``.
    """
    step = int(_field(sparsity, f"{name}_step"))
    if step != -1:
        return step
    fraction = float(_field(sparsity, f"{name}_fraction"))
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"config.sparsity.{name}_fraction must be in [0, 1], got {fraction}.")
    if num_train_steps is None:
        raise ValueError(
            f"config.sparsity.{name}_step is -1 (use {name}_fraction of training) but "
            "num_train_steps was not given: set config.sparsity."
            f"{name}_step or pass num_train_steps to make_baseline_optimizer."
        )
    return math.floor(fraction * num_train_steps)


def make_baseline_optimizer(
    inner: optax.GradientTransformation,
    sparsity: Any,
    sparsify: Any,
    *,
    num_train_steps: int | None = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """The ``tk.baselines`` transformation named by ``sparsity.method``.

    Args:
      inner: the dense optimizer (e.g. clipped Adam with its schedule).
      sparsity: ``config.sparsity`` with ``method`` in :data:`BASELINE_METHODS`, ``forward``
        (the sparsity), optionally ``distribution`` and the fields of the module docstring.
      sparsify: which leaves are sparse (bool pytree or callable params -> bool pytree).
      num_train_steps: length of training, for the ``*_fraction`` defaults of step fields.
      seed: seed of the random masks (static init, SET/RigL init, SET regrowth).

    Raises:
      ValueError: unknown method, or as the ``tk.baselines`` constructors raise for bad values.
    """
    from topkast_jax import baselines

    method = sparsity.method
    common = dict(
        sparsity=float(sparsity.forward),
        sparsify=sparsify,
        distribution=sparsity.get("distribution", "uniform"),
        seed=seed,
    )
    if method == "static":
        return baselines.static_sparse(inner, **common)
    if method == "pruning":
        return baselines.magnitude_pruning(
            inner,
            begin_step=resolve_step(sparsity, "begin", num_train_steps),
            end_step=resolve_step(sparsity, "end", num_train_steps),
            frequency=int(_field(sparsity, "pruning_frequency")),
            initial_sparsity=float(_field(sparsity, "initial_sparsity")),
            **common,
        )
    if method in ("set", "rigl"):
        build = baselines.set_ if method == "set" else baselines.rigl
        schedule = _field(sparsity, "drop_schedule") or (
            "constant" if method == "set" else "cosine"
        )
        return build(
            inner,
            end_step=resolve_step(sparsity, "end", num_train_steps),
            update_every=int(_field(sparsity, "update_every")),
            drop_fraction=float(_field(sparsity, "drop_fraction")),
            drop_schedule=schedule,
            **common,
        )
    raise ValueError(
        f"config.sparsity.method={method!r} is not a baseline; baselines: {BASELINE_METHODS}."
    )
