"""N:M structured Top-KAST — an extension of the paper's method, not part of it.

Jayakumar et al. (2020) select ``A`` and ``B`` as the top-``k`` of each whole leaf.  With
``structure=NM(n, m, axis, n_backward)`` (:func:`topkast_jax.topkast`) every leaf is cut along
``axis`` into groups of ``m`` consecutive weights (every other index fixed), and within each group

* ``A`` = the ``n`` weights of largest ``|θ|`` (forward density ``D = n/m``),
* ``B`` = the ``n_B`` weights of largest ``|θ|`` (``n ≤ n_B ≤ m``, so ``A ⊆ B``),

ties to the lower index inside the group, a NaN ranking as magnitude 0 (the library's key, see
:func:`topkast_jax.selection.elementwise_magnitude_keys`).  2:4 along the input axis of a matmul is
the pattern NVIDIA's sparse tensor cores (Ampere and later) accelerate.  Everything else is
Top-KAST as in the paper: the exploration penalty ``λ(½‖θ_A‖² + ½‖θ_{B∖A}‖²/D)`` with
``D = n/m``, updates only inside ``B``, refresh every ``refresh_every`` steps, the
stop-exploration ablation, the statistics.

Default ``axis`` (``axis=None``): ``-2`` for a leaf of rank ``>= 2`` — the input axis of a Dense
kernel ``[in, out]``, the input-channel axis of a conv kernel ``[H, W, in, out]`` (HWIO), the
input axis of a scan-stacked kernel ``[L, in, out]`` — and ``0`` for a vector.  An embedding
``[vocab, features]`` then groups along the vocabulary; give it ``-1`` to group the features
(the contraction axis of a tied output projection) with a per-leaf ``axis``: a pytree like the
params, or a callable ``params -> pytree``, holding an int or ``None`` (the default rule) per leaf.

Selection without sorting: inside a group the rank of weight ``i`` is the number of group members
that beat it, ``r_i = #{j : key_j > key_i or (key_j = key_i and j < i)}`` — ``m`` elementwise
comparisons per weight, ``m²`` per group, exact (the ranks of a group are ``0..m-1``, each once);
``i ∈ A ⟺ r_i < n`` and ``i ∈ B ⟺ r_i < n_B``.  A leaf sharded over explicit mesh axes keeps
its sharding; along the group axis the ranks are computed per shard when every shard holds whole
groups, otherwise with that axis replicated (:func:`group_ranks`).

Each sparse leaf's resolved structure (:class:`LeafNM`) is a static field of its
:class:`~topkast_jax.state.PackedSets` in the optimizer state; :func:`structures` reads it back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from topkast_jax import boxes, selection
from topkast_jax import codes as codes_lib
from topkast_jax import sharding as sharding_lib
from topkast_jax.plan import LeafDensity, unflatten_sparse
from topkast_jax.state import PackedSets, is_set_leaf, sparse_states
from topkast_jax.tree import merge_disjoint

#: Largest group size: ``m`` comparisons per weight stay cheap elementwise work.
MAX_GROUP = 32

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:/\s*(\d+)\s*:\s*(\d+)\s*)?$")


def _check_count(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"NM: {name} must be an integer, got {value!r}.")
    if not low <= int(value) <= high:
        raise ValueError(f"NM: {name} must be in [{low}, {high}], got {int(value)}.")
    return int(value)


@dataclasses.dataclass(frozen=True)
class NM:
    """N:M structure of ``A`` (and ``B``) for :func:`topkast_jax.topkast` (an extension of the
    paper's method; see the module docstring).

    Attributes:
      n: weights kept in ``A`` per group, ``1 <= n <= m``.
      m: group size, ``1 <= m <= MAX_GROUP`` (32).
      axis: the axis the groups of ``m`` consecutive weights run along: an int for every
        sparse leaf (negative counts from the end); ``None`` (default): ``-2`` for leaves of
        rank ``>= 2`` (input axis of a Dense or HWIO conv kernel), ``0`` for vectors; or per
        leaf, a pytree like the params (or a callable ``params -> pytree``) of ints and
        ``None`` (the default rule for that leaf).
      n_backward: weights kept in ``B`` per group, ``n <= n_backward <= m``; ``None`` (default)
        is ``m``: every weight is updated, as ``backward_sparsity=0`` in the unstructured form.
    """

    n: int
    m: int
    axis: Any = None
    n_backward: int | None = None

    def __post_init__(self) -> None:
        m = _check_count("m", self.m, 1, MAX_GROUP)
        _check_count("n", self.n, 1, m)
        if self.n_backward is not None:
            _check_count("n_backward", self.n_backward, int(self.n), m)
        if isinstance(self.axis, bool | str | float):
            raise ValueError(
                f"NM: axis must be an int, None, or a pytree / callable of those per leaf, got "
                f"{self.axis!r}."
            )

    @property
    def n_b(self) -> int:
        """``n_B``, the weights per group in ``B``."""
        return self.m if self.n_backward is None else int(self.n_backward)

    @property
    def forward_sparsity(self) -> float:
        """``1 − n/m``."""
        return 1.0 - self.n / self.m

    @property
    def backward_sparsity(self) -> float:
        """``1 − n_B/m``."""
        return 1.0 - self.n_b / self.m

    @classmethod
    def parse(cls, text: str, axis: int | None = None) -> NM:
        """``"n:m"`` (``B`` dense, ``n_B = m``) or ``"n:m/n_B:m"`` (e.g. ``"2:4/3:4"``) → NM.

        Raises:
          ValueError: a malformed string, two different ``m``, or counts out of range.
        """
        match = _PATTERN.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"structure must be a string 'n:m' or 'n:m/n_B:m' (e.g. '2:4', '2:4/3:4'), "
                f"got {text!r}."
            )
        n, m, n_b, m_b = match.groups()
        if m_b is not None and int(m_b) != int(m):
            raise ValueError(
                f"structure {text!r}: A and B must share the group size m ({m} != {m_b})."
            )
        return cls(int(n), int(m), axis, None if n_b is None else int(n_b))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}/{self.n_b}:{self.m}"


@dataclasses.dataclass(frozen=True)
class LeafNM:
    """The resolved structure of one sparse leaf (hashable: a static field of its
    :class:`~topkast_jax.state.PackedSets`).

    Attributes:
      n: weights of ``A`` per group.
      n_backward: weights of ``B`` per group.
      m: group size.
      axis: the non-negative axis the groups run along; group ``g`` holds indices
        ``g·m … g·m + m − 1`` along it, every other index fixed.
    """

    n: int
    n_backward: int
    m: int
    axis: int


def default_axis(ndim: int) -> int:
    """The default group axis of a rank-``ndim`` leaf: ``ndim − 2`` (input axis) for
    ``ndim >= 2``, else 0."""
    return ndim - 2 if ndim >= 2 else 0


def check_options(
    structure: Any,
    forward_sparsity: Any,
    backward_sparsity: Any,
    *,
    global_topk: bool,
    distribution: str,
    backward_selection: str,
    selection_method: str,
) -> tuple[float, float]:
    """``(forward_sparsity, backward_sparsity)`` implied by ``structure``, after checking that no
    other argument of :func:`topkast_jax.topkast` contradicts it.

    ``forward_sparsity`` / ``backward_sparsity`` may be ``None`` (taken from the structure) or
    equal to ``1 − n/m`` / ``1 − n_B/m``.

    Raises:
      ValueError: naming the argument that conflicts with the structure.
    """
    if not isinstance(structure, NM):
        raise ValueError(
            f"structure must be tk.NM(n, m, ...) or None, got {type(structure).__name__} "
            f"{structure!r}."
        )
    for name, given, implied in (
        ("forward_sparsity", forward_sparsity, structure.forward_sparsity),
        ("backward_sparsity", backward_sparsity, structure.backward_sparsity),
    ):
        if given is not None and not (
            isinstance(given, int | float | np.number) and abs(float(given) - implied) < 1e-9
        ):
            raise ValueError(
                f"{name}={given!r} conflicts with structure={structure}: it implies "
                f"{name}={implied:g}; leave {name} unset (None) with a structure."
            )
    conflicts = {
        "global_topk": (global_topk, False, "groups are selected one by one"),
        "distribution": (distribution, "uniform", "every group keeps n of m"),
        "backward_selection": (backward_selection, "magnitude", "B is the top-n_B of each group"),
        "selection_method": (selection_method, "auto", "groups are ranked by comparisons"),
    }
    for name, (value, allowed, why) in conflicts.items():
        if value != allowed:
            raise ValueError(
                f"{name}={value!r} is not supported with structure={structure} ({why}): use "
                f"{name}={allowed!r}."
            )
    return structure.forward_sparsity, structure.backward_sparsity


def resolve(structure: NM, params: Any, plan: list[LeafDensity]) -> list[LeafNM | None]:
    """The :class:`LeafNM` of every params leaf (``None`` on dense leaves), validated.

    Raises:
      ValueError: naming the leaf — a scalar leaf, an axis out of range, an axis that is the
        leaf's layer axis, or an axis whose length is not a multiple of ``m``.
    """
    out: list[LeafNM | None] = []
    for leaf, spec in zip(plan, _axis_specs(structure.axis, params), strict=True):
        if not leaf.sparse:
            out.append(None)
            continue
        ndim = len(leaf.shape)
        if ndim == 0:
            raise ValueError(f"structure={structure}: sparse leaf {leaf.path!r} is a scalar.")
        if spec is not None and (isinstance(spec, bool) or not isinstance(spec, int | np.integer)):
            raise ValueError(
                f"structure={structure}: the axis of leaf {leaf.path!r} must be an int or None, "
                f"got {spec!r}."
            )
        axis = default_axis(ndim) if spec is None else int(spec)
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"structure={structure}: axis {axis} is out of range for leaf {leaf.path!r} of "
                f"shape {leaf.shape}."
            )
        axis %= ndim
        if axis == leaf.layer_axis:
            raise ValueError(
                f"structure={structure}: the group axis {axis} of leaf {leaf.path!r} is its "
                f"layer axis; give NM(axis=...) another axis."
            )
        if leaf.shape[axis] % structure.m:
            raise ValueError(
                f"structure={structure}: leaf {leaf.path!r} of shape {leaf.shape} has length "
                f"{leaf.shape[axis]} along axis {axis}, not a multiple of m={structure.m}; "
                f"choose another axis, or leave the leaf dense with `sparsify`."
            )
        out.append(LeafNM(structure.n, structure.n_b, structure.m, axis))
    return out


def _axis_specs(axis: Any, params: Any) -> list[Any]:
    """One axis spec (int or None) per params leaf, from an int, None, a pytree or a callable."""
    if axis is None or isinstance(axis, int | np.integer):
        return [axis] * len(jax.tree.leaves(params))
    tree = axis(params) if callable(axis) else axis
    is_leaf = lambda x: x is None  # noqa: E731
    want = jax.tree.structure(boxes.strip(params))
    got = jax.tree.structure(boxes.strip(tree), is_leaf=is_leaf)
    if got != want:
        raise ValueError(
            "NM: axis must be an int, None, or a pytree (or the result of a callable) with the "
            f"structure of params holding an int or None per leaf.\n  params: {want}\n  axis: "
            f"{got}"
        )
    return jax.tree.leaves(boxes.strip(tree), is_leaf=is_leaf)


def group_ranks(keys: jax.Array, m: int, axis: int) -> jax.Array:
    """int32 rank of every entry inside its group of ``m`` consecutive entries along ``axis``:
    ``r_i = #{j in group : key_j > key_i or (key_j = key_i and j < i)}`` (0 = largest).

    Args:
      keys: integer keys of any shape with ``shape[axis] % m == 0``.
      m: group size.
      axis: non-negative group axis.

    Returns:
      int32 ranks shaped like ``keys``.
    """
    shape = keys.shape
    grouped_shape = shape[:axis] + (shape[axis] // m, m) + shape[axis + 1 :]
    leaf_sharding, grouped_sharding = _group_shardings(keys, m, axis)
    grouped = jnp.reshape(keys, grouped_shape, out_sharding=grouped_sharding)
    member = axis + 1  # the within-group axis of ``grouped``
    index = jnp.arange(m).reshape((m,) + (1,) * (len(shape) - axis - 1))
    rank = jnp.zeros(grouped.shape, jnp.int32, out_sharding=grouped_sharding)
    for j in range(m):
        key_j = jax.lax.slice_in_dim(grouped, j, j + 1, axis=member)
        beats = (key_j > grouped) | ((key_j == grouped) & (j < index))
        rank += beats.astype(jnp.int32)
    return jnp.reshape(rank, shape, out_sharding=leaf_sharding)


def _group_shardings(x: jax.Array, m: int, axis: int) -> tuple[Any, Any]:
    """``(leaf sharding, grouped sharding)`` for a leaf over explicit mesh axes, else
    ``(None, None)``.  The grouped array ``[..., L/m, m, ...]`` keeps the group axis's sharding on
    its outer part when every shard holds whole groups; otherwise it is replicated along that axis
    (the groups would straddle devices)."""
    leaf = sharding_lib.explicit_sharding(x)
    if leaf is None:
        return None, None
    spec = tuple(leaf.spec) + (None,) * (x.ndim - len(leaf.spec))
    names = spec[axis]
    devices = math.prod(
        leaf.mesh.shape[n] for n in ((names,) if isinstance(names, str) else names or ())
    )
    outer = names if (x.shape[axis] // devices) % m == 0 else None
    grouped = spec[:axis] + (outer, None) + spec[axis + 1 :]
    return leaf, NamedSharding(leaf.mesh, PartitionSpec(*grouped))


def nm_codes(x: jax.Array, leaf: LeafNM) -> jax.Array:
    """uint8 codes (:mod:`topkast_jax.codes`: 3 on ``A``, 1 on ``B∖A``, 0 outside ``B``) of the
    N:M sets of ``x`` (any float dtype, shape with ``shape[leaf.axis] % leaf.m == 0``)."""
    rank = group_ranks(selection.elementwise_magnitude_keys(x), leaf.m, leaf.axis)
    in_a = jnp.uint8(codes_lib.IN_A | codes_lib.IN_B)
    in_b = jnp.where(rank < leaf.n_backward, jnp.uint8(codes_lib.IN_B), jnp.uint8(0))
    return jnp.where(rank < leaf.n, in_a, in_b)


def select_sets(params: Any, plan: list[LeafDensity], leaves: list[LeafNM | None]) -> Any:
    """``A`` and ``B`` of ``θ`` as :class:`PackedSets` carrying their :class:`LeafNM`
    (``None`` on dense leaves)."""
    sets = [
        PackedSets.from_codes(nm_codes(p, s), structure=s)
        for p, leaf, s in zip(jax.tree.leaves(params), plan, leaves, strict=True)
        if leaf.sparse
    ]
    return unflatten_sparse(params, plan, sets)


def structures(opt_state: optax.OptState) -> Any:
    """Per params leaf, the :class:`LeafNM` of a sparse leaf trained with a structure, ``None``
    on dense leaves and on leaves selected without one (a params-shaped pytree; with several
    sparse states over disjoint leaves, e.g. ``optax.multi_transform`` groups, their trees
    joined, ``optax.MaskedNode`` where no state sees a leaf)."""
    per_state = [_state_structures(state) for state in sparse_states(opt_state)]
    return functools.reduce(
        lambda a, b: merge_disjoint(a, b, is_leaf=lambda x: isinstance(x, LeafNM)), per_state
    )


def _state_structures(state: Any) -> Any:
    """:func:`structures` of one sparse state."""
    sets = getattr(state, "sets", None)
    if sets is None:  # a baseline: bool masks, never structured
        return jax.tree.map(lambda a: None, state.masks.forward)
    return jax.tree.map(lambda s: None if s is None else s.structure, sets, is_leaf=is_set_leaf)
