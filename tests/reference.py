"""A plain-numpy reference of Top-KAST, written from the specification (issue 2), not the library.

Everything here is float64 numpy and deliberately naive: full stable argsorts, Python loops over
leaves and steps.  The tests compare the JAX library against these functions.

Notation (one sparse leaf of ``n`` weights ``theta``):

* ``D = 1 - forward_sparsity`` (forward density), ``D + M = 1 - backward_sparsity``.
* ``k_A = max(1, floor(D n + 0.5))``, ``k_B = max(k_A, floor((D + M) n + 0.5))``.
* ``A`` = the ``k_A`` entries of largest ``|theta|``, ``B`` = the ``k_B`` entries of largest
  ``|theta|``; ties go to the lower row-major index, i.e. the selected set is
  ``np.argsort(-np.abs(theta).ravel(), kind="stable")[:k]``, with the library's NaN rule: a NaN
  ranks as magnitude 0 (after every nonzero value, tied with the zeros by index).
* Exploration penalty ``lam * (0.5 * ||theta_A||^2 + 0.5 * ||theta_{B\\A}||^2 / D)``.
* Inner optimizer: ``optax.sgd`` (plain, heavy-ball or Nesterov momentum) or ``optax.adam``.
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


def magnitudes(values: np.ndarray) -> np.ndarray:
    """``|values|`` flattened, in float64 (exact for every float dtype up to float64), NaN as 0:
    the library's rule (a NaN weight ranks as magnitude 0)."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64)).ravel()
    return np.where(np.isnan(magnitude), 0.0, magnitude)


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Row-major indices of the ``k`` largest ``|values|``, ties to the lower index (NaN as 0)."""
    return np.argsort(-magnitudes(values), kind="stable")[:k]


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
# N:M structured sets (an extension of the paper, issue 12): groups of m consecutive weights
# along one axis, every other index fixed.


def nm_masks(
    theta: np.ndarray, n: int, n_backward: int, m: int, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)``: in every group of ``m`` consecutive entries along ``axis``, the ``n`` (``A``)
    and ``n_backward`` (``B``) of largest ``|theta|``, ties to the lower index in the group (NaN
    as 0), each group by a full stable argsort."""
    theta = np.asarray(theta)
    moved = np.moveaxis(theta, axis, -1)
    groups = moved.reshape(-1, m)
    a = np.zeros(groups.shape, dtype=bool)
    b = np.zeros(groups.shape, dtype=bool)
    for g, values in enumerate(groups):
        order = top_k_indices(values, m)
        a[g, order[:n]] = True
        b[g, order[:n_backward]] = True
    back = [np.moveaxis(x.reshape(moved.shape), -1, axis) for x in (a, b)]
    return back[0], back[1]


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
# The update step, with SGD (optionally heavy-ball or Nesterov momentum, optax.sgd's convention)
# or Adam (optax.adam's) inside.


@dataclasses.dataclass
class LeafConfig:
    """How one leaf is treated: ``sparse`` with densities, or dense."""

    sparse: bool
    forward_density: float = 1.0
    backward_density: float = 1.0
    nm: tuple[int, int, int, int] | None = None  # (n, n_backward, m, axis): N:M sets


@dataclasses.dataclass(frozen=True)
class Adam:
    """``optax.adam(learning_rate, b1, b2, eps)``'s hyperparameters (``eps_root = 0``)."""

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclasses.dataclass
class RefState:
    """Reference optimizer state: masks, momentum traces (Adam: first moments ``mu``), second
    moments ``nu`` (Adam), step count, statistics."""

    a: list[np.ndarray | None]
    b: list[np.ndarray | None]
    trace: list[np.ndarray]
    count: int
    a_at_last_refresh_before: list[np.ndarray | None]  # A before the latest refresh
    reservoir: list[np.ndarray | None]  # C_0: in neither A nor B at init
    ever_in_a: list[np.ndarray | None]
    nu: list[np.ndarray] | None = None


def _leaf_masks(theta, cfg: LeafConfig):
    if not cfg.sparse:
        return None, None
    if cfg.nm is not None:
        return nm_masks(theta, *cfg.nm)
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
        nu=[np.zeros(np.shape(t)) for t in thetas],
    )


def inner_update(
    g: np.ndarray,
    trace: np.ndarray,
    nu: np.ndarray,
    count: int,
    *,
    learning_rate: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    adam: Adam | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(update, trace, nu)`` of one leaf, the ``count``-th update (from 1), as optax computes it.

    SGD: ``trace <- g + momentum * trace``; ``update = -lr * trace`` (Nesterov:
    ``-lr * (g + momentum * trace)``).  Adam: ``mu <- b1 mu + (1 - b1) g``,
    ``nu <- b2 nu + (1 - b2) g^2``, ``update = -lr * mu_hat / (sqrt(nu_hat) + eps)`` with
    ``mu_hat = mu / (1 - b1^count)``, ``nu_hat = nu / (1 - b2^count)`` (``trace`` holds ``mu``).
    """
    if adam is not None:
        mu = adam.b1 * trace + (1.0 - adam.b1) * g
        nu = adam.b2 * nu + (1.0 - adam.b2) * g * g
        mu_hat, nu_hat = mu / (1.0 - adam.b1**count), nu / (1.0 - adam.b2**count)
        return -learning_rate * mu_hat / (np.sqrt(nu_hat) + adam.eps), mu, nu
    if not momentum:
        return -learning_rate * g, np.zeros_like(g), nu
    trace = g + momentum * trace
    direction = g + momentum * trace if nesterov else trace
    return -learning_rate * direction, trace, nu


def step(
    thetas: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    state: RefState,
    cfgs: Sequence[LeafConfig],
    *,
    learning_rate: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    adam: Adam | None = None,
    exploration_l2: float = 0.0,
    refresh_every: int = 1,
    global_topk: bool = False,
    stop_exploration_step: int | None = None,
) -> tuple[list[np.ndarray], RefState]:
    """One Top-KAST step (a)-(e) of the issue; returns new params and state.

    ``grads`` are gradients with respect to ``alpha = theta * A`` (dense leaves: w.r.t. theta).
    The inner optimizer is ``optax.sgd(learning_rate, momentum, nesterov)`` or, with ``adam``,
    ``optax.adam(learning_rate, ...)`` (:func:`inner_update`); its state is zero outside ``B``.
    With ``stop_exploration_step = t``, steps ``count >= t`` use ``B = A``.
    """
    new_thetas, new_trace, new_nu = [], [], []
    backward = effective_backward(state, stop_exploration_step)
    nus = state.nu if state.nu is not None else [np.zeros_like(t) for t in state.trace]
    count = state.count + 1
    for theta, g, a, b, tr, nu, cfg in zip(
        thetas, grads, state.a, backward, state.trace, nus, cfgs, strict=True
    ):
        theta = np.asarray(theta, np.float64)
        g = np.asarray(g, np.float64)
        if cfg.sparse:
            g = np.where(b, g, 0.0)  # (a)
            g = g + penalty_grad(theta, a, b, exploration_l2, cfg.forward_density)  # (b)
        upd, tr, nu = inner_update(  # (c)
            g,
            tr,
            nu,
            count,
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            adam=adam,
        )
        if cfg.sparse:  # (d)
            upd, tr, nu = (np.where(b, x, 0.0) for x in (upd, tr, nu))
        new_thetas.append(theta + upd)
        new_trace.append(tr)
        new_nu.append(nu)
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
        nu=new_nu,
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
