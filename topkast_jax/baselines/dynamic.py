"""Drop-and-grow dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

Both follow google-research/rigl (``rigl/sparse_optimizers_base.py``, the code behind RigL's
published runs).  They start from a random mask (uniform or ERK densities) with ``k`` active weights
per leaf and, at the steps ``t = 0, ΔT, 2ΔT, ... ≤ T_end`` (``update_every``, ``end_step``; the
call with ``t`` updates before it, step 0 included), in each sparse leaf:

1. drop the ``d_t = ⌊f_t · k⌋`` active weights of smallest ``|θ|`` (RigL's
   ``int(n_ones · drop_fraction)``; the ``k − d_t`` largest are kept, ties to the lower index);
2. grow ``d_t`` weights among the others (just-dropped ones included; one dropped and regrown
   keeps its value and moments, as RigL's): SET at random, RigL those with the largest
   dense-gradient magnitude ``|∂L/∂α|`` (ties to the lower index, as TF's ``top_k``).

**When.** RigL's ``SparseRigLOptimizer`` updates the mask *instead of* the gradient step: that
call ranks ``θ`` and ``g = ∂L/∂α`` at ``θ``, applies no gradient and does not advance the inner
optimizer (jaxpruner's ``RigL`` does the same).  RigL's ``SparseSETOptimizer`` applies the
gradient step and then updates the mask from ``θ + u``; SET here does that, at the same calls.
In RigL's TF code the mask-update iteration leaves ``global_step`` as it is, so there ΔT gradient
steps separate two updates and each update is one more iteration; here (as in jaxpruner) every
call counts, so ``t`` is the call's ``count`` and ``ΔT − 1`` gradient steps separate two RigL
updates.

**Ties.** RigL adds noise ``N(0, 10⁻⁵)`` to the drop scores ``|θ ⊙ M|``; here the drop score is
``|θ|`` exactly and ties go to the lower index (jaxpruner's rule).  The noise perturbs the order of
weights within about 10⁻⁵ of the threshold, not only ties: measured on a 3×3×256×256 leaf of
normal weights at density 0.2 and ``f = 0.3`` (``d = 35,389``; ``scripts/rigl_drop_noise.py``),
RigL's kept set differs from this one in 12 weights (3e-4 of ``d``) at He-init scale
(σ = 0.0295), 37 at σ = 0.01 and 117 (3e-3) at σ = 0.003 (means of 5 seeds; float32).

The count of active weights stays exactly ``k``.  Grown weights start at 0 with zeroed optimizer
state; dropped weights are set to 0.  ``f_t`` is ``drop_fraction`` (``"constant"``, SET's default)
or ``drop_fraction/2 · (1 + cos(πt/end_step))`` (``"cosine"``, RigL's default; 0 at ``end_step``).
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
    *,
    update_every: int,
    drop_fraction: float,
    end_step: int,
    drop_schedule: str,
    grow: GrowKeys,
    skip_gradient: bool,
) -> MaskRule:
    """The :class:`MaskRule` of SET (``skip_gradient=False``: after the step of the calls
    ``t``, table steps ``t + 1``) / RigL (``True``: instead of it, table steps ``t``)."""
    steps = schedules.update_steps(update_every, end_step)
    keys = [t if skip_gradient else t + 1 for t in steps]

    def schedule(sparse_plan: list[LeafDensity]) -> schedules.EventTable:
        rows = []
        for t in steps:
            fraction = schedules.drop_fraction_at(t, drop_fraction, end_step, drop_schedule)
            rows.append([schedules.drop_count(fraction, leaf.k_forward) for leaf in sparse_plan])
        return schedules.make_table(keys, rows, len(sparse_plan))

    return MaskRule(
        initial_counts=planned_counts,
        initial_mask=random_mask,
        schedule=schedule,
        update_mask=lambda leaf: drop_and_grow(leaf, grow),
        skip_gradient=skip_gradient,
    )


def _dynamic(
    inner: optax.GradientTransformation,
    *,
    name: str,
    grow: GrowKeys,
    skip_gradient: bool,
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
        skip_gradient=skip_gradient,
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

    As RigL's ``SparseSETOptimizer``: the calls ``t = 0, ΔT, ... ≤ end_step`` apply their gradient
    step and then drop ``⌊f_t · k⌋`` weights by ``|θ + u|`` and regrow as many at random (see
    :mod:`topkast_jax.baselines.dynamic`).

    Args:
      inner, sparsity, sparsify, distribution, layer_axis: as in
        :func:`~topkast_jax.baselines.static_sparse` (drop and grow per slice).
      end_step: the last mask update is at the largest multiple of ``update_every`` ``<=`` it.
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
    inner = options.pop("inner")
    return _dynamic(inner, name="set_", grow=random_grow_keys, skip_gradient=False, **options)


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
    weight outside the mask it is the dense gradient, which RigL ranks to regrow.  As RigL's
    ``SparseRigLOptimizer``, the calls ``t = 0, ΔT, ... ≤ end_step`` update the mask *instead of*
    a gradient step: they drop ``⌊f_t · k⌋`` weights by ``|θ|``, grow as many by ``|g|``, return
    a zero update on the weights kept and leave the inner optimizer's state (and its step count)
    as it was (see :mod:`topkast_jax.baselines.dynamic`).

    Args:
      inner, sparsity, sparsify, distribution, layer_axis: as in
        :func:`~topkast_jax.baselines.static_sparse` (drop and grow per slice).
      end_step: ``T_end``, the last mask update is at the largest multiple of ``update_every``
        ``<=`` it (RigL: 75% of training).
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
    inner = options.pop("inner")
    return _dynamic(inner, name="rigl", grow=gradient_grow_keys, skip_gradient=True, **options)
