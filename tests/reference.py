"""A plain-numpy reference of Top-KAST, written from the specification (issue 2), not the library.

Everything here is float64 numpy and deliberately naive: full stable argsorts, Python loops over
leaves and steps.  The tests compare the JAX library against these functions.

Notation (one sparse leaf of ``n`` weights ``theta``):

* ``D = 1 - forward_sparsity`` (forward density), ``D + M = 1 - backward_sparsity``.
* ``k_A = max(1, floor(D n + 0.5))``, ``k_B = max(k_A, floor((D + M) n + 0.5))``.
* ``A`` = the ``k_A`` entries of largest ``|theta|``, ``B`` = the ``k_B`` entries of largest
  ``|theta|``; ties go to the lower row-major index, i.e. the selected set is
  ``np.argsort(-np.abs(theta).ravel(), kind="stable")[:k]``.
* Exploration penalty ``lam * (0.5 * ||theta_A||^2 + 0.5 * ||theta_{B\\A}||^2 / D)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Counts and selection.


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``."""
    return int(math.floor(x + 0.5))


def mask_counts(n: int, forward_density: float, backward_density: float) -> tuple[int, int]:
    """``(k_A, k_B)`` for a leaf of ``n`` weights and densities ``D``, ``D + M``."""
    k_a = max(1, round_half_up(forward_density * n))
    k_b = max(k_a, round_half_up(backward_density * n))
    return min(k_a, n), min(k_b, n)


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Row-major indices of the ``k`` largest ``|values|``, ties to the lower index."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64)).ravel()
    return np.argsort(-magnitude, kind="stable")[:k]


def top_k_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Bool mask (shape of ``values``) of the ``k`` entries of largest ``|values|``."""
    values = np.asarray(values)
    mask = np.zeros(values.size, dtype=bool)
    mask[top_k_indices(values, k)] = True
    return mask.reshape(values.shape)


def magnitude_masks(
    theta: np.ndarray, forward_density: float, backward_density: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` of one leaf by magnitude."""
    k_a, k_b = mask_counts(theta.size, forward_density, backward_density)
    return top_k_mask(theta, k_a), top_k_mask(theta, k_b)


def global_masks(
    thetas: Sequence[np.ndarray], forward_density: float, backward_density: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Global top-k across leaves: one selection over the leaves concatenated (in order).

    ``k_A`` and ``k_B`` use the total size ``N``; ties go to the lower index of the concatenation.
    """
    flat = np.concatenate([np.asarray(t, np.float64).ravel() for t in thetas])
    a_flat, b_flat = magnitude_masks(flat, forward_density, backward_density)
    out, start = [], 0
    for t in thetas:
        stop = start + t.size
        out.append((a_flat[start:stop].reshape(t.shape), b_flat[start:stop].reshape(t.shape)))
        start = stop
    return out


# --------------------------------------------------------------------------------------------
# Scan-stacked leaves: every slice along the layer axis is a leaf of its own.


def split_slices(theta: np.ndarray, axis: int | None) -> list[np.ndarray]:
    """The slices of a leaf along its layer ``axis`` (``[theta]`` when ``axis`` is None)."""
    theta = np.asarray(theta)
    return [theta] if axis is None else [theta.take(i, axis=axis) for i in range(theta.shape[axis])]


def join_slices(slices: Sequence[np.ndarray], axis: int | None) -> np.ndarray:
    """Inverse of :func:`split_slices`."""
    return slices[0] if axis is None else np.stack(slices, axis=axis)


def slice_masks(
    theta: np.ndarray, axis: int | None, forward_density: float, backward_density: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` of a stacked leaf: :func:`magnitude_masks` of each slice, counts per slice."""
    pairs = [
        magnitude_masks(s, forward_density, backward_density) for s in split_slices(theta, axis)
    ]
    return join_slices([a for a, _ in pairs], axis), join_slices([b for _, b in pairs], axis)


def global_slice_masks(
    thetas: Sequence[np.ndarray],
    axes: Sequence[int | None],
    forward_density: float,
    backward_density: float,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Global top-k over every slice of every leaf: :func:`global_masks` of the slices in leaf
    order, then slice order (ties to the lower index of that concatenation)."""
    slices = [split_slices(t, a) for t, a in zip(thetas, axes, strict=True)]
    flat = global_masks([s for leaf in slices for s in leaf], forward_density, backward_density)
    out, start = [], 0
    for leaf, axis in zip(slices, axes, strict=True):
        pairs = flat[start : start + len(leaf)]
        start += len(leaf)
        out.append(
            (join_slices([a for a, _ in pairs], axis), join_slices([b for _, b in pairs], axis))
        )
    return out


# --------------------------------------------------------------------------------------------
# Per-leaf densities.


def erk_densities(shapes: Sequence[tuple[int, ...]], density: float) -> list[float]:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020).

    ``d_l = eps * (sum(shape_l) / prod(shape_l))`` with ``eps`` chosen so that
    ``sum_l d_l n_l = density * sum_l n_l``; a leaf whose ``d_l`` would exceed 1 is made dense
    (``d_l = 1``) and ``eps`` is solved again over the remaining leaves, until none exceeds 1.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    raw = [float(sum(s)) / float(np.prod(s)) for s in shapes]
    budget = density * sum(sizes)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        if not rest:
            return [1.0] * len(shapes)
        remaining = budget - sum(sizes[i] for i in dense)
        eps = remaining / sum(raw[i] * sizes[i] for i in rest)
        over = [i for i in rest if eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.update(over)


# --------------------------------------------------------------------------------------------
# Penalty.


def penalty(
    theta: np.ndarray, a: np.ndarray, b: np.ndarray, lam: float, forward_density: float
) -> float:
    """``lam * (0.5 * ||theta_A||^2 + 0.5 * ||theta_{B\\A}||^2 / D)`` of one leaf."""
    theta = np.asarray(theta, np.float64)
    b_only = b & ~a
    return float(
        lam * (0.5 * np.sum(theta[a] ** 2) + 0.5 * np.sum(theta[b_only] ** 2) / forward_density)
    )


def penalty_grad(
    theta: np.ndarray, a: np.ndarray, b: np.ndarray, lam: float, forward_density: float
) -> np.ndarray:
    """Gradient of :func:`penalty`: ``lam theta`` on A, ``(lam / D) theta`` on B\\A, 0 elsewhere."""
    theta = np.asarray(theta, np.float64)
    return np.where(a, lam * theta, np.where(b & ~a, lam / forward_density * theta, 0.0))


# --------------------------------------------------------------------------------------------
# The update step, with SGD (optionally heavy-ball momentum, optax.sgd's convention) inside.


@dataclasses.dataclass
class LeafConfig:
    """How one leaf is treated: ``sparse`` with densities, or dense."""

    sparse: bool
    forward_density: float = 1.0
    backward_density: float = 1.0


@dataclasses.dataclass
class RefState:
    """Reference optimizer state: masks, momentum traces, step count, statistics."""

    a: list[np.ndarray | None]
    b: list[np.ndarray | None]
    trace: list[np.ndarray]
    count: int
    a_at_last_refresh_before: list[np.ndarray | None]  # A before the latest refresh
    reservoir: list[np.ndarray | None]  # C_0: in neither A nor B at init
    ever_in_a: list[np.ndarray | None]


def _leaf_masks(theta, cfg: LeafConfig):
    if not cfg.sparse:
        return None, None
    return magnitude_masks(theta, cfg.forward_density, cfg.backward_density)


def compute_masks(
    thetas: Sequence[np.ndarray], cfgs: Sequence[LeafConfig], global_topk: bool = False
) -> tuple[list, list]:
    """Masks ``A`` and ``B`` of every leaf (None on dense leaves)."""
    if not global_topk:
        pairs = [_leaf_masks(t, c) for t, c in zip(thetas, cfgs, strict=True)]
    else:
        sparse = [i for i, c in enumerate(cfgs) if c.sparse]
        d = cfgs[sparse[0]].forward_density
        db = cfgs[sparse[0]].backward_density
        glob = global_masks([thetas[i] for i in sparse], d, db)
        pairs = [(None, None)] * len(cfgs)
        for i, pair in zip(sparse, glob, strict=True):
            pairs[i] = pair
    return [p[0] for p in pairs], [p[1] for p in pairs]


def init(
    thetas: Sequence[np.ndarray], cfgs: Sequence[LeafConfig], global_topk: bool = False
) -> RefState:
    """State at step 0: masks from ``theta_0``, zero traces."""
    a, b = compute_masks(thetas, cfgs, global_topk)
    reservoir = [None if ai is None else ~(ai | bi) for ai, bi in zip(a, b, strict=True)]
    return RefState(
        a=a,
        b=b,
        trace=[np.zeros(np.shape(t)) for t in thetas],
        count=0,
        a_at_last_refresh_before=[None if ai is None else ai.copy() for ai in a],
        reservoir=reservoir,
        ever_in_a=[None if ai is None else ai.copy() for ai in a],
    )


def step(
    thetas: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    state: RefState,
    cfgs: Sequence[LeafConfig],
    *,
    learning_rate: float,
    momentum: float = 0.0,
    exploration_l2: float = 0.0,
    refresh_every: int = 1,
    global_topk: bool = False,
    stop_exploration_step: int | None = None,
) -> tuple[list[np.ndarray], RefState]:
    """One Top-KAST step (a)-(e) of the issue; returns new params and state.

    ``grads`` are gradients with respect to ``alpha = theta * A`` (dense leaves: w.r.t. theta).
    The inner optimizer is ``optax.sgd(learning_rate, momentum)``:
    ``trace <- g + momentum * trace``; ``update = -learning_rate * trace``.
    With ``stop_exploration_step = t``, steps ``count >= t`` use ``B = A``.
    """
    new_thetas, new_trace = [], []
    backward = effective_backward(state, stop_exploration_step)
    for theta, g, a, b, tr, cfg in zip(
        thetas, grads, state.a, backward, state.trace, cfgs, strict=True
    ):
        theta = np.asarray(theta, np.float64)
        g = np.asarray(g, np.float64)
        if cfg.sparse:
            g = np.where(b, g, 0.0)  # (a)
            g = g + penalty_grad(theta, a, b, exploration_l2, cfg.forward_density)  # (b)
        tr = g + momentum * tr if momentum else g  # (c)
        upd = -learning_rate * tr
        if cfg.sparse:  # (d)
            upd = np.where(b, upd, 0.0)
            tr = np.where(b, tr, 0.0)
        new_thetas.append(theta + upd)
        new_trace.append(tr if momentum else np.zeros_like(tr))
    count = state.count + 1
    a, b = state.a, state.b
    before = state.a_at_last_refresh_before
    ever = state.ever_in_a
    if count % refresh_every == 0:  # (e)
        before = a
        a, b = compute_masks(new_thetas, cfgs, global_topk)
        ever = [None if e is None else e | ai for e, ai in zip(ever, a, strict=True)]
    return new_thetas, RefState(
        a=a,
        b=b,
        trace=new_trace,
        count=count,
        a_at_last_refresh_before=before,
        reservoir=state.reservoir,
        ever_in_a=ever,
    )


def effective_backward(state: RefState, stop_exploration_step: int | None = None) -> list:
    """``B`` in effect at ``state.count``: ``A`` once ``count >= stop_exploration_step``."""
    if stop_exploration_step is not None and state.count >= stop_exploration_step:
        return list(state.a)
    return list(state.b)


def total_penalty(
    thetas: Sequence[np.ndarray],
    state: RefState,
    cfgs: Sequence[LeafConfig],
    lam: float,
    stop_exploration_step: int | None = None,
) -> float:
    """Exploration penalty summed over sparse leaves."""
    backward = effective_backward(state, stop_exploration_step)
    return sum(
        penalty(t, a, b, lam, c.forward_density)
        for t, a, b, c in zip(thetas, state.a, backward, cfgs, strict=True)
        if c.sparse
    )


def forward_params(thetas: Sequence[np.ndarray], state: RefState) -> list[np.ndarray]:
    """``theta * A`` on sparse leaves, ``theta`` on dense leaves."""
    return [t if a is None else np.where(a, t, 0.0) for t, a in zip(thetas, state.a, strict=True)]


def run(
    thetas: Sequence[np.ndarray],
    cfgs: Sequence[LeafConfig],
    grad_fn: Callable[[list[np.ndarray], int], list[np.ndarray]],
    num_steps: int,
    **step_kwargs,
) -> list[tuple[list[np.ndarray], RefState]]:
    """A trajectory: ``[(theta_t, state_t)]`` for t = 0..num_steps.

    ``grad_fn(alpha, t)`` returns the gradient with respect to ``alpha`` at step ``t``.
    """
    global_topk = step_kwargs.get("global_topk", False)
    state = init(thetas, cfgs, global_topk)
    thetas = [np.asarray(t, np.float64) for t in thetas]
    out = [(thetas, state)]
    for t in range(num_steps):
        grads = grad_fn(forward_params(thetas, state), t)
        thetas, state = step(thetas, grads, state, cfgs, **step_kwargs)
        out.append((thetas, state))
    return out


# --------------------------------------------------------------------------------------------
# Mask statistics.


def mask_change_fraction(a_before: np.ndarray, a_after: np.ndarray) -> float:
    """Fraction of A that changed at a refresh: ``|A_after \\ A_before| / |A_after|``."""
    return float(np.sum(a_after & ~a_before)) / float(np.sum(a_after))


def reservoir_activated(state: RefState) -> float:
    """Fraction of C_0 (all sparse leaves together) that has ever entered A."""
    hits = sum(
        int(np.sum(r & e))
        for r, e in zip(state.reservoir, state.ever_in_a, strict=True)
        if r is not None
    )
    size = sum(int(np.sum(r)) for r in state.reservoir if r is not None)
    return hits / size if size else 0.0
