"""Drop-and-grow dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

Both start from a random mask (uniform or ERK densities) with ``k`` active weights per leaf and,
every ``update_every`` steps before ``end_step``, in each sparse leaf:

1. drop the ``d_t = ⌊f_t · k + ½⌋`` active weights of smallest ``|θ|`` (the ``k − d_t`` largest
   are kept, ties to the lower index);
2. grow ``d_t`` weights among the others (just-dropped ones included): SET at random, RigL those
   with the largest dense-gradient magnitude ``|∂L/∂α|``.

The count of active weights stays exactly ``k``.  Grown weights start at 0 with zeroed optimizer
state; dropped weights are set to 0.  ``f_t`` is ``drop_fraction`` (``"constant"``, SET's default)
or ``drop_fraction/2 · (1 + cos(πt/end_step))`` (``"cosine"``, RigL's default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from topkast_jax import selection
from topkast_jax.baselines import schedules
from topkast_jax.baselines.base import LeafUpdate, MaskRule, masked_baseline
from topkast_jax.baselines.select import top_k_magnitude_traced, top_k_mask_traced
from topkast_jax.baselines.static import planned_counts, random_mask
from topkast_jax.masks import random_keys
from topkast_jax.plan import LeafDensity
from topkast_jax.validation import check_choice, check_fraction, check_int

GrowKeys = Callable[[LeafUpdate], jax.Array]


def random_grow_keys(leaf: LeafUpdate) -> jax.Array:
    """SET: uniformly random keys, so the grown weights are a uniform random subset."""
    return random_keys(leaf.rng, leaf.mask_N.shape[0])


def gradient_grow_keys(leaf: LeafUpdate) -> jax.Array:
    """RigL: keys ordered like the dense-gradient magnitude ``|∂L/∂α|``."""
    return selection.magnitude_keys(leaf.grads_N)


def drop_and_grow(leaf: LeafUpdate, grow_keys: GrowKeys) -> jax.Array:
    """New mask of one leaf: keep the ``k − d`` largest ``|θ|`` of ``M``, grow ``d`` by key.

    Args:
      leaf: the leaf's mask ``M`` (``k`` active), weights, dense gradient and ``d = leaf.count``.
      grow_keys: scores for growth (larger grows first).

    Returns:
      bool ``[N]`` with exactly ``k`` True entries.
    """
    active = leaf.mask_N.sum(dtype="int32")
    kept_N = top_k_magnitude_traced(leaf.params_N, active - leaf.count, leaf.mask_N)
    grown_N = top_k_mask_traced(grow_keys(leaf), leaf.count, ~kept_N)
    return kept_N | grown_N


def drop_and_grow_rule(
    *, update_every: int, drop_fraction: float, end_step: int, drop_schedule: str, grow: GrowKeys
) -> MaskRule:
    """The :class:`MaskRule` of SET / RigL."""
    steps = schedules.update_steps(update_every, end_step)

    def schedule(sparse_plan: list[LeafDensity]) -> schedules.EventTable:
        rows = []
        for t in steps:
            fraction = schedules.drop_fraction_at(t, drop_fraction, end_step, drop_schedule)
            rows.append([schedules.drop_count(fraction, leaf.k_forward) for leaf in sparse_plan])
        return schedules.make_table(steps, rows, len(sparse_plan))

    return MaskRule(
        initial_counts=planned_counts,
        initial_mask=random_mask,
        schedule=schedule,
        update_mask=lambda leaf: drop_and_grow(leaf, grow),
    )


def _dynamic(
    inner: optax.GradientTransformation,
    *,
    name: str,
    grow: GrowKeys,
    update_every: int,
    drop_fraction: float,
    end_step: int,
    drop_schedule: str,
    **common: Any,
) -> optax.GradientTransformationExtraArgs:
    """SET or RigL: validates the drop-and-grow arguments; ``common`` goes to masked_baseline."""
    rule = drop_and_grow_rule(
        update_every=check_int("update_every", update_every, 1),
        drop_fraction=check_fraction("drop_fraction", drop_fraction),
        end_step=check_int("end_step", end_step, 0),
        drop_schedule=check_choice("drop_schedule", drop_schedule, schedules.DROP_SCHEDULES),
        grow=grow,
    )
    return masked_baseline(inner, rule, name=name, **common)


def set_(
    inner: optax.GradientTransformation,
    *,
    sparsity: float,
    end_step: int,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    drop_schedule: str = "constant",
    sparsify: Any = None,
    distribution: str = "uniform",
    seed: int = 0,
    layer_axis: Any = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop by magnitude, regrow at random.

    Args:
      inner, sparsity, sparsify, distribution, layer_axis: as in
        :func:`~topkast_jax.baselines.static_sparse` (drop and grow per slice).
      end_step: no mask update from this step on.
      update_every: ``ΔT``, steps between mask updates.
      drop_fraction: ``ζ`` (Mocanu et al.: 0.3), the fraction of active weights replaced.
      drop_schedule: ``"constant"`` (SET) or ``"cosine"`` decay to 0 at ``end_step``.
      seed: PRNG seed of the initial mask and the regrowth.

    Returns:
      A transformation like :func:`~topkast_jax.baselines.static_sparse`'s.

    References:
      Mocanu et al., 2018. https://doi.org/10.1038/s41467-018-04316-3
    """
    options = dict(locals())  # exactly the arguments above
    return _dynamic(options.pop("inner"), name="set_", grow=random_grow_keys, **options)


def rigl(
    inner: optax.GradientTransformation,
    *,
    sparsity: float,
    end_step: int,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    drop_schedule: str = "cosine",
    sparsify: Any = None,
    distribution: str = "uniform",
    seed: int = 0,
    layer_axis: Any = "auto",
) -> optax.GradientTransformationExtraArgs:
    """RigL (Evci et al. 2020): drop by magnitude, regrow by dense-gradient magnitude.

    The gradient passed to ``update`` is ``∂L/∂α`` with ``α = tk.forward_params(θ, state)``; for a
    weight outside the mask it is the dense gradient, which RigL ranks to regrow.

    Args:
      inner, sparsity, sparsify, distribution, layer_axis: as in
        :func:`~topkast_jax.baselines.static_sparse` (drop and grow per slice).
      end_step: ``T_end``, no mask update from this step on (RigL: 75% of training).
      update_every: ``ΔT`` (RigL ImageNet: 100).
      drop_fraction: ``α`` (RigL: 0.3), the initial drop fraction.
      drop_schedule: ``"cosine"`` (RigL: ``f_t = α/2 (1 + cos(πt/T_end))``) or ``"constant"``.
      seed: PRNG seed of the initial mask.

    Returns:
      A transformation like :func:`~topkast_jax.baselines.static_sparse`'s.

    References:
      Evci et al., 2020. https://arxiv.org/abs/1911.11134
    """
    options = dict(locals())  # exactly the arguments above
    return _dynamic(options.pop("inner"), name="rigl", grow=gradient_grow_keys, **options)
