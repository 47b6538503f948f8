"""The optimizer-state types of sparse training and how to find them inside any optax state.

Every sparse method of the library (Top-KAST and the baselines) keeps its masks in a NamedTuple
state with a ``masks: Masks`` field (the baselines: bool arrays) or property (Top-KAST: unpacked
from two bits per weight).  :func:`find_sparse_states` locates those states wherever they
sit inside ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``,
``optax.masked`` / ``optax.multi_transform`` or any other wrapper, so :func:`forward_params` and
:func:`get_masks` work on the whole optimizer state.  Several states (e.g. one Top-KAST per
``multi_transform`` group, with its own sparsity) are combined when their sparse leaves are
disjoint; leaves a state does not see (``optax.MaskedNode`` in its trees) are dense to it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from topkast_jax import codes as codes_lib
from topkast_jax import sharding
from topkast_jax.tree import cover, map_sparse, merge_disjoint


class Masks(NamedTuple):
    """The two sets of Top-KAST, pytrees like the params.

    Attributes:
      forward: ``A`` — bool array (shape of the leaf) on sparse leaves, ``None`` on dense ones.
        The forward pass and the backward pass use ``α = θ ⊙ A``.
      backward: ``B ⊇ A`` — the weights that receive updates.
    """

    forward: Any
    backward: Any


class MaskStats(NamedTuple):
    """Mask dynamics, updated at each refresh (paper Fig. 3).

    Attributes:
      changed: per sparse leaf, float32 scalar ``|A_new \\ A_old| / |A_old|`` at the last refresh.
      ever_active: per sparse leaf, bool mask of the weights that have ever been in ``A``.
      reservoir: per sparse leaf, bool mask of ``C₀`` — weights in neither ``A`` nor ``B`` at init.
    """

    changed: Any
    ever_active: Any
    reservoir: Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["bits"],
    meta_fields=["shape", "axis", "structure"],
)
@dataclasses.dataclass(frozen=True)
class PackedSets:
    """Two bits per weight of one leaf (see :mod:`topkast_jax.codes`): ``bits`` is uint8 of shape
    ``codes.packed_shape(shape, axis)``; ``shape``, ``axis`` (the packing axis) and
    ``structure`` are static.  ``structure`` is the leaf's :class:`topkast_jax.nm.LeafNM` when
    ``A`` and ``B`` are N:M structured (``tk.topkast(..., structure=tk.NM(...))``), else
    ``None``."""

    bits: jax.Array
    shape: tuple[int, ...]
    axis: int = 0
    structure: Any = None

    @classmethod
    def from_codes(cls, code: jax.Array, structure: Any = None) -> PackedSets:
        """Packs uint8 codes (values 0–3) of a leaf along the axis of
        :func:`topkast_jax.sharding.packing_axis`: not explicitly sharded (so the packed array
        keeps the leaf's sharding), and padding least (two bits per weight whatever the shape)."""
        axis = sharding.packing_axis(code, codes_lib.CODES_PER_BYTE)
        return cls(codes_lib.pack(code, axis), tuple(code.shape), axis, structure)

    def codes(self) -> jax.Array:
        """uint8 codes of the leaf's shape."""
        return codes_lib.unpack(self.bits, self.shape, self.axis)


def is_set_leaf(x: Any) -> bool:
    """``None`` (dense leaf) or :class:`PackedSets`: the leaves of a sets pytree."""
    return x is None or isinstance(x, PackedSets)


def _unpack_bit(sets: Any, bit: int) -> jax.Array | None:
    """One bit of a :class:`PackedSets` leaf as bools (``None`` for ``None``).

    Raises:
      ValueError: another type stands where a PackedSets belongs (the state's pytree types were
        rewritten, as ``nnx.Optimizer`` does with its ``opt_state``).
    """
    if sets is None:
        return None
    if not isinstance(sets, PackedSets):
        raise ValueError(
            f"Top-KAST's sets hold a {type(sets).__name__} where a PackedSets belongs: the "
            "state's pytree types were rewritten (an nnx.Optimizer's opt_state?). Read the masks "
            "through the optimizer: tk.nnx.forward_params(params, optimizer), "
            "tk.nnx.optimizer_state(optimizer, params)."
        )
    return (sets.codes() & bit) != 0


def unpack_tree(tree: Any, bit: int) -> Any:
    """Bool pytree (``None`` on dense leaves) of one bit of every :class:`PackedSets` leaf."""
    return jax.tree.map(lambda p: _unpack_bit(p, bit), tree, is_leaf=is_set_leaf)


def sets_masks(sets: Any) -> Masks:
    """``Masks(A, B)`` (bool pytrees) of a pytree of :class:`PackedSets`."""
    return Masks(unpack_tree(sets, codes_lib.IN_A), unpack_tree(sets, codes_lib.IN_B))


class SetStats(NamedTuple):
    """Mask dynamics of :func:`topkast_jax.topkast` at two bits per weight at most.

    Attributes:
      changed: per sparse leaf, float32 scalar ``|A_new ∖ A_old| / |A_old|`` at the last refresh
        (unboxed, like ``TopKastState.densities``).
      history: ``None`` unless ``track_reservoir=True``; then per sparse leaf a
        :class:`PackedSets` whose bit ``codes.IN_A`` marks weights that have ever been in ``A`` and
        bit ``codes.IN_B`` the initial reservoir ``C₀`` (in neither ``A`` nor ``B`` at init).
    """

    changed: Any
    history: Any


class TopKastState(NamedTuple):
    """State of :func:`topkast_jax.topkast`.

    Attributes:
      count: int32 number of updates applied.
      sets: per sparse leaf a :class:`PackedSets` holding ``A`` and ``B`` (2 bits per weight),
        ``None`` on dense leaves; :attr:`masks` unpacks them.
      key_history: the magnitude keys of ``A``'s and ``B``'s thresholds at the last two
        refreshes, int32 ``[2, R, 2]`` (latest first; ``R`` rows: every slice of every sparse
        leaf in tree order, a leaf without a layer axis one slice — one row with
        ``global_topk``; int64 when a sparse leaf is float64), from which the next refresh
        guesses (:mod:`topkast_jax.warm_start`); ``None`` where the sets are not selected by
        magnitude thresholds (N:M structure, the random-``B∖A`` ablation, a selection method
        other than the histogram).
      densities: per sparse leaf, float32 forward density ``D`` (for the penalty): a scalar, or
        for a leaf with a layer axis ``D`` of each slice along that axis, size 1 on the other
        axes (it broadcasts against the leaf).  Stored without the params' Flax boxes, so a
        partitioning setup replicates it.
      exploration_l2: float32 scalar ``λ``.
      stats: mask dynamics (:class:`SetStats`).
      rng: PRNG key (uint32[2]) for the random-``B∖A`` ablation: split once per refresh there,
        left as it is with magnitude ``B`` (nothing else draws from it).
      inner_state: the wrapped optimizer's state, zero outside ``B`` on param-shaped leaves.
    """

    count: jax.Array
    sets: Any
    key_history: Any
    densities: Any
    exploration_l2: jax.Array
    stats: SetStats
    rng: jax.Array
    inner_state: optax.OptState

    @property
    def masks(self) -> Masks:
        """``Masks(A, B)`` as bool pytrees (unpacked; fuses into its consumers under jit)."""
        return sets_masks(self.sets)


def _is_sparse_state(node: Any) -> bool:
    """A NamedTuple state with a ``masks`` field (the baselines) or property (Top-KAST)."""
    return isinstance(node, tuple) and hasattr(type(node), "masks")


def find_sparse_states(opt_state: optax.OptState) -> list[Any]:
    """Every sparse-training state (any NamedTuple with ``masks: Masks``) in ``opt_state``, in
    tree order: one per Top-KAST (or baseline) transformation, e.g. one per
    ``optax.multi_transform`` group that has its own."""
    nodes = jax.tree.leaves(opt_state, is_leaf=_is_sparse_state)
    return [n for n in nodes if _is_sparse_state(n)]


def find_sparse_state(opt_state: optax.OptState) -> Any:
    """The unique sparse-training state (any NamedTuple with ``masks: Masks``) in ``opt_state``.

    Raises:
      ValueError: if ``opt_state`` holds none, or more than one (:func:`sparse_states` gives
        them all).
    """
    found = find_sparse_states(opt_state)
    if len(found) != 1:
        several = (
            " forward_params, get_masks, mask_stats and exploration_penalty combine several "
            "states over disjoint leaves; this function needs one."
            if found
            else ""
        )
        raise ValueError(
            f"opt_state must contain exactly one sparse-training state (e.g. TopKastState), "
            f"found {len(found)}. Pass the state returned by the optimizer's init/update."
            f"{several}"
        )
    return found[0]


def _sparse_members(state: Any) -> Any:
    """Per leaf, what marks the leaves ``state`` makes sparse, read without unpacking: the
    packed sets of Top-KAST, the forward masks of the baselines."""
    return state.sets if isinstance(state, TopKastState) else state.masks.forward


def sparse_states(opt_state: optax.OptState) -> list[Any]:
    """Every sparse-training state in ``opt_state`` (tree order), checked to make disjoint leaves
    sparse.

    Raises:
      ValueError: if ``opt_state`` holds none, or a leaf is sparse in two of them (naming it).
    """
    states = find_sparse_states(opt_state)
    if not states:
        raise ValueError(
            "opt_state must contain a sparse-training state (e.g. TopKastState), found 0. "
            "Pass the state returned by the optimizer's init/update (forward_params, "
            "exploration_penalty, mask_stats and get_masks(opt_state, params) treat a state "
            "without one as dense)."
        )
    functools.reduce(
        lambda a, b: merge_disjoint(a, b, is_leaf=is_set_leaf), map(_sparse_members, states)
    )
    return states


#: Callers already warned that an optimizer state holds no sparse state (once per process each).
_WARNED_DENSE: set[str] = set()


def sparse_states_or_dense(opt_state: optax.OptState, caller: str) -> list[Any]:
    """:func:`sparse_states`, or ``[]`` when ``opt_state`` holds no sparse-training state —
    Top-KAST switched off in a config — with a warning once per process and ``caller``, so one
    code path serves dense and sparse runs (``caller`` then treats every leaf as dense)."""
    if find_sparse_states(opt_state):
        return sparse_states(opt_state)
    if caller not in _WARNED_DENSE:
        _WARNED_DENSE.add(caller)
        warnings.warn(
            f"{caller}: opt_state holds no sparse-training state (no tk.topkast or baseline in "
            "the optimizer): every leaf is treated as dense. Warned once.",
            stacklevel=3,
        )
    return []


def get_masks(opt_state: optax.OptState, params: Any = None) -> Masks:
    """``Masks(forward=A, backward=B)`` from any optimizer state containing sparse methods.

    Several sparse states (over disjoint leaves, e.g. ``optax.multi_transform`` groups with
    their own sparsities) are combined: each leaf's masks come from the state that makes it
    sparse.  A leaf no state sees holds ``optax.MaskedNode()`` (as in the state of a Top-KAST
    under ``optax.masked``); given ``params``, the masks take their structure instead, with
    ``None`` on every leaf no state makes sparse.

    Without any sparse state (Top-KAST switched off), given ``params``: ``None`` on every leaf,
    with a one-time warning.

    Raises:
      ValueError: if ``opt_state`` holds no sparse state and ``params`` is not given, or a leaf
        is sparse in two.
    """
    if params is None:
        states = sparse_states(opt_state)
    elif not (states := sparse_states_or_dense(opt_state, "tk.get_masks")):
        dense = jax.tree.map(lambda _: None, params)
        return Masks(dense, dense)
    masks = [state.masks for state in states]
    forward = functools.reduce(merge_disjoint, [m.forward for m in masks])
    backward = functools.reduce(merge_disjoint, [m.backward for m in masks])
    if params is not None:
        forward, backward = cover(forward, params), cover(backward, params)
    return Masks(forward, backward)


def forward_params(params: Any, opt_state: optax.OptState) -> Any:
    """``α = θ ⊙ A``: sparse leaves masked by the forward set, dense leaves unchanged (with
    several sparse states, each leaf by the state that makes it sparse).

    Pure and jit-able; take gradients of the loss with respect to ``α``.  Without any sparse
    state (Top-KAST switched off): ``params`` unchanged, with a one-time warning.
    """
    if not sparse_states_or_dense(opt_state, "tk.forward_params"):
        return params
    masks = get_masks(opt_state, params)
    return map_sparse(lambda p, a: jnp.where(a, p, jnp.zeros((), p.dtype)), params, masks.forward)


def inner_state(opt_state: optax.OptState) -> optax.OptState:
    """The wrapped (inner) optimizer's state inside the unique sparse-training state of
    ``opt_state`` — for optax functions that read an optimizer's own state, e.g.
    ``optax.contrib.schedule_free_eval_params(tk.inner_state(opt_state), params)``.

    Outside ``B`` its param-shaped leaves hold what the inner optimizer's ``init`` gives at the
    params (as Top-KAST resets them): zero for moments and momenta, ``θ`` for a param-like leaf
    such as schedule-free's ``z``.  With ``backward_sparsity=0`` (``B`` = every weight) nothing
    is reset.

    Raises:
      ValueError: if ``opt_state`` holds no sparse state or several.
    """
    return find_sparse_state(opt_state).inner_state


def legacy_format(saved_paths: Iterable[str], target_paths: Iterable[str]) -> str | None:
    """Why a saved optimizer state cannot restore into this version's :class:`TopKastState`, or
    ``None``.

    ``saved_paths`` and ``target_paths`` are ``"a/b/c"`` key paths of the saved tree (e.g. an
    orbax checkpoint's metadata) and of the state to restore into.  topkast-jax 0.1 stored
    ``A`` and ``B`` as one bool per weight each under ``TopKastState.masks`` (and per-weight
    statistics); this version packs both into ``TopKastState.sets`` at two bits per weight.
    """
    saved = set(saved_paths)
    old = {p.rsplit("/masks/forward", 1)[0] for p in saved if "/masks/forward" in f"/{p}"}
    old = {prefix for prefix in old if f"{prefix}/exploration_l2".lstrip("/") in saved}
    new = any("/sets/" in f"/{p}" for p in target_paths)
    if not (old and new):
        return None
    return (
        "it holds a Top-KAST optimizer state in the format of topkast-jax 0.1 (A and B as one "
        "bool per weight under 'masks', per-weight statistics); this version packs A and B into "
        "'sets' at two bits per weight. Resume it with the version that wrote it, or start anew."
    )


def without_key_history(saved_paths: Iterable[str], target_paths: Iterable[str]) -> str | None:
    """Why a saved optimizer state cannot restore into this version's :class:`TopKastState`
    for want of its ``key_history`` (the thresholds' keys the warm start guesses from), or
    ``None``.  Both are ``"a/b/c"`` key paths, as for :func:`legacy_format`."""
    saved = {f"/{p}" for p in saved_paths}
    target = {f"/{p}" for p in target_paths}
    wanted = sorted({p.rsplit("/key_history", 1)[0] for p in target if p.endswith("/key_history")})
    missing = [
        prefix
        for prefix in wanted
        if any(p.startswith(f"{prefix}/sets/") for p in saved)
        and f"{prefix}/key_history" not in saved
    ]
    if not missing:
        return None
    where = missing[0].lstrip("/") or "the top level"
    return (
        f"its Top-KAST state at '{where}' was written by a topkast-jax without "
        "'key_history' (the thresholds' keys of the last two refreshes, from which a refresh "
        "guesses where to look first); this version keeps them. Resume it with the version that "
        "wrote it, or start anew."
    )


def packing_changed(
    saved_shapes: Mapping[str, tuple[int, ...]], target_shapes: Mapping[str, tuple[int, ...]]
) -> str | None:
    """Why saved packed sets cannot restore into this version's :class:`PackedSets`, or ``None``.

    Both map ``"a/b/c"`` key paths to shapes (e.g. an orbax checkpoint's metadata, the state to
    restore into).  Earlier versions packed every leaf along its first axis not explicitly
    sharded; this one packs along the one that pads least (:func:`topkast_jax.sharding.
    packing_axis`), so the packed bytes of a leaf whose first axis is shorter than 4 (a 1×1 or
    3×3 convolution's ``(H, W, I, O)`` kernel) have another shape."""
    changed = sorted(
        path
        for path, shape in target_shapes.items()
        if path.endswith("/bits")
        and path in saved_shapes
        and tuple(saved_shapes[path]) != tuple(shape)
    )
    if not changed:
        return None
    first = changed[0]
    return (
        "its packed sets were packed along each leaf's first axis by an earlier topkast-jax (a "
        "byte per weight where that axis is shorter than 4, e.g. 1×1 convolutions; "
        f"{len(changed)} leaves differ, e.g. {first}: {tuple(saved_shapes[first])}, here "
        f"{tuple(target_shapes[first])}); this version packs along the axis that pads least, two "
        "bits per weight. Resume it with the version that wrote it, or start anew."
    )
