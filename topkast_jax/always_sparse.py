"""Always-sparse execution of Top-KAST: the device holds only ``B``, the dense ``θ`` the host.

Paper §2.4 / App. C: "the accelerator need only know the actual sparse weights", with the top-k
recomputed on the CPU every ``refresh_every`` steps.  :class:`AlwaysSparse` is an exact refactor of
the masked :func:`topkast_jax.topkast`: the same inputs give the same ``A`` and ``B`` at every step
and, up to float reassociation, the same parameters.

* Device, between steps (:class:`~topkast_jax.always_sparse_device.DeviceState`): per sparse leaf
  ``θ_B[k_B]``, ``idx[k_B]`` int32 ascending, ``in_a[k_B]`` bool and the inner optimizer's state
  for those ``k_B`` entries; dense leaves as they are.  No device array has a sparse leaf's size.
* Each step (jitted, :func:`~topkast_jax.always_sparse_device.device_step`): dense ``α`` per leaf
  from the ``k_B`` values, ``∂L/∂α`` gathered at ``B``, the exploration-penalty gradient, the inner
  optimizer on the ``k_B``-vectors.
* When ``(count + 1) % refresh_every == 0`` (the masked transform's rule), on the host: ``θ_B`` is
  written into the host ``θ`` (numpy, or ``pinned_host`` jax arrays), ``A`` and ``B`` are selected
  exactly (:mod:`topkast_jax.always_sparse_host`), the new ``θ_B``, indices and flags go to the
  device and the inner state is carried over — entries staying in ``B`` keep it, entering ones
  start at zero; the mask statistics are updated on the host
  (:mod:`topkast_jax.always_sparse_history`, :meth:`AlwaysSparse.mask_stats`).

Example:
  >>> import jax.numpy as jnp, optax, topkast_jax as tk
  >>> params = {"w": jnp.arange(1.0, 11.0).reshape(2, 5), "b": jnp.zeros(2)}
  >>> sparse = tk.AlwaysSparse(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
  >>> state = sparse.init(params)
  >>> step = sparse.make_step(lambda p, x: jnp.sum((p["w"] @ x + p["b"]) ** 2))
  >>> state, loss = step(state, jnp.ones(5))
  >>> sparse.masks(state).forward["w"].sum(), sparse.masks(state).backward["w"].sum()
  (np.int64(2), np.int64(5))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from topkast_jax import always_sparse_device as dev
from topkast_jax import always_sparse_history as history_lib
from topkast_jax import always_sparse_host as host
from topkast_jax import masks as masks_lib
from topkast_jax import sparsify as sparsify_lib
from topkast_jax.plan import LeafDensity, check_sparsities, layer_densities, unflatten_sparse
from topkast_jax.state import Masks
from topkast_jax.tree import path_name
from topkast_jax.validation import check_choice, check_distribution, check_int

DeviceState = dev.DeviceState

#: Where the host ``θ`` lives: numpy arrays, or ``jax`` arrays in the ``pinned_host`` memory kind.
HOST_MEMORIES = ("numpy", "pinned_host")


class AlwaysSparseState(NamedTuple):
    """Host and device state of an always-sparse run.

    Attributes:
      count: host int64 scalar, the number of steps taken.
      rng: host uint32[2] PRNG key (advanced at every refresh of the random-``B∖A`` ablation,
        as in the masked transform; unchanged with magnitude ``B``).
      host_params: params-shaped; sparse leaves the dense host ``θ`` (numpy, or with
        ``host_memory="pinned_host"`` a ``jax.Array`` in that memory kind; stale on ``B``
        between refreshes, where the device holds the current values), ``None`` on dense leaves.
      device: the :class:`~topkast_jax.always_sparse_device.DeviceState`.
      history: the host-side mask statistics
        (:class:`~topkast_jax.always_sparse_history.History`: the mask change at the last refresh
        and, with ``track_reservoir``, the packed ever-active and reservoir bits).
    """

    count: np.ndarray
    rng: np.ndarray
    host_params: Any
    device: DeviceState
    history: history_lib.History


def _is_none(x: Any) -> bool:
    return x is None


def _host_leaves(tree: Any) -> list[Any]:
    return jax.tree.leaves(tree, is_leaf=_is_none)


def _placement(params: Any) -> NamedSharding | None:
    """Replicated over the mesh of the first mesh-sharded params leaf, else ``None``."""
    for p in jax.tree.leaves(params):
        sharding = getattr(p, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def _put(x: np.ndarray, like: Any) -> jax.Array:
    """``x`` on the device(s) of ``like`` (a device array or a sharding), else the default
    device, always committed: the step's outputs are committed, and a mix of committed and
    uncommitted inputs would make ``jax.jit`` compile the step again after every refresh."""
    sharding = getattr(like, "sharding", like)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.device_put(x, sharding)


def _committed(tree: Any, placement: NamedSharding | None) -> Any:
    """``tree`` with every uncommitted device array (e.g. an optimizer's step count, which
    depends on no input) placed like :func:`_put`, so the step never sees a mix."""
    return jax.tree.map(lambda x: x if x.committed else _put(x, placement), tree)


def _pinned_host(placement: NamedSharding | None) -> jax.sharding.SingleDeviceSharding:
    """The ``pinned_host`` memory of the first addressable device of ``placement`` (else the
    default device): one host copy of ``θ`` per process, however many devices the mesh has.

    Raises:
      ValueError: the device has no ``pinned_host`` memory kind (naming ``host_memory``).
    """
    devices = placement.addressable_devices if placement is not None else jax.devices()[:1]
    device = min(devices, key=lambda d: d.id)
    kinds = [m.kind for m in device.addressable_memories()]
    if "pinned_host" not in kinds:
        raise ValueError(
            f"host_memory='pinned_host' needs the pinned_host memory kind, but {device} has "
            f"{kinds}; use host_memory='numpy'."
        )
    return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")


def _to_host(theta: np.ndarray, sharding: jax.sharding.Sharding | None) -> Any:
    """``theta`` as it is (numpy), or put in ``sharding``'s (host) memory."""
    return theta if sharding is None else jax.device_put(theta, sharding)


def _own_copy(x: Any, placement: NamedSharding | None) -> jax.Array:
    """A device copy of a dense leaf that the state owns (the step donates it), keeping the
    leaf's sharding when it is a device array."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, x.sharding, may_alias=False)
    return _put(np.asarray(x), placement)


class AlwaysSparse:
    r"""Top-KAST with only ``B`` on the device and the dense ``θ`` on the host.

    Takes the keyword arguments of :func:`topkast_jax.topkast` and gives the same run.

    Args:
      inner: any optax optimizer; it runs on the ``k_B``-vectors (param-shaped state remapped at
        each refresh with ``optax.tree_utils.tree_map_params``).
      forward_sparsity, backward_sparsity, exploration_l2, refresh_every, sparsify, distribution,
        global_topk, backward_selection, stop_exploration_step, seed: as in
        :func:`topkast_jax.topkast`.
      selection_method: only ``"auto"`` (the default): the host selects with numpy
        (:mod:`topkast_jax.always_sparse_host`), which gives the masks of every exact method of
        :func:`topkast_jax.topkast`; any other value raises ``ValueError``.
      track_reservoir: keep, on the host at two bits per sparse weight (bit-packed numpy),
        which weights have ever been in ``A`` and the initial reservoir, so :meth:`mask_stats`
        reports ``reservoir_activated`` (paper Fig. 3); updated at each refresh.  The device
        holds nothing per weight for it.
      host_memory: where the dense host ``θ`` lives: ``"numpy"`` (default) or
        ``"pinned_host"`` — ``jax`` arrays in the backend's ``pinned_host`` memory kind (page-locked
        host memory, which accelerators copy to and from by DMA; ``ValueError`` where the
        device has none).  The selection reads a numpy copy either way, so the run is the same.
      lazy_alpha: the loss receives each sparse leaf as a
        :class:`~topkast_jax.always_sparse_device.SparseLeaf` (``k_B`` values and indices) and
        builds its dense ``α`` where it is used — e.g. inside each Flax Linen layer with
        :func:`topkast_jax.always_sparse_linen.layerwise` — so that not every ``α`` is live at
        once.  Default: the loss receives the dense ``α`` pytree.
      structure: must be ``None``; N:M structure (:class:`topkast_jax.NM`) runs only in
        :func:`topkast_jax.topkast`, and anything else raises ``ValueError``.

    The methods: ``init(params)``, ``make_step(loss_fn)``, ``dense_params(state)``,
    ``masks(state)``, ``mask_stats(state)``, ``device_bytes(state)`` and
    ``device_bytes_per_leaf(params)``.
    """

    def __init__(
        self,
        inner: optax.GradientTransformation,
        *,
        forward_sparsity: float,
        backward_sparsity: float = 0.0,
        exploration_l2: float = 0.0,
        refresh_every: int = 1,
        sparsify: Any = None,
        distribution: str = "uniform",
        global_topk: bool = False,
        backward_selection: str = "magnitude",
        stop_exploration_step: int | None = None,
        selection_method: str = "auto",
        seed: int = 0,
        track_reservoir: bool = False,
        lazy_alpha: bool = False,
        host_memory: str = "numpy",
        structure: Any = None,
    ):
        if structure is not None:
            raise ValueError(
                f"structure={structure!r} is not supported by AlwaysSparse: N:M structure "
                "(tk.NM, an extension of the paper) runs only in the masked mode; use "
                "tk.topkast(..., structure=...) or leave structure=None."
            )
        self.forward_sparsity, self.backward_sparsity = check_sparsities(
            forward_sparsity, backward_sparsity
        )
        self.refresh_every = check_int("refresh_every", refresh_every, 1)
        if isinstance(exploration_l2, jax.core.Tracer) or float(exploration_l2) < 0:
            raise ValueError(f"exploration_l2 must be a number >= 0, got {exploration_l2!r}.")
        self.exploration_l2 = float(exploration_l2)
        self.distribution = check_distribution(distribution)
        if global_topk and distribution != "uniform":
            raise ValueError(
                "global_topk=True sets one threshold for all leaves: use "
                f"distribution='uniform', got {distribution!r}."
            )
        self.backward_selection = check_choice(
            "backward_selection", backward_selection, masks_lib.BACKWARD_SELECTIONS
        )
        self.stop_exploration_step = (
            None
            if stop_exploration_step is None
            else check_int("stop_exploration_step", stop_exploration_step, 0)
        )
        if selection_method != "auto":
            raise ValueError(
                f"selection_method={selection_method!r} is not supported by AlwaysSparse: the host "
                "selects A and B with numpy (one exact partition select per leaf, the masks of "
                "every tk.topkast method); leave selection_method='auto'."
            )
        self.track_reservoir = bool(track_reservoir)
        self.host_memory = check_choice("host_memory", host_memory, HOST_MEMORIES)
        self.inner = inner
        self.global_topk = bool(global_topk)
        self.seed = int(seed)
        self.lazy_alpha = bool(lazy_alpha)
        self.sparsify = sparsify if sparsify is not None else sparsify_lib.default()

    # ----------------------------------------------------------------------------------------
    # Plan and static layout.

    def plan(self, params: Any) -> list[LeafDensity]:
        """The per-leaf plan (:func:`topkast_jax.plan.layer_densities`) of dense-shaped params.

        Raises:
          NotImplementedError: a sparse leaf has a stacked-layer axis in its Flax metadata (this
            mode selects whole leaves; :func:`topkast_jax.topkast` selects per slice).
        """
        plan = layer_densities(
            params,
            sparsify=self.sparsify,
            forward_sparsity=self.forward_sparsity,
            backward_sparsity=self.backward_sparsity,
            distribution=self.distribution,
        )
        stacked = [leaf.path for leaf in plan if leaf.layer_axis is not None]
        if stacked:
            raise NotImplementedError(
                f"AlwaysSparse selects whole leaves, but {stacked} have a stacked-layer axis "
                "('layers' in their Flax metadata), which tk.topkast selects per slice: train "
                "scan-stacked layers with tk.topkast."
            )
        return plan

    @staticmethod
    def abstract_params(state: AlwaysSparseState) -> Any:
        """``jax.ShapeDtypeStruct`` pytree of the dense params the state stands for."""
        return jax.tree.map(
            lambda d, h: jax.ShapeDtypeStruct(np.shape(d) if h is None else h.shape, d.dtype),
            state.device.params,
            state.host_params,
        )

    def _specs(self, state: AlwaysSparseState) -> tuple[dev.LeafSpec | None, ...]:
        return tuple(
            dev.LeafSpec(leaf.shape, leaf.forward) if leaf.sparse else None
            for leaf in self.plan(self.abstract_params(state))
        )

    # ----------------------------------------------------------------------------------------
    # Host-side construction of the device state.

    def _select(self, thetas: list[np.ndarray], plan: list[LeafDensity], rng: np.ndarray):
        return host.select_masks(
            thetas,
            [leaf for leaf in plan if leaf.sparse],
            global_topk=self.global_topk,
            backward_selection=self.backward_selection,
            rng=rng,
        )

    def _stopped(self, count: int) -> bool:
        return self.stop_exploration_step is not None and count >= self.stop_exploration_step

    def _layouts(self, masks: list[tuple[np.ndarray, np.ndarray]], count: int) -> list[host.Layout]:
        if self._stopped(count):  # B ← A (Table 1 ablation)
            masks = [(a, a) for a, _ in masks]
        return [host.layout(a, b) for a, b in masks]

    def init(self, params: Any) -> AlwaysSparseState:
        """Host ``θ`` (a copy of the sparse leaves, numpy or ``pinned_host``) and the device
        ``B``-state.

        Params sharded over a mesh give a device state replicated over that mesh (dense leaves
        keep their sharding).
        """
        plan = self.plan(params)
        with jax.default_device(jax.devices("cpu")[0]):
            rng, mask_rng = np.asarray(jax.random.split(jax.random.PRNGKey(self.seed)))
        leaves, treedef = jax.tree.flatten(params)
        thetas = [np.array(p) for p, leaf in zip(leaves, plan, strict=True) if leaf.sparse]
        layouts = self._layouts(self._select(thetas, plan, mask_rng), 0)
        placement = _placement(params)
        host_sharding = _pinned_host(placement) if self.host_memory == "pinned_host" else None
        it = iter(zip(thetas, layouts, strict=True))
        dev_leaves, idx_leaves, a_leaves, host_leaves = [], [], [], []
        for p, leaf in zip(leaves, plan, strict=True):
            if not leaf.sparse:
                dev_leaves.append(_own_copy(p, placement))
                idx_leaves.append(None)
                a_leaves.append(None)
                host_leaves.append(None)
                continue
            theta, lay = next(it)
            dev_leaves.append(_put(theta.ravel()[lay.indices], placement))
            idx_leaves.append(_put(lay.indices, placement))
            a_leaves.append(_put(lay.in_a, placement))
            host_leaves.append(_to_host(theta, host_sharding))
        compressed = jax.tree.unflatten(treedef, dev_leaves)
        device = DeviceState(
            compressed,
            jax.tree.unflatten(treedef, idx_leaves),
            jax.tree.unflatten(treedef, a_leaves),
            _committed(jax.jit(self.inner.init)(compressed), placement),
        )
        history = history_lib.init_history(layouts, [t.size for t in thetas], self.track_reservoir)
        return AlwaysSparseState(
            np.asarray(0, np.int64), rng, jax.tree.unflatten(treedef, host_leaves), device, history
        )

    # ----------------------------------------------------------------------------------------
    # Training step.

    def make_device_step(
        self,
        loss_fn: Callable[[Any, Any], jax.Array],
        state: AlwaysSparseState,
        *,
        donate: bool = True,
        compiler_options: dict[str, Any] | None = None,
        has_aux: bool = False,
        grad_norm: bool = False,
    ) -> Any:
        """The jitted device step ``(DeviceState, batch) -> (DeviceState, loss)`` for ``state``'s
        layout (for memory analysis: ``.lower(state.device, batch).compile()``); with
        ``grad_norm`` ``(DeviceState, loss, grad_norm)``."""
        fn = functools.partial(
            dev.device_step,
            loss_fn=loss_fn,
            inner=self.inner,
            specs=self._specs(state),
            exploration_l2=self.exploration_l2,
            lazy_alpha=self.lazy_alpha,
            has_aux=has_aux,
            grad_norm=grad_norm,
        )
        return jax.jit(fn, donate_argnums=(0,) if donate else (), compiler_options=compiler_options)

    def make_step(
        self,
        loss_fn: Callable[[Any, Any], jax.Array],
        *,
        donate: bool = True,
        compiler_options: dict[str, Any] | None = None,
        has_aux: bool = False,
        grad_norm: bool = False,
    ) -> Callable[[AlwaysSparseState, Any], tuple[Any, ...]]:
        """``step(state, batch) -> (state, loss)``: one training step, refreshing on schedule.

        Args:
          loss_fn: ``loss_fn(params, batch) -> scalar``, called with the dense ``α`` pytree.
          donate: donate the device state's buffers to the step (the input state is consumed).
          compiler_options: passed to ``jax.jit`` (e.g. ``{"xla_backend_optimization_level": 0}``
            compiles without FMA contraction, which makes the run bitwise equal to the masked one).
          has_aux: ``loss_fn`` returns ``(loss, aux)`` and the step ``(state, (loss, aux))``
            (e.g. a Transformer-XL's next memory).
          grad_norm: the step returns ``(state, loss, grad_norm)``: ``‖∂L/∂α‖₂`` over all leaves
            (the dense gradient, outside ``B`` included, without the penalty) — the masked
            trainers' ``optax.tree.norm`` of ``∂L/∂α``, measured inside each sparse leaf's
            backward pass (:func:`~topkast_jax.always_sparse_device.densify_probed`).
        """
        cache: dict[Any, Any] = {}

        def step(state: AlwaysSparseState, batch: Any):
            specs = self._specs(state)
            if specs not in cache:
                cache[specs] = self.make_device_step(
                    loss_fn,
                    state,
                    donate=donate,
                    compiler_options=compiler_options,
                    has_aux=has_aux,
                    grad_norm=grad_norm,
                )
            device, *outputs = cache[specs](state.device, batch)
            count = int(state.count) + 1
            state = state._replace(count=np.asarray(count, np.int64), device=device)
            refresh = count % self.refresh_every == 0
            stop_now = self.stop_exploration_step == count
            if refresh or stop_now:
                state = self._rebuild(state, reselect=refresh)
            return (state, *outputs)

        return step

    # ----------------------------------------------------------------------------------------
    # Refresh.

    def refresh(self, state: AlwaysSparseState) -> AlwaysSparseState:
        """A refresh now (what :meth:`make_step`'s step does every ``refresh_every`` steps):
        ``θ_B`` to the host, exact selection of ``A`` and ``B``, the new ``B``-state to the
        device with the inner state carried over."""
        return self._rebuild(state, reselect=True)

    @staticmethod
    def _old_layouts(state: AlwaysSparseState) -> list[host.Layout]:
        """The current ``B`` of each sparse leaf (host copies)."""
        pairs = zip(*map(_host_leaves, (state.device.indices, state.device.in_a)), strict=True)
        return [host.Layout(np.asarray(i), np.asarray(a)) for i, a in pairs if i is not None]

    @staticmethod
    def _current_thetas(state: AlwaysSparseState) -> list[np.ndarray]:
        """Dense host ``θ`` of each sparse leaf with the device's ``θ_B`` written in (copies)."""
        rows = zip(
            jax.tree.leaves(state.device.params),
            _host_leaves(state.device.indices),
            _host_leaves(state.host_params),
            strict=True,
        )
        sparse = [(v, np.asarray(i), np.array(h)) for v, i, h in rows if i is not None]
        values_on_host = jax.device_get([v for v, _, _ in sparse])
        thetas = []
        for (_, indices, theta), values in zip(sparse, values_on_host, strict=True):
            theta.reshape(-1)[indices] = values
            thetas.append(theta)
        return thetas

    def _host_tree(self, like: Any, plan: list[LeafDensity], thetas: list[np.ndarray]) -> Any:
        """``host_params``: the sparse leaves' ``θ`` in the host memory of ``host_memory``."""
        sharding = _pinned_host(_placement(like)) if self.host_memory == "pinned_host" else None
        return unflatten_sparse(like, plan, [_to_host(t, sharding) for t in thetas])

    def _rebuild(self, state: AlwaysSparseState, *, reselect: bool) -> AlwaysSparseState:
        """New ``B`` on the device: reselected (a refresh) or ``B ← A`` (exploration stops)."""
        plan = self.plan(self.abstract_params(state))
        thetas = self._current_thetas(state)
        old = self._old_layouts(state)
        rng, mask_rng = state.rng, None
        if reselect:
            if self.backward_selection == "random":  # the masked path's rule (tk.topkast)
                with jax.default_device(jax.devices("cpu")[0]):
                    rng, mask_rng = np.asarray(jax.random.split(jnp.asarray(state.rng)))
            masks = self._select(thetas, plan, mask_rng)
        else:
            masks = [host.flat_masks(lay, t.size) for lay, t in zip(old, thetas, strict=True)]
        new = self._layouts(masks, int(state.count))
        dev_leaves = jax.tree.leaves(state.device.params)
        like = [v for v, leaf in zip(dev_leaves, plan, strict=True) if leaf.sparse]
        pairs = zip(old, new, thetas, strict=True)
        carried = [host.carry_positions(b.indices, a.indices, t.size) for b, a, t in pairs]

        def on_device(rows: list[np.ndarray]) -> Any:
            sparse = [_put(x, ref) for x, ref in zip(rows, like, strict=True)]
            return unflatten_sparse(state.device.params, plan, sparse)

        values = on_device([t.ravel()[lay.indices] for t, lay in zip(thetas, new, strict=True)])
        same_shapes = all(b.indices.shape == a.indices.shape for b, a in zip(old, new, strict=True))
        inner_state = _carry(self.inner, same_shapes)(
            state.device.inner_state,
            on_device([pos for pos, _ in carried]),
            on_device([found for _, found in carried]),
        )
        device = DeviceState(
            jax.tree.map(lambda d, v: d if v is None else v, state.device.params, values),
            on_device([lay.indices for lay in new]),
            on_device([lay.in_a for lay in new]),
            inner_state,
        )
        history = (
            history_lib.refresh_history(state.history, old, new, [t.size for t in thetas])
            if reselect
            else state.history
        )
        return AlwaysSparseState(
            state.count, rng, self._host_tree(state.device.params, plan, thetas), device, history
        )

    # ----------------------------------------------------------------------------------------
    # Inspection.

    def dense_params(self, state: AlwaysSparseState) -> Any:
        """``θ`` as a dense pytree of host (numpy) arrays."""
        thetas = iter(self._current_thetas(state))
        return jax.tree.map(
            lambda d, h: np.asarray(d) if h is None else next(thetas),
            state.device.params,
            state.host_params,
        )

    def forward_params(self, state: AlwaysSparseState) -> Any:
        """``α = θ ⊙ A`` as a dense pytree on the device (for evaluation or export; it has every
        sparse leaf's size, unlike the training state)."""
        return _alpha_fn(self._specs(state))(state.device)

    def masks(self, state: AlwaysSparseState) -> Masks:
        """``Masks(forward=A, backward=B)``: dense bool numpy pytrees, ``None`` on dense leaves."""

        def unpack(h, i, a):
            if i is None:
                return None
            fa, fb = host.flat_masks(host.Layout(np.asarray(i), np.asarray(a)), h.size)
            return fa.reshape(h.shape), fb.reshape(h.shape)

        pairs = jax.tree.map(
            unpack,
            state.host_params,
            state.device.indices,
            state.device.in_a,
            is_leaf=_is_none,
        )
        is_pair = lambda x: x is None or isinstance(x, tuple)  # noqa: E731
        return Masks(
            jax.tree.map(lambda x: None if x is None else x[0], pairs, is_leaf=is_pair),
            jax.tree.map(lambda x: None if x is None else x[1], pairs, is_leaf=is_pair),
        )

    @staticmethod
    def mask_stats(state: AlwaysSparseState, *, per_leaf: bool = True) -> dict[str, float]:
        """The statistics of :func:`topkast_jax.mask_stats` (same names and values), as Python
        floats, from the ``B``-state and the host :class:`~topkast_jax.always_sparse_history.
        History`; no dense array is built.

        Keys: ``forward_density`` and ``backward_density`` (``Σ|A|/Σn``, ``Σ|B|/Σn``, float64),
        ``mask_change`` (mean over sparse leaves of the change at the last refresh),
        ``mask_change_min``, ``mask_change_max``, ``reservoir_activated`` (only with
        ``track_reservoir``); with ``per_leaf`` also ``forward_density/<path>``,
        ``backward_density/<path>`` and ``mask_change/<path>``.  Empty when no leaf is sparse.
        ``|B|`` is the index vector's length; ``|A|`` a sum over the ``k_B`` flags on the device.
        """
        flat, _ = jax.tree_util.tree_flatten_with_path(state.host_params, is_leaf=_is_none)
        rows = [
            (path_name(path), h, i, a)
            for (path, h), i, a in zip(
                flat,
                _host_leaves(state.device.indices),
                _host_leaves(state.device.in_a),
                strict=True,
            )
            if h is not None
        ]
        if not rows:
            return {}
        sizes = np.array([math.prod(np.shape(h)) for _, h, _, _ in rows], np.float64)
        backward = np.array([np.shape(i)[0] for _, _, i, _ in rows], np.float64)
        forward = np.asarray(jax.device_get(_forward_counts([a for *_, a in rows])), np.float64)
        changed = np.asarray(state.history.changed, np.float32)
        out = {
            "forward_density": float(forward.sum() / sizes.sum()),
            "backward_density": float(backward.sum() / sizes.sum()),
            "mask_change": float(changed.mean()),
            "mask_change_min": float(changed.min()),
            "mask_change_max": float(changed.max()),
        }
        reservoir = history_lib.reservoir_fraction(state.history)
        if reservoir is not None:
            out["reservoir_activated"] = float(reservoir)
        if per_leaf:
            for (name, *_), n, f, b, c in zip(rows, sizes, forward, backward, changed, strict=True):
                out[f"forward_density/{name}"] = float(f / n)
                out[f"backward_density/{name}"] = float(b / n)
                out[f"mask_change/{name}"] = float(c)
        return out

    @staticmethod
    def device_bytes(state: AlwaysSparseState) -> int:
        """Bytes the state holds on one device between steps (the most loaded device)."""
        per_device: dict[Any, int] = {}
        for x in jax.tree.leaves(state.device):
            for shard in x.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        return max(per_device.values(), default=0)

    def abstract_state(self, params: Any) -> AlwaysSparseState:
        """The state :meth:`init` would build, as ``jax.ShapeDtypeStruct`` leaves (no compute).

        For lowering the device step without data (memory analysis, dry runs) and as an orbax
        restore target.  With ``global_topk`` a leaf's ``k_B`` depends on the data; the plan's
        per-leaf count stands in for it.
        """
        plan = self.plan(params)
        leaves, treedef = jax.tree.flatten(params)

        def sparse_tree(fn):
            return unflatten_sparse(
                params,
                plan,
                [fn(p, leaf) for p, leaf in zip(leaves, plan, strict=True) if leaf.sparse],
            )

        compressed = jax.tree.unflatten(
            treedef,
            [
                jax.ShapeDtypeStruct((leaf.k_backward,) if leaf.sparse else np.shape(p), p.dtype)
                for p, leaf in zip(leaves, plan, strict=True)
            ],
        )
        device = DeviceState(
            compressed,
            sparse_tree(lambda p, leaf: jax.ShapeDtypeStruct((leaf.k_backward,), np.int32)),
            sparse_tree(lambda p, leaf: jax.ShapeDtypeStruct((leaf.k_backward,), np.bool_)),
            jax.eval_shape(self.inner.init, compressed),
        )
        host = _pinned_host(_placement(params)) if self.host_memory == "pinned_host" else None
        sizes = [leaf.size for leaf in plan if leaf.sparse]
        packed = tuple(jax.ShapeDtypeStruct((-(-n // 8),), np.uint8) for n in sizes)
        history = history_lib.History(
            jax.ShapeDtypeStruct((len(sizes),), np.float32),
            packed if self.track_reservoir else None,
            packed if self.track_reservoir else None,
        )
        return AlwaysSparseState(
            jax.ShapeDtypeStruct((), np.int64),
            jax.ShapeDtypeStruct((2,), np.uint32),
            sparse_tree(lambda p, leaf: jax.ShapeDtypeStruct(leaf.shape, p.dtype, sharding=host)),
            device,
            history,
        )

    def device_bytes_per_leaf(self, params: Any) -> dict[str, int]:
        """Device bytes of each params leaf in this mode, from shapes alone (for dry runs).

        A sparse leaf costs ``k_B × (itemsize + 4 index + 1 flag)`` plus its inner state on
        ``k_B`` entries; a dense leaf its size plus its inner state.  Non-param inner state
        (counts) is reported under ``"<inner non-param state>"``.
        """
        plan = self.plan(params)
        abstract = self.abstract_state(params).device
        compressed = jax.tree.leaves(abstract.params)
        per_leaf = [np.dtype(c.dtype).itemsize * int(np.prod(c.shape)) for c in compressed]
        for i, leaf in enumerate(plan):
            if leaf.sparse:
                per_leaf[i] += leaf.k_backward * (4 + 1)
        inner_abstract = abstract.inner_state
        treedef = jax.tree.structure(params)

        def add_state(x, idx):
            per_leaf[idx] += np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
            return None

        positions = jax.tree.unflatten(treedef, list(range(len(plan))))
        rest = optax.tree_utils.tree_map_params(self.inner, add_state, inner_abstract, positions)
        non_param = sum(
            np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(rest)
        )
        out = {leaf.path: b for leaf, b in zip(plan, per_leaf, strict=True)}
        out["<inner non-param state>"] = non_param
        return out


@jax.jit
def _forward_counts(in_a: list[jax.Array]) -> jax.Array:
    """int32 ``[L]``: ``|A|`` of each sparse leaf, summed over its ``k_B`` flags."""
    return jnp.stack([jnp.sum(a, dtype=jnp.int32) for a in in_a])


@functools.cache
def _alpha_fn(specs: tuple[dev.LeafSpec | None, ...]) -> Any:
    """Jitted ``DeviceState -> α`` for one layout."""

    def alpha(device: DeviceState) -> Any:
        z = dev.forward_values(device.params, device.in_a)
        return dev.model_alpha(z, device.indices, specs, lazy=False)

    return jax.jit(alpha)


@functools.cache
def _carry(inner: optax.GradientTransformation, donate: bool) -> Any:
    """Jitted :func:`~topkast_jax.always_sparse_device.carry_inner_state` for ``inner``."""
    fn = functools.partial(dev.carry_inner_state, inner)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())
