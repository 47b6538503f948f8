"""Top-KAST as an optax gradient transformation.

Jayakumar, Pascanu, Rae, Osindero, Elsen. *Top-KAST: Top-K Always Sparse Training*. NeurIPS 2020.

Per sparse leaf with dense parameters ``θ`` (never materialised as "dense" on the forward pass):

* ``A`` = top-``D`` fraction of ``|θ|`` (forward set), ``B`` = top-``(D+M)`` fraction (backward
  set, ``A ⊆ B``).  The model sees ``α = θ ⊙ A`` (:func:`topkast_jax.forward_params`) and the
  gradient ``g = ∂L/∂α``.
* ``update(g, state, θ)``:
  (a) ``g ← g ⊙ B``;
  (b) ``g ← g + λ s ⊙ θ`` with ``s = 1`` on ``A``, ``1/D`` on ``B∖A`` — the gradient of the
      exploration penalty ``λ(½‖θ_A‖² + ½‖θ_{B∖A}‖²/D)``;
  (c) the inner optimizer turns ``g`` into ``u``;
  (d) ``u ← u ⊙ B``; the inner optimizer's param-shaped state is zeroed outside ``B`` (as it
      enters the optimizer, see :func:`sparse_inner_update`) — the run equals a truly sparse
      implementation that stores nothing outside ``B``;
  (e) if ``(count + 1) % refresh_every == 0``, ``A`` and ``B`` are recomputed from ``θ + u``.
* Dense leaves (not selected by ``sparsify``) get the inner optimizer's update untouched.

Cost.  The state holds ``A`` and ``B`` at two bits per weight
(:class:`~topkast_jax.state.PackedSets`) and the statistics at no per-weight cost unless
``track_reservoir``; unpacking fuses into the elementwise passes that read the masks.  A refresh
selects with :mod:`topkast_jax.streaming` (a few chunked passes over ``θ + u``, no leaf-sized
temporaries), first near the thresholds extrapolated from the last two refreshes
(:mod:`topkast_jax.warm_start`: one histogram pass instead of two where they hold).  With
``refresh_every > 1`` the refresh sits in a ``lax.cond``, whose compiled program holds both
branches; a training loop that
knows its step passes ``refresh_masks=False`` (a Python bool) to ``update``, so its step contains
no selection at all, and runs :func:`refresh_sets`' program after every ``refresh_every``-th step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from topkast_jax import boxes, distributions, selection, streaming, warm_start
from topkast_jax import codes as codes_lib
from topkast_jax import masks as masks_lib
from topkast_jax import nm as nm_lib
from topkast_jax import sparsify as sparsify_lib
from topkast_jax import stats as stats_lib
from topkast_jax.penalty import add_penalty_gradient
from topkast_jax.plan import LeafDensity, check_sparsities, layer_densities, unflatten_sparse
from topkast_jax.state import PackedSets, TopKastState, is_set_leaf, sets_masks
from topkast_jax.tree import is_masked_node, map_sparse
from topkast_jax.validation import (
    check_choice,
    check_distribution,
    check_inner,
    check_int,
    check_layer_axes,
    check_real,
    check_static,
    check_update_inputs,
)


def _check_hyperparameters(
    refresh_every: Any, exploration_l2: Any, backward_selection: str, stop_step: Any, method: str
) -> None:
    check_int("refresh_every", refresh_every, 1)
    check_real("exploration_l2", exploration_l2, minimum=0.0)
    check_choice("backward_selection", backward_selection, masks_lib.BACKWARD_SELECTIONS)
    if stop_step is not None:
        check_int("stop_exploration_step", stop_step, 0)
    selection.resolve_method(method)


def zero_outside(tree: Any, mask_tree: Any) -> Any:
    """``x ⊙ mask`` on sparse leaves of a params-shaped tree; dense leaves unchanged."""
    return map_sparse(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), tree, mask_tree)


class _Fresh(NamedTuple):
    """A state leaf beside its value in ``inner.init(params)`` (a pair held as one pytree leaf
    by :func:`zero_inner_state_outside`)."""

    value: Any
    fresh: Any


def _is_fresh(x: Any) -> bool:
    return isinstance(x, _Fresh)


def zero_inner_state_outside(
    inner: optax.GradientTransformation,
    inner_state: optax.OptState,
    mask_tree: Any,
    params: Any = None,
) -> optax.OptState:
    """Reset every param-shaped leaf of ``inner_state`` outside ``mask_tree`` (momenta, moments):
    to zero, or with ``params`` to the value ``inner.init(params)`` gives it — zero for every
    moment and momentum, the params themselves for a param-like leaf such as schedule-free's
    ``z`` (so a weight entering ``B`` starts that optimizer afresh at its current ``θ``).

    Leaves an inner ``optax.masked`` / ``optax.multi_transform`` (or ``optax.contrib.muon``)
    keeps no state for are ``optax.MaskedNode`` in it, kept as they are."""
    fresh = jax.tree.map(jnp.zeros_like, inner_state) if params is None else inner.init(params)
    paired = jax.tree.map(_Fresh, inner_state, fresh)

    def reset(pair: Any, m: Any) -> Any:
        if not _is_fresh(pair):  # an optax.MaskedNode
            return pair
        if m is None:  # a dense leaf
            return pair.value
        return jnp.where(m, pair.value, pair.fresh.astype(pair.value.dtype))

    def unpair(tree: Any) -> Any:
        return jax.tree.map(lambda x: x.value if _is_fresh(x) else x, tree, is_leaf=_is_fresh)

    return otu.tree_map_params(
        inner,
        reset,
        paired,
        mask_tree,
        transform_non_params=unpair,
        is_leaf=lambda x: _is_fresh(x) or is_masked_node(x),
    )


def sparse_inner_update(
    inner: optax.GradientTransformation,
    grads: Any,
    inner_state: optax.OptState,
    params: Any,
    backward: Any,
    **extra_args: Any,
) -> tuple[Any, optax.OptState]:
    """Steps (c)–(d): the inner optimizer on ``grads`` with its state reset outside B (to
    ``inner.init(params)``'s values: zero for moments and momenta), then the updates zeroed
    outside B.

    The state is reset as it *enters* the optimizer: the result equals resetting it after the
    previous update (a weight entering ``B`` starts the optimizer afresh) for every optimizer
    whose state stays at its init value under a zero gradient — optax's first-order ones (SGD,
    momentum, Adam(W), RMSprop, ...) and schedule-free's ``z`` — and then the stored state is
    at that value outside ``B`` as well.  Resetting first lets XLA compute the updates from the
    state it stores (no second evaluation of the moments, no copy of the donated state).
    """
    inner = optax.with_extra_args_support(inner)
    inner_state = zero_inner_state_outside(inner, inner_state, backward, params)
    updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
    return zero_outside(updates, backward), inner_state


def _stop_exploration_sets(count: jax.Array, sets: Any, stop_step: int) -> Any:
    """Packed sets with ``B ← A`` once ``count >= stop_step`` (updates to ``B∖A`` stopped after
    step ``t``).  Applied to the sets the state stores (at init and after every update), so the
    masks an update reads are already stopped."""
    stopped = count >= stop_step

    def stop(p: PackedSets) -> PackedSets:
        code = p.codes()
        in_a = jnp.uint8(codes_lib.IN_A | codes_lib.IN_B)
        forward_only = jnp.where(codes_lib.forward_of(code), in_a, jnp.uint8(0))
        return PackedSets.from_codes(jnp.where(stopped, forward_only, code), p.structure)

    return jax.tree.map(lambda p: None if p is None else stop(p), sets, is_leaf=is_set_leaf)


def _streaming_sets(
    params: Any, plan: list[LeafDensity], global_topk: bool, history: jax.Array | None = None
) -> tuple[Any, jax.Array]:
    """Packed ``A``/``B`` of ``θ`` by :mod:`topkast_jax.streaming` (magnitude ``B``) and the
    thresholds' keys history after this selection (:mod:`topkast_jax.warm_start`; ``history``,
    the one before, gives the guesses — ``None``: no guesses, a new history)."""
    xs = [p for p, leaf in zip(jax.tree.leaves(params), plan, strict=True) if leaf.sparse]
    sparse_plan = [leaf for leaf in plan if leaf.sparse]
    axes = [leaf.layer_axis for leaf in sparse_plan]
    guess = None if history is None else warm_start.guess(history)
    if global_topk and xs:
        first = sparse_plan[0]
        k_fwd, k_bwd = distributions.mask_counts(
            first.forward, first.backward, sum(leaf.size for leaf in sparse_plan)
        )
        thresholds = streaming.global_thresholds(xs, k_fwd, k_bwd, axes, guess)
        keys = jnp.reshape(thresholds[0].key, (1, 2))  # one key pair for every leaf
    else:
        thresholds = streaming.leaf_thresholds(
            xs,
            [leaf.slice_k_forward for leaf in sparse_plan],
            [leaf.slice_k_backward for leaf in sparse_plan],
            axes,
            guess,
        )
        keys = streaming.leaf_keys(thresholds)
    sets = [
        PackedSets.from_codes(streaming.codes_from_thresholds(x, th, axis))
        for x, th, axis in zip(xs, thresholds, axes, strict=True)
    ]
    history = warm_start.start(keys) if history is None else warm_start.push(history, keys)
    return unflatten_sparse(params, plan, sets), history


def select_sets(
    params: Any,
    plan: list[LeafDensity],
    *,
    global_topk: bool,
    backward_selection: str,
    rng: jax.Array,
    method: str,
    history: Any = None,
) -> tuple[Any, Any]:
    """``A`` and ``B`` of ``θ`` as :class:`PackedSets`, and the thresholds' keys history.

    The paper's magnitude ``B`` with the histogram method streams (no leaf-sized temporaries),
    guessing from ``history`` (:mod:`topkast_jax.warm_start`) when given; the other methods and
    the random-``B∖A`` ablation go through :func:`masks.topkast_masks` and keep no history
    (``None``).
    """
    if backward_selection == "magnitude" and selection.resolve_method(method) == "histogram":
        return _streaming_sets(params, plan, global_topk, history)
    masks = masks_lib.topkast_masks(
        params,
        plan,
        global_topk=global_topk,
        backward_selection=backward_selection,
        rng=rng,
        method=method,
    )
    sets = jax.tree.map(
        lambda a, b: PackedSets.from_codes(codes_lib.encode(a, b)), masks.forward, masks.backward
    )
    return sets, None


def _after(sets: Any, changed: Any) -> Any:
    """``sets``, unchanged, made to depend on the refresh's statistic ``changed`` (per leaf, a
    select on ``changed >= 0``, always true): XLA then writes them — into the donated buffers of
    the old sets — only after the statistic has read the old sets.  (A data dependency is the
    one order XLA's scheduler keeps; ``lax.optimization_barrier`` did not hold here.)"""
    set_leaves, treedef = jax.tree.flatten(sets, is_leaf=lambda x: isinstance(x, PackedSets))
    changed_leaves = jax.tree.leaves(boxes.strip(changed))

    def after(p: PackedSets, f: jax.Array) -> PackedSets:
        bits = jnp.where(f >= 0, p.bits, jnp.zeros((), p.bits.dtype))
        return PackedSets(bits, p.shape, p.axis, p.structure)

    return treedef.unflatten([after(p, f) for p, f in zip(set_leaves, changed_leaves, strict=True)])


def slice_densities(leaf: LeafDensity) -> jax.Array:
    """float32 forward density ``D`` of a sparse leaf: a scalar, or with a layer axis ``D`` of
    each slice along it (size 1 on the other axes, so it broadcasts against the leaf)."""
    if leaf.layer_axis is None:
        return jnp.asarray(leaf.forward, jnp.float32)
    shape = [leaf.layers if d == leaf.layer_axis else 1 for d in range(len(leaf.shape))]
    return jnp.full(shape, leaf.forward, jnp.float32)


def _is_zero(value: Any) -> bool:
    """``value`` is a concrete number equal to 0 (a traced λ is never skipped)."""
    return not isinstance(value, jax.core.Tracer) and float(value) == 0.0


def topkast(
    inner: optax.GradientTransformation,
    *,
    forward_sparsity: float | None = None,
    backward_sparsity: float | None = None,
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
    layer_axis: Any = "auto",
    structure: nm_lib.NM | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Top-KAST: always-sparse training around any optax optimizer.

    Args:
      inner: the optimizer that turns (masked, penalised) gradients into updates.
      forward_sparsity: fraction of zeros in the forward pass; ``D = 1 − forward_sparsity``.
        Required unless ``structure`` is given (then ``None`` or ``1 − n/m``).
      backward_sparsity: fraction of weights that receive no update; ``D + M = 1 −
        backward_sparsity``. Must be ``<= forward_sparsity``; ``None`` (default) is 0 — every
        weight is updated — or, with ``structure``, ``1 − n_B/m``.
      exploration_l2: ``λ`` of the exploration penalty ``λ(½‖θ_A‖² + ½‖θ_{B∖A}‖²/D)``.
      refresh_every: recompute ``A`` and ``B`` every this many updates (paper App. C: 1 or 100).
      sparsify: which leaves are sparse — a bool pytree like params or a callable
        ``params -> bool pytree`` (``optax.masked``'s convention); default
        :func:`topkast_jax.sparsify.default`: leaves named ``kernel`` or ``embedding`` (Flax
        naming), never a ``bias`` or ``scale``; in a tree without those names, floating leaves
        with ``ndim >= 2``.
      distribution: ``"uniform"`` or ``"erk"`` densities over sparse leaves.
      global_topk: one magnitude threshold over all sparse leaves instead of per leaf.
      backward_selection: ``"magnitude"`` (paper) or ``"random"`` ``B∖A`` (Table 1 ablation).
      stop_exploration_step: from this step on ``B = A`` (Table 1 ablation); ``None`` never.
      selection_method: exact top-k method, see :mod:`topkast_jax.selection`.
      seed: PRNG seed for ``backward_selection="random"``.
      track_reservoir: keep, at two bits per weight, which weights have ever been in ``A`` and
        the initial reservoir, so :func:`~topkast_jax.mask_stats` reports
        ``reservoir_activated`` (paper Fig. 3).  Off by default: the state then holds two bits
        per sparse weight in all.
      layer_axis: the stacked-layer axis of scan-stacked leaves (``nn.scan`` / ``nnx.scan``):
        each slice along it is selected, counted and penalised as a leaf of its own (``k`` per
        slice, ERK over slices; ``global_topk`` stays one threshold over all slices).  An int
        for every sparse leaf, a Flax axis name, ``None`` (whole leaves), or a pytree / callable
        of those per leaf; default ``"auto"``: the axis named ``"layers"`` in the leaf's Flax
        partitioning metadata (Linen ``nn.Partitioned`` names, NNX ``out_sharding``), where it
        has one.  See :mod:`topkast_jax.layers`.
      structure: ``tk.NM(n, m, axis=None, n_backward=None)`` — N:M structured sets, an
        extension of the paper's method (:mod:`topkast_jax.nm`): ``A`` keeps the top-``n`` and
        ``B`` the top-``n_B`` of every group of ``m`` consecutive weights along ``axis``; the
        penalty uses ``D = n/m``.  Not with ``global_topk``, ``distribution="erk"``,
        ``backward_selection="random"`` or another ``selection_method`` than ``"auto"``; every
        sparse leaf's length along ``axis`` must be a multiple of ``m``.  ``None`` (default):
        unstructured, as in the paper.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params,
      refresh_masks=None)`` requires ``params``.  ``refresh_masks`` (a Python bool, optional)
      says statically whether this update refreshes ``A`` and ``B``: ``False`` from a loop that
      runs the refresh as a program of its own (:func:`refresh_sets`), so its step holds no
      selection.  ``None`` (default) decides from the state's count.
      Inside ``optax.MultiSteps``, which computes its inner update at every micro-step and keeps
      only the last one's, pass ``refresh_masks=False`` on the other micro-steps (also at
      ``refresh_every=1``) so they run no selection.

    Example:
      >>> import jax, jax.numpy as jnp, optax, topkast_jax as tk
      >>> params = {"w": jnp.arange(1.0, 11.0).reshape(2, 5), "b": jnp.zeros(5)}
      >>> tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
      >>> state = tx.init(params)
      >>> tk.forward_params(params, state)["w"]
      Array([[ 0.,  0.,  0.,  0.,  0.],
             [ 0.,  0.,  0.,  9., 10.]], dtype=float32)

    References:
      Jayakumar et al., 2020. https://arxiv.org/abs/2106.03517
    """
    check_inner(inner)
    check_static(  # optax.inject_hyperparams passes numeric arguments as arrays
        "tk.topkast",
        forward_sparsity=forward_sparsity,
        backward_sparsity=backward_sparsity,
        refresh_every=refresh_every,
        stop_exploration_step=stop_exploration_step,
        layer_axis=layer_axis,
    )
    if structure is not None:
        forward_sparsity, backward_sparsity = nm_lib.check_options(
            structure,
            forward_sparsity,
            backward_sparsity,
            global_topk=global_topk,
            distribution=distribution,
            backward_selection=backward_selection,
            selection_method=selection_method,
        )
    elif forward_sparsity is None:
        raise ValueError("forward_sparsity is required (or pass structure=tk.NM(n, m)).")
    backward_sparsity = 0.0 if backward_sparsity is None else backward_sparsity
    forward_sparsity, backward_sparsity = check_sparsities(forward_sparsity, backward_sparsity)
    _check_hyperparameters(
        refresh_every, exploration_l2, backward_selection, stop_exploration_step, selection_method
    )
    check_distribution(distribution)
    if global_topk and distribution != "uniform":
        raise ValueError(
            "global_topk=True sets one threshold for all leaves: use "
            f"distribution='uniform', got {distribution!r}."
        )
    sparsify = sparsify if sparsify is not None else sparsify_lib.default()

    def plan_for(params: Any) -> list[LeafDensity]:
        return layer_densities(
            params,
            sparsify=sparsify,
            forward_sparsity=forward_sparsity,
            backward_sparsity=backward_sparsity,
            distribution=distribution,
            layer_axis=layer_axis,
        )

    def compute_sets(
        params: Any, plan: list[LeafDensity], rng: jax.Array, history: Any = None
    ) -> tuple[Any, Any]:
        if structure is not None:
            nm_sets = nm_lib.select_sets(params, plan, nm_lib.resolve(structure, params, plan))
            return nm_sets, None
        return select_sets(
            params,
            plan,
            global_topk=global_topk,
            backward_selection=backward_selection,
            rng=rng,
            method=selection_method,
            history=history,
        )

    def refreshed(state: TopKastState, params: Any, plan: list[LeafDensity]) -> tuple:
        """``(sets, key_history, stats, rng)`` of ``state`` after ``A`` and ``B`` are selected
        from ``params`` (step (e), before the stop-exploration ablation)."""
        rng, mask_rng = state.rng, None
        if backward_selection == "random":  # only the random B∖A draws: no PRNG work otherwise
            rng, mask_rng = jax.random.split(state.rng)
        sets, history = compute_sets(params, plan, mask_rng, state.key_history)
        # The new packed sets go into the donated buffers of the old ones, and the statistic
        # reads both: the output is made to depend on the statistic, so XLA packs into a
        # temporary and writes the output after the statistic has read the old sets (a copy of
        # 2 bits per weight at the end).  Otherwise it copies the old sets at the start of the
        # step and holds them through the backward pass (the Transformer-XL's refresh peak:
        # 1.101× instead of 1.095× the dense step).
        changed = stats_lib.sets_changed(state.sets, sets)
        sets = _after(sets, changed)
        return sets, history, stats_lib.refreshed_stats(state.stats, changed, sets), rng

    def stopped(count: jax.Array, sets: Any) -> Any:
        if stop_exploration_step is None:
            return sets
        return _stop_exploration_sets(count, sets, stop_exploration_step)

    def init_fn(params: Any) -> TopKastState:
        plan = plan_for(params)
        rng, mask_rng = jax.random.split(jax.random.PRNGKey(seed))
        sets, history = compute_sets(params, plan, mask_rng)
        sets = stopped(jnp.zeros((), jnp.int32), sets)
        masks = sets_masks(sets)
        densities = boxes.strip(  # no Flax box: a box shards its value like the leaf
            unflatten_sparse(params, plan, [slice_densities(leaf) for leaf in plan if leaf.sparse])
        )
        return TopKastState(
            count=jnp.zeros((), jnp.int32),
            sets=sets,
            key_history=history,
            densities=densities,
            exploration_l2=jnp.asarray(exploration_l2, jnp.float32),
            stats=stats_lib.init_set_stats(masks, track_reservoir),
            rng=rng,
            inner_state=inner.init(params),
        )

    def update_fn(grads, state: TopKastState, params=None, refresh_masks=None, **extra_args):
        if params is None:
            raise ValueError("topkast's update needs params: call tx.update(grads, state, params).")
        check_update_inputs(grads, state, params, TopKastState)
        if refresh_masks is not None and not isinstance(refresh_masks, bool):
            raise ValueError(
                "refresh_masks must be a Python bool (static) or None, got "
                f"{type(refresh_masks).__name__}; for a traced decision leave it None."
            )
        plan = plan_for(params)
        check_layer_axes(plan, state.densities)
        l2 = jnp.asarray(exploration_l2, jnp.float32)
        masks = state.masks  # already B = A past stop_exploration_step (see init and below)
        grads = zero_outside(grads, masks.backward)  # (a)
        if not _is_zero(exploration_l2):
            grads = add_penalty_gradient(grads, params, masks, state.densities, l2)  # (b)
        updates, inner_state = sparse_inner_update(  # (c), (d)
            inner, grads, state.inner_state, params, masks.backward, **extra_args
        )
        count = state.count + 1

        # (e) selects from θ + u written exactly as optax.apply_updates writes it, outside any
        # branch: XLA merges it with the caller's apply_updates (CSE), so the selection reads the
        # step's output params instead of a second leaf-sized buffer.
        new_params = optax.apply_updates(params, updates)

        def refresh():
            return refreshed(state, new_params, plan)

        def keep():
            return state.sets, state.key_history, state.stats, state.rng

        if refresh_masks is True or (refresh_masks is None and refresh_every == 1):
            new_sets, history, new_stats, rng = refresh()
        elif refresh_masks is False:  # also at refresh_every 1: e.g. a discarded micro-step
            new_sets, history, new_stats, rng = keep()
        else:
            new_sets, history, new_stats, rng = jax.lax.cond(
                count % refresh_every == 0, refresh, keep
            )
        new_sets = stopped(count, new_sets)
        new_state = TopKastState(
            count=count,
            sets=new_sets,
            key_history=history,
            densities=state.densities,
            exploration_l2=l2,
            stats=new_stats,
            rng=rng,
            inner_state=inner_state,
        )
        return updates, new_state

    def refresh_fn(state: TopKastState, params: Any) -> TopKastState:
        check_update_inputs(params, state, params, TopKastState)  # params stand in for grads
        plan = plan_for(params)
        check_layer_axes(plan, state.densities)
        sets, history, stats, rng = refreshed(state, params, plan)
        return state._replace(
            sets=stopped(state.count, sets), key_history=history, stats=stats, rng=rng
        )

    update_fn.refresh = refresh_fn  # reached through refresh_sets(tx)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def refresh_sets(tx: Any) -> Callable[[TopKastState, Any], TopKastState]:
    r"""Step (e) of ``tx = tk.topkast(...)`` as a function of its own: ``refresh(state, params)
    -> state`` with ``A`` and ``B`` selected from ``params``.

    For a loop with ``refresh_every = N > 1`` that compiles its steps apart: every step runs
    ``tx.update(..., refresh_masks=False)``, and after the steps where ``(step + 1) % N == 0``
    the loop calls ``refresh(opt_state, new_params)``, jitted once.  The result equals, bit
    for bit, the state of ``tx.update(..., refresh_masks=True)`` on that step — the selection
    from ``θ + u``, the statistics, the warm-start history, the random-``B∖A`` key and the
    stop-exploration ablation — so the loop compiles one training step and a refresh program
    (the selection alone) instead of two training steps.  At ``refresh_every = 1`` keep the
    in-step refresh: splitting saves no compile time there and runs two programs per step.

    Args:
      tx: the transformation :func:`topkast` returned, or :func:`~topkast_jax.check_exploration`
        or ``tk.nnx.for_optimizer`` around it (they keep its state and its refresh).  Not a
        ``tk.topkast`` inside ``optax.chain`` or another wrapper: chain its ``inner`` instead.

    Returns:
      ``refresh(state, params)``: ``state`` the :class:`TopKastState` ``tx.update`` returned
      (its ``count`` already counts the step), ``params`` the params after that update.  It
      checks both as ``update`` does (clear errors naming the leaf).

    Raises:
      ValueError: ``tx`` is not a transformation returned by :func:`topkast`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, topkast_jax as tk
      >>> params = {"w": jnp.arange(1.0, 11.0).reshape(2, 5)}
      >>> tx = tk.topkast(optax.sgd(1.0), forward_sparsity=0.8, refresh_every=100)
      >>> state = tx.init(params)
      >>> refresh = jax.jit(tk.refresh_sets(tx))
      >>> state = refresh(state, {"w": params["w"][::-1]})  # e.g. the params after an update
      >>> tk.get_masks(state).forward["w"]
      Array([[False, False, False,  True,  True],
             [False, False, False, False, False]], dtype=bool)
    """
    refresh = getattr(getattr(tx, "update", None), "refresh", None)
    if refresh is None:
        raise ValueError(
            "refresh_sets needs the transformation tk.topkast returned, got "
            f"{type(tx).__name__}{' (its update has no refresh)' if hasattr(tx, 'update') else ''}"
            ": pass tk.topkast(...) itself, not a chain or wrapper around it."
        )
    return refresh
