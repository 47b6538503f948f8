"""The one place where experiments turn ``config.sparsity`` into an optax optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

KNOWN_METHODS = ("topkast", "dense", "static", "pruning", "set", "rigl")


def make_sparse_optimizer(
    inner: optax.GradientTransformation,
    sparsity: Any,
    sparsify: Any,
    seed: int = 0,
    num_train_steps: int | None = None,
) -> optax.GradientTransformation:
    """Wrap ``inner`` with the sparse-training method named by ``sparsity.method``.

    Args:
      inner: the dense optimizer (e.g. clipped Adam with its schedule).
      sparsity: config with ``method``, ``forward``, ``backward``, ``refresh_every``,
        ``exploration_l2`` and optionally ``distribution`` (default ``"uniform"``), the
        Top-KAST options of :data:`TOPKAST_OPTIONS` and ``structure`` (:func:`structure_of`:
        N:M Top-KAST, whose ``n/m`` and ``n_B/m`` then replace ``forward`` and ``backward``).
      sparsify: which leaves are sparse (bool pytree or callable params -> bool pytree).
      seed: seed for any randomness of the method (e.g. random backward selection).
      num_train_steps: training length, for baselines whose schedules default to fractions of
        it (``experiments/common/baselines_config.py``).

    Returns:
      A transformation whose state holds the masks; the training step must take the gradient
      w.r.t. ``tk.forward_params(params, opt_state)``.

    ``"dense"`` is Top-KAST with both sparsities 0 and no exploration penalty, so dense and
    sparse runs share every other line of code. ``"static"``, ``"pruning"``, ``"set"`` and
    ``"rigl"`` go to ``tk.baselines`` through ``baselines_config.make_baseline_optimizer``.
    ``config.sparsity.always_sparse=True`` returns :func:`make_always_sparse`'s
    ``tk.AlwaysSparse`` instead (not an optax transformation: its trainer differs).

    Raises:
      ValueError: unknown ``sparsity.method`` (the message lists the known ones), or a Top-KAST
        option or a structure set for another method.
    """
    import topkast_jax as tk

    method = sparsity.method
    if method not in KNOWN_METHODS:
        raise ValueError(
            f"config.sparsity.method={method!r} is not supported; known methods: {KNOWN_METHODS}"
        )
    options = topkast_options(sparsity)
    structure = structure_of(sparsity)
    if structure is not None:
        options["structure"] = structure
    if options and method != "topkast":
        raise ValueError(
            f"config.sparsity options {sorted(options)} only apply to method 'topkast', "
            f"got config.sparsity.method={method!r}"
        )
    if sparsity.get("always_sparse", False):
        return make_always_sparse(inner, sparsity, sparsify, seed)
    if method not in ("topkast", "dense"):
        from experiments.common.baselines_config import make_baseline_optimizer

        return make_baseline_optimizer(
            inner, sparsity, sparsify, num_train_steps=num_train_steps, seed=seed
        )
    dense = method == "dense"
    forward, backward = planned_densities(sparsity)
    return tk.topkast(
        inner,
        forward_sparsity=None if structure is not None else forward,  # N:M: n/m
        backward_sparsity=None if structure is not None else backward,
        exploration_l2=0.0 if dense else float(sparsity.exploration_l2),
        refresh_every=int(sparsity.get("refresh_every", 1)),
        sparsify=sparsify,
        distribution=sparsity.get("distribution", "uniform"),
        seed=seed,
        # The trainers log the paper's Fig. 3 reservoir statistic: 2 more bits per sparse weight.
        track_reservoir=bool(sparsity.get("track_reservoir", True)),
        **options,
    )


def make_always_sparse(
    inner: optax.GradientTransformation, sparsity: Any, sparsify: Any, seed: int = 0
) -> Any:
    """``tk.AlwaysSparse`` for ``config.sparsity.always_sparse=True`` (method ``"topkast"``):
    only B on the device, dense θ on the host (the reservoir statistic kept on the host).

    Raises:
      ValueError: ``always_sparse`` with another method, or with ``structure`` (N:M sets are
        built by the masked ``tk.topkast`` only).
    """
    import topkast_jax as tk

    if sparsity.method != "topkast":
        raise ValueError(
            "config.sparsity.always_sparse=True runs Top-KAST: set config.sparsity.method="
            f"'topkast' (got {sparsity.method!r})."
        )
    if structure_of(sparsity) is not None:
        raise ValueError(
            f"config.sparsity.structure={sparsity.structure!r} is not supported with "
            "config.sparsity.always_sparse=True (tk.AlwaysSparse selects unstructured sets): "
            "use the masked Top-KAST (always_sparse=False)."
        )
    return tk.AlwaysSparse(
        inner,
        forward_sparsity=float(sparsity.forward),
        backward_sparsity=float(sparsity.backward),
        exploration_l2=float(sparsity.exploration_l2),
        refresh_every=int(sparsity.get("refresh_every", 1)),
        sparsify=sparsify,
        distribution=sparsity.get("distribution", "uniform"),
        seed=seed,
        # As in the masked trainers: the Fig. 3 reservoir statistic, 2 host bits per weight.
        track_reservoir=bool(sparsity.get("track_reservoir", True)),
        **topkast_options(sparsity),
    )


#: Top-KAST ablation options (paper Table 1) -> the default under which each is inactive.
TOPKAST_OPTIONS: dict[str, Any] = {
    "backward_selection": "magnitude",
    "stop_exploration_step": None,
    "global_topk": False,
}


def topkast_options(sparsity: Any) -> dict[str, Any]:
    """The Top-KAST options of ``sparsity`` set to something other than their defaults:
    ``backward_selection`` ("random": B∖A drawn at random), ``stop_exploration_step`` (B = A from
    step t on) and ``global_topk`` (one threshold over all sparse leaves)."""
    return {
        name: sparsity.get(name, default)
        for name, default in TOPKAST_OPTIONS.items()
        if sparsity.get(name, default) != default
    }


def structure_of(sparsity: Any) -> Any:
    """``config.sparsity.structure`` as ``tk.NM``, or ``None`` when it is absent or None.

    The string is ``"n:m"`` (``B`` every weight) or ``"n:m/n_B:m"`` (e.g. ``"2:4/3:4"``):
    N:M structured Top-KAST (an extension of the paper's method, ``tk.NM``), groups of ``m``
    along each kernel's input axis; its ``n/m`` and ``n_B/m`` replace ``config.sparsity.forward``
    and ``backward`` (:func:`planned_densities`).

    Raises:
      ValueError: a malformed string (naming the field).
    """
    import topkast_jax as tk

    text = sparsity.get("structure", None)
    if text is None:
        return None
    try:
        return tk.NM.parse(text)
    except ValueError as e:
        raise ValueError(f"config.sparsity.structure={text!r}: {e}") from None


def planned_densities(sparsity: Any) -> tuple[float, float]:
    """(forward, backward) sparsities the method will use for the sparse leaves.

    Dense: (0, 0). Baselines train exactly the weights they use (B = A): (forward, forward).
    Top-KAST with ``structure`` ``"n:m/n_B:m"``: ``(1 − n/m, 1 − n_B/m)``.
    """
    if sparsity.method == "dense":
        return 0.0, 0.0
    if sparsity.method in ("static", "pruning", "set", "rigl"):
        return float(sparsity.forward), float(sparsity.forward)
    structure = structure_of(sparsity)
    if structure is not None:
        return structure.forward_sparsity, structure.backward_sparsity
    return float(sparsity.forward), float(sparsity.backward)


def separate_refresh(sparsity: Any) -> bool:
    """Whether the trainer refreshes A and B in a program of its own
    (:mod:`experiments.common.updates`): masked Top-KAST with ``refresh_every > 1``.  Its train
    step then passes ``refresh_masks=False``; otherwise the step refreshes by itself."""
    every = int(sparsity.get("refresh_every", 1))
    return sparsity.method == "topkast" and every > 1 and not sparsity.get("always_sparse", False)


def refresh_schedule(sparsity: Any) -> Callable[[int], bool]:
    """``due(step)``: whether A and B are refreshed after the update that follows ``step``
    updates — ``(step + 1) % refresh_every == 0``, the decision ``tk.topkast`` takes from its
    ``count`` (``step`` = updates done so far).  With :func:`separate_refresh` the trainer runs
    the refresh program after those updates, so 99 of 100 steps at ``refresh_every = 100`` run
    no selection and the loop compiles the train step once."""
    every = int(sparsity.get("refresh_every", 1))
    return lambda step: (step + 1) % every == 0
