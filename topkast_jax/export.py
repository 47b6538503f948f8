r"""Compact export of a sparse model: only ``α = θ ⊙ A`` of each sparse leaf, saved and loaded.

:func:`sparse_params` turns ``(params, opt_state)`` of any sparse method (or an
:class:`~topkast_jax.AlwaysSparseState`) into a pytree shaped like the params where each sparse
leaf is a compact leaf and each dense leaf is unchanged.  Three compact layouts; the first two
hold the ``k = |A|`` kept values in ascending flat (row-major) index order:

* :class:`BitmapLeaf` (default) — ``values[k]`` (the leaf's dtype) and ``bitmap[⌈n/8⌉]`` uint8,
  where weight ``i`` of the flattened leaf (``n`` weights) is in ``A`` iff bit ``i mod 8`` of
  byte ``⌊i/8⌋`` is set (little-endian bit order, ``np.packbits(..., bitorder="little")``).
  ``k·s + n/8`` bytes for an ``s``-byte dtype.
* :class:`IndexLeaf` — ``values[k]`` and ``indices[k]`` int32 flat indices, ascending.
  ``k·(s + 4)`` bytes: smaller than the bitmap only below a density of ``1/32`` (float32), but
  it is the coordinate list that :class:`jax.experimental.sparse.BCOO` runs on.
* :class:`NMLeaf` (default for leaves selected with ``tk.NM``, an extension of the paper's
  method) — the values as a dense tensor with the group axis shortened ``m → n`` and each
  value's position in its group at ``⌈log₂ m⌉`` bits: ``k·s + k·⌈log₂ m⌉/8`` bytes (2:4 float32:
  53% of dense).

For float32 at forward sparsity 80/90/95% the bitmap layout holds 23/13/8% of the dense bytes,
the index layout 40/20/10% (``BENCHMARKS.md``, "Compact export", measures them on disk).

:func:`densify` gives back the dense ``θ ⊙ A`` exactly (bitwise: ``+0`` outside ``A``, the stored
values on ``A``); :func:`to_bcoo` gives ``BCOO`` leaves to run a model through
:func:`jax.experimental.sparse.sparsify`.  :func:`save` / :func:`load` write and read a
directory: ``arrays/`` (an orbax checkpoint of the arrays, nested by leaf path) and
``export.json`` (each leaf's layout, shape and dtype).  Saving and loading need
``orbax-checkpoint`` (installed with the ``experiments`` extra); nothing else here does.

Example:
  >>> import jax.numpy as jnp, optax, topkast_jax as tk
  >>> params = {"w": jnp.arange(1.0, 11.0).reshape(2, 5), "b": jnp.zeros(2)}
  >>> tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
  >>> exported = tk.export.sparse_params(params, tx.init(params))
  >>> exported["w"].values, exported["w"].shape
  (array([ 9., 10.], dtype=float32), (2, 5))
  >>> tk.export.densify(exported)["w"]
  Array([[ 0.,  0.,  0.,  0.,  0.],
         [ 0.,  0.,  0.,  9., 10.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from topkast_jax.always_sparse import AlwaysSparseState
from topkast_jax.state import PackedSets, find_sparse_states, get_masks, is_set_leaf
from topkast_jax.tree import path_name
from topkast_jax.validation import check_choice

#: The compact layouts of :func:`sparse_params` (``"nm"``: N:M structured leaves only).
LAYOUTS = ("bitmap", "indices", "nm")
#: ``export.json``'s format name and version.
FORMAT = "topkast-jax sparse export"
VERSION = 1
_ARRAYS = "arrays"
_META = "export.json"


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["values", "bitmap"], meta_fields=["shape"]
)
@dataclasses.dataclass(frozen=True)
class BitmapLeaf:
    """``θ ⊙ A`` of one leaf as its kept values and a packed bitmap of ``A``.

    Attributes:
      values: ``[k]`` the leaf's dtype, ``θ`` at ``A`` in ascending flat index order.
      bitmap: ``[⌈n/8⌉]`` uint8; flat weight ``i`` is in ``A`` iff bit ``i mod 8`` of byte
        ``⌊i/8⌋`` is set (padding bits 0).
      shape: the dense leaf's shape (static).
    """

    values: Any
    bitmap: Any
    shape: tuple[int, ...]

    layout = "bitmap"

    def flat_indices(self) -> np.ndarray:
        """int32 ``[k]`` ascending flat indices of ``A``."""
        bits = np.unpackbits(
            np.asarray(self.bitmap), count=math.prod(self.shape), bitorder="little"
        )
        return np.flatnonzero(bits).astype(np.int32)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["values", "indices"], meta_fields=["shape"]
)
@dataclasses.dataclass(frozen=True)
class IndexLeaf:
    """``θ ⊙ A`` of one leaf as its kept values and their flat indices.

    Attributes:
      values: ``[k]`` the leaf's dtype, ``θ`` at ``A`` in ascending flat index order.
      indices: ``[k]`` int32 ascending flat (row-major) indices of ``A``.
      shape: the dense leaf's shape (static).
    """

    values: Any
    indices: Any
    shape: tuple[int, ...]

    layout = "indices"

    def flat_indices(self) -> np.ndarray:
        """int32 ``[k]`` ascending flat indices of ``A``."""
        return np.asarray(self.indices)


def position_bits(m: int) -> int:
    """Bits per in-group position of an N:M leaf: ``max(1, ⌈log₂ m⌉)`` (2 for ``m = 4``)."""
    return max(1, (m - 1).bit_length())


def pack_positions(positions: np.ndarray, m: int) -> np.ndarray:
    """In-group positions (integers in ``[0, m)``, any shape) → uint8 bit stream: entry ``r``
    (row-major) in bits ``b·r … b·r + b − 1`` (``b`` = :func:`position_bits`), least significant
    first, byte ``j`` holding stream bits ``8j … 8j + 7`` (for 2:4: four positions per byte,
    entry ``r`` in bits ``2(r mod 4)``, ``2(r mod 4) + 1`` of byte ``⌊r/4⌋``)."""
    b = position_bits(m)
    flat = np.asarray(positions).reshape(-1, 1).astype(np.uint8)
    bits = (flat >> np.arange(b, dtype=np.uint8)) & 1
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_positions(packed: np.ndarray, count: int, m: int) -> np.ndarray:
    """Inverse of :func:`pack_positions`: int64 ``[count]`` positions."""
    b = position_bits(m)
    bits = np.unpackbits(np.asarray(packed), count=count * b, bitorder="little")
    return (bits.reshape(count, b).astype(np.int64) << np.arange(b)).sum(axis=1)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "positions"],
    meta_fields=["shape", "m", "axis"],
)
@dataclasses.dataclass(frozen=True)
class NMLeaf:
    """``θ ⊙ A`` of an N:M structured leaf (``tk.NM``; an extension of the paper's method):
    the kept values as a dense tensor with the group axis shortened ``m → n`` per group, and each
    value's position inside its group at ``⌈log₂ m⌉`` bits (2 for 2:4, the layout of NVIDIA's
    2:4 sparse tensor cores: values plus 2-bit indices).

    With ``S`` the leaf's shape, ``G = S[axis]/m`` groups along ``axis``:

    Attributes:
      values: ``S`` with ``S[axis]`` replaced by ``G·n``, the leaf's dtype; entry ``j`` along
        ``axis`` is the ``(j mod n)``-th kept weight (ascending position) of group ``⌊j/n⌋``.
      positions: uint8 bit stream (:func:`pack_positions`) of each value's position
        ``p ∈ [0, m)`` in its group, in the values' row-major order: the value sits at index
        ``⌊j/n⌋·m + p`` along ``axis``.
      shape: ``S`` (static).
      m: group size (static).
      axis: non-negative group axis (static).
    """

    values: Any
    positions: Any
    shape: tuple[int, ...]
    m: int
    axis: int

    layout = "nm"

    def in_group_positions(self) -> np.ndarray:
        """int64 positions ``p`` shaped like ``values``."""
        values = np.asarray(self.values)
        return unpack_positions(self.positions, values.size, self.m).reshape(values.shape)

    def flat_indices(self) -> np.ndarray:
        """int64 flat indices of the values in their row-major order (not ascending)."""
        values_shape = np.shape(self.values)
        n = values_shape[self.axis] * self.m // self.shape[self.axis]
        ndim, flat = len(self.shape), np.zeros(values_shape, np.int64)
        strides = np.cumprod((1, *self.shape[::-1]))[:-1][::-1]
        for d in range(ndim):
            coord = np.arange(values_shape[d]).reshape((-1,) + (1,) * (ndim - d - 1))
            if d == self.axis:
                coord = coord // n * self.m + self.in_group_positions()
            flat = flat + coord * int(strides[d])
        return flat.reshape(-1)


CompactLeaf = BitmapLeaf | IndexLeaf | NMLeaf
_SUPPORT_FIELD = {"bitmap": "bitmap", "indices": "indices", "nm": "positions"}


def is_compact(x: Any) -> bool:
    """Whether ``x`` is a compact leaf (:class:`BitmapLeaf`, :class:`IndexLeaf` or
    :class:`NMLeaf`)."""
    return isinstance(x, BitmapLeaf | IndexLeaf | NMLeaf)


def _nm_leaf(theta: np.ndarray, mask: np.ndarray, structure: Any, name: str) -> NMLeaf:
    """The :class:`NMLeaf` of ``θ ⊙ A`` for a leaf whose ``A`` keeps ``structure.n`` of every
    group of ``structure.m`` along ``structure.axis``."""
    shape, axis, m, n = theta.shape, structure.axis, structure.m, structure.n
    grouped = shape[:axis] + (shape[axis] // m, m) + shape[axis + 1 :]
    t = np.moveaxis(theta.reshape(grouped), axis + 1, -1)
    a = np.moveaxis(mask.reshape(grouped), axis + 1, -1)
    if not np.all(a.sum(axis=-1) == n):
        raise ValueError(f"leaf {name!r}: its forward mask is not {n}:{m} along axis {axis}.")
    positions = np.argsort(~a, axis=-1, kind="stable")[..., :n]  # the kept ones, ascending
    kept = shape[:axis] + (shape[axis] // m * n,) + shape[axis + 1 :]

    def compressed(x):
        return np.moveaxis(x, -1, axis + 1).reshape(kept)

    values = compressed(np.take_along_axis(t, positions, axis=-1))
    return NMLeaf(values, pack_positions(compressed(positions), m), tuple(shape), m, axis)


def _compact(values: np.ndarray, flat: np.ndarray, shape: tuple[int, ...], layout: str):
    """The compact leaf of ``layout`` for ``values`` at ascending flat indices ``flat``."""
    if layout == "indices":
        return IndexLeaf(values, flat.astype(np.int32), tuple(shape))
    bits = np.zeros(math.prod(shape), np.uint8)
    bits[flat] = 1
    return BitmapLeaf(values, np.packbits(bits, bitorder="little"), tuple(shape))


def _leaf_from_mask(
    theta: Any, mask: Any, name: str, layout: str | None, structure: Any = None
) -> CompactLeaf:
    """The compact leaf of ``θ ⊙ A`` for one leaf (host numpy arrays); ``layout=None``: ``"nm"``
    with an N:M ``structure`` (:class:`topkast_jax.nm.LeafNM`), else ``"bitmap"``."""
    theta, mask = np.asarray(theta), np.asarray(mask)
    if theta.shape != mask.shape:
        raise ValueError(
            f"leaf {name!r}: params shape {theta.shape} does not match its mask's "
            f"{mask.shape}; pass the opt_state of these params."
        )
    if layout is None:
        layout = "bitmap" if structure is None else "nm"
    if layout == "nm":
        if structure is None:
            raise ValueError(
                f"layout='nm' needs N:M structured leaves, but leaf {name!r} was selected "
                "without a structure (tk.topkast(..., structure=tk.NM(...)))."
            )
        return _nm_leaf(theta, mask, structure, name)
    flat = np.flatnonzero(mask.reshape(-1))
    return _compact(theta.reshape(-1)[flat], flat, theta.shape, layout)


def sparse_params(params: Any, opt_state: Any = None, *, layout: str | None = None) -> Any:
    """``θ ⊙ A`` with each sparse leaf compact, each dense leaf unchanged.

    Args:
      params: the params pytree ``θ`` — or an :class:`~topkast_jax.AlwaysSparseState`, whose
        device state already holds ``θ_B``, its indices and ``A``-flags (then ``opt_state`` is
        ``None``; no dense leaf is built).
      opt_state: an optimizer state holding the sparse-training state (Top-KAST, a baseline;
        several over disjoint leaves, e.g. ``optax.multi_transform`` groups, are combined),
        wrapped in any optax chain or wrapper.
      layout: ``"bitmap"`` (:class:`BitmapLeaf`, smaller above a density of 1/32),
        ``"indices"`` (:class:`IndexLeaf`) or ``"nm"`` (:class:`NMLeaf`, only for leaves
        selected with ``structure=tk.NM(...)``); ``None`` (default): ``"nm"`` on N:M structured
        leaves, ``"bitmap"`` on the others.

    Returns:
      A pytree of the params' structure: compact leaves (host numpy arrays) on sparse leaves,
      dense leaves as they are.  Stacked leaves (a layer axis) are one compact leaf over all
      their slices.

    Raises:
      ValueError: an unknown ``layout``; ``opt_state`` holds no sparse state (or is given with an
        ``AlwaysSparseState``); a params leaf whose shape is not its mask's (naming the leaf);
        ``layout="nm"`` and a leaf without N:M structure (naming it).
    """
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)
    if isinstance(params, AlwaysSparseState):
        if opt_state is not None:
            raise ValueError(
                "sparse_params: opt_state must be None with an AlwaysSparseState (it holds the "
                "sets itself)."
            )
        if layout == "nm":
            raise ValueError("layout='nm': an AlwaysSparseState has no N:M structured leaves.")
        return _from_always_sparse(params, layout or "bitmap")
    if opt_state is None:
        raise ValueError(
            "sparse_params needs opt_state, the optimizer state holding the sparse method's "
            "masks (or pass an AlwaysSparseState as params)."
        )
    if not find_sparse_states(opt_state):
        raise ValueError(
            "sparse_params: opt_state must contain a sparse-training state (e.g. TopKastState), "
            "found none: there is nothing to export compactly. Pass the state returned by the "
            "sparse optimizer's init/update."
        )
    try:
        forward = get_masks(opt_state, params).forward
    except ValueError as e:
        raise ValueError(f"sparse_params: {e}") from None
    if jax.tree.structure(params) != jax.tree.structure(forward, is_leaf=lambda x: x is None):
        raise ValueError(
            "sparse_params: params and the masks of opt_state differ in structure; pass the "
            "opt_state of these params."
        )
    structures = _structures(opt_state)

    def leaf(path, p, m):
        name = path_name(path)
        return p if m is None else _leaf_from_mask(p, m, name, layout, structures.get(name))

    return jax.tree_util.tree_map_with_path(leaf, params, forward)


def _structures(opt_state: Any) -> dict[str, Any]:
    """``{leaf path name: LeafNM}`` of the N:M structured leaves of every sparse state."""
    out = {}
    for state in find_sparse_states(opt_state):
        flat, _ = jax.tree_util.tree_flatten_with_path(
            getattr(state, "sets", None), is_leaf=is_set_leaf
        )
        for path, sets in flat:
            if isinstance(sets, PackedSets) and sets.structure is not None:
                out[path_name(path)] = sets.structure
    return out


def _from_always_sparse(state: AlwaysSparseState, layout: str) -> Any:
    """Compact leaves from the ``B``-state: the values and indices of the entries flagged in
    ``A`` (``θ_B`` on the device is current; the host ``θ`` is stale on ``B``)."""
    device = state.device

    def leaf(p, idx, in_a, host_theta):
        if idx is None:
            return p
        keep = np.asarray(in_a)
        return _compact(np.asarray(p)[keep], np.asarray(idx)[keep], np.shape(host_theta), layout)

    return jax.tree.map(
        leaf,
        device.params,
        device.indices,
        device.in_a,
        state.host_params,
        is_leaf=lambda x: x is None,
    )


def _dense_leaf(leaf: CompactLeaf) -> np.ndarray:
    """``θ ⊙ A`` of one compact leaf (numpy, the values' dtype, ``+0`` outside ``A``)."""
    values = np.asarray(leaf.values)
    out = np.zeros(math.prod(leaf.shape), values.dtype)
    out[leaf.flat_indices()] = values.reshape(-1)
    return out.reshape(leaf.shape)


def densify(exported: Any) -> Any:
    """The dense ``θ ⊙ A`` pytree (``jax.Array`` leaves) of an export: exactly
    :func:`topkast_jax.forward_params` of the exported ``(params, opt_state)``, bit for bit."""
    return jax.tree.map(
        lambda x: jnp.asarray(_dense_leaf(x) if is_compact(x) else x), exported, is_leaf=is_compact
    )


def to_bcoo(exported: Any) -> Any:
    """The export with each compact leaf as a :class:`jax.experimental.sparse.BCOO` (``nse = k``,
    indices ``[k, ndim]`` int32 sorted and unique); dense leaves unchanged.  Run a function of
    the params with :func:`jax.experimental.sparse.sparsify`."""
    from jax.experimental import sparse

    def bcoo(leaf):
        if not is_compact(leaf):
            return leaf
        flat = leaf.flat_indices()
        order = np.argsort(flat, kind="stable")  # ascending already, except N:M leaves
        coords = np.stack(np.unravel_index(flat[order], leaf.shape), axis=-1)
        values = np.asarray(leaf.values).reshape(-1)[order]
        data = (jnp.asarray(values), jnp.asarray(coords.astype(np.int32)))
        return sparse.BCOO(data, shape=leaf.shape, indices_sorted=True, unique_indices=True)

    return jax.tree.map(bcoo, exported, is_leaf=is_compact)


def nbytes(tree: Any) -> int:
    """Bytes of the arrays of a pytree (an export or a dense one), in memory."""
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def disk_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (a saved export or a checkpoint directory)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


# ------------------------------------------------------------------------------- save / load
def _flat(tree: Any) -> list[tuple[str, Any]]:
    """``(path name, leaf)`` of every leaf, compact leaves whole."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compact)
    return [(path_name(path), leaf) for path, leaf in flat]


def _leaf_meta(leaf: Any) -> dict[str, Any]:
    if is_compact(leaf):
        values = np.asarray(leaf.values)
        meta = {"layout": leaf.layout, "shape": list(leaf.shape), "dtype": values.dtype.name}
        if isinstance(leaf, NMLeaf):
            meta.update(m=leaf.m, axis=leaf.axis, values_shape=list(values.shape))
        return meta
    leaf = np.asarray(leaf)
    return {"layout": "dense", "shape": list(leaf.shape), "dtype": leaf.dtype.name}


def _leaf_arrays(leaf: Any) -> Any:
    if is_compact(leaf):
        field = _SUPPORT_FIELD[leaf.layout]
        return {"values": np.asarray(leaf.values), field: np.asarray(getattr(leaf, field))}
    return np.asarray(leaf)


def _nest(flat: dict[str, Any]) -> Any:
    """``{"a/b": x}`` → ``{"a": {"b": x}}`` (the root leaf, name ``""``, under ``"_"``)."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, last = name.split("/") if name else ["_"]
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _get(nested: dict[str, Any], name: str) -> Any:
    node = nested
    for part in name.split("/") if name else ["_"]:
        node = node[part]
    return node


def _local_checkpointer() -> Any:
    """An orbax ``StandardCheckpointer`` that involves only this process: an export holds host
    arrays, and in a multi-process run only one process writes or reads it (orbax's default
    would wait at a barrier for every process)."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def save(path: str, exported: Any) -> None:
    """Write an export to the directory ``path`` (created; it must not exist yet).

    ``path/arrays`` is an orbax checkpoint of the arrays nested by leaf path (a compact leaf as
    ``{"values", "bitmap"}`` or ``{"values", "indices"}``); ``path/export.json`` names each
    leaf's layout, shape and dtype.

    Raises:
      FileExistsError: ``path`` exists.
      ValueError: two leaves with one path name.
    """

    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"save: path {path} exists; choose a new directory.")
    flat = _flat(exported)
    names = [name for name, _ in flat]
    if len(set(names)) != len(names):
        raise ValueError(f"save: leaves share path names: {sorted(names)}")
    meta = {"format": FORMAT, "version": VERSION, "leaves": {n: _leaf_meta(x) for n, x in flat}}
    checkpointer = _local_checkpointer()
    try:
        checkpointer.save(os.path.join(path, _ARRAYS), _nest({n: _leaf_arrays(x) for n, x in flat}))
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    with open(os.path.join(path, _META), "w") as f:
        json.dump(meta, f, indent=1)


def _read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, _META)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load: no export at path {path} (not a directory).")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"load: path {path} is not a topkast-jax export (no {_META}); write one with "
            "topkast_jax.export.save."
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"load: {meta_path} has format {meta.get('format')!r} version "
            f"{meta.get('version')!r}; this version reads {FORMAT!r} version {VERSION}."
        )
    return meta


def _restore(path: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Arrays of every leaf as host numpy, keyed by path name."""

    checkpointer = _local_checkpointer()
    try:
        nested = checkpointer.restore(os.path.join(path, _ARRAYS))
    finally:
        checkpointer.close()
    return {name: jax.tree.map(np.asarray, _get(nested, name)) for name in meta["leaves"]}


def _rebuild(leaf_meta: dict[str, Any], arrays: Any) -> Any:
    """The leaf described by an ``export.json`` entry, from its restored arrays."""
    shape, layout = tuple(leaf_meta["shape"]), leaf_meta["layout"]
    if layout == "dense":
        return arrays
    if layout == "bitmap":
        return BitmapLeaf(arrays["values"], arrays["bitmap"].astype(np.uint8), shape)
    if layout == "indices":
        return IndexLeaf(arrays["values"], arrays["indices"].astype(np.int32), shape)
    m, axis = int(leaf_meta["m"]), int(leaf_meta["axis"])
    return NMLeaf(arrays["values"], arrays["positions"].astype(np.uint8), shape, m, axis)


def _support_bytes(leaf: CompactLeaf) -> int:
    """The bytes the support array of a compact leaf must have."""
    size = np.size(leaf.values)
    if isinstance(leaf, BitmapLeaf):
        return -(-math.prod(leaf.shape) // 8)
    if isinstance(leaf, NMLeaf):
        return -(-size * position_bits(leaf.m) // 8)
    return 4 * size


def _check_loaded(name: str, leaf_meta: dict[str, Any], leaf: Any) -> None:
    """``ValueError`` naming the leaf when its arrays disagree with ``export.json``."""
    values = leaf.values if is_compact(leaf) else leaf
    dtype, layout = np.dtype(leaf_meta["dtype"]), leaf_meta["layout"]
    shape = tuple(leaf_meta["values_shape" if layout == "nm" else "shape"])
    if values.dtype != dtype or (layout in ("dense", "nm") and values.shape != shape):
        raise ValueError(
            f"load: leaf {name!r} holds {values.dtype}{list(values.shape)}, export.json says "
            f"{dtype}{list(shape)}; the export is corrupt."
        )
    if not is_compact(leaf):
        return
    support = np.asarray(getattr(leaf, _SUPPORT_FIELD[layout]))
    if support.nbytes != _support_bytes(leaf) or (
        layout == "bitmap" and len(leaf.flat_indices()) != values.size
    ):
        raise ValueError(
            f"load: leaf {name!r}: {values.size} values do not fit its {support.nbytes} bytes "
            f"of {_SUPPORT_FIELD[layout]}; the export is corrupt."
        )


def load(path: str, like: Any = None) -> Any:
    """Read an export written by :func:`save` (host numpy arrays).

    Args:
      path: the export's directory.
      like: optional pytree (e.g. the model's params, or ``jax.eval_shape`` of their init) whose
        structure the result takes; its leaves are matched by path name and must have the saved
        shapes.  ``None``: nested dicts by path name (a Flax params dict comes back as itself).

    Raises:
      FileNotFoundError: ``path`` is not a directory, or holds no ``export.json``.
      ValueError: another format or version; a leaf's arrays disagree with ``export.json``;
        with ``like``: leaves missing on either side or a shape mismatch (naming the leaves).
    """
    path = os.path.abspath(path)
    meta = _read_meta(path)
    arrays = _restore(path, meta)
    leaves = {n: _rebuild(m, arrays[n]) for n, m in meta["leaves"].items()}
    for name, leaf in leaves.items():
        _check_loaded(name, meta["leaves"][name], leaf)
    if like is None:
        return _nest(leaves)
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [path_name(p) for p, _ in flat]
    missing, extra = sorted(set(names) - set(leaves)), sorted(set(leaves) - set(names))
    if missing or extra:
        raise ValueError(
            f"load: the export at {path} does not match like: missing leaves {missing}, "
            f"leaves not in like {extra}."
        )
    for name, (_, target) in zip(names, flat, strict=True):
        saved, wanted = tuple(meta["leaves"][name]["shape"]), tuple(np.shape(target))
        if wanted != saved:
            raise ValueError(
                f"load: leaf {name!r} has shape {saved} in the export at {path}, like has {wanted}."
            )
    return jax.tree_util.tree_unflatten(treedef, [leaves[n] for n in names])
