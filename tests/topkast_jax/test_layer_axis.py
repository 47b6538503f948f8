"""Scan-stacked leaves (issue 14): with a layer axis, every slice is a leaf of its own — selection,
counts, ERK densities, the penalty's ``D``, statistics — checked against the numpy reference
applied slice by slice; a global top-k stays one selection over all slices of all leaves."""

from __future__ import annotations

import warnings

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import tk_harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import topkast_jax as tk
from topkast_jax import baselines, codes, streaming

FS, BS = 0.75, 0.5  # D = 0.25, D + M = 0.5


def _stacked_params(seed: int = 0) -> dict[str, jax.Array]:
    """A stack of 4 layers with layer 0 three times larger (one top-k over the stack would put
    most of A there), a plain kernel and a bias."""
    rng = np.random.default_rng(seed)
    stack = rng.normal(size=(4, 6, 5))
    stack[0] *= 3.0
    return {
        "b": jnp.zeros(5),
        "stack": jnp.asarray(stack, jnp.float32),
        "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
    }


AXES = {"b": None, "stack": 0, "w": None}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 weights per slice, so every pass runs its loop and its shorter last chunk."""
    monkeypatch.setattr(streaming, "CHUNK", 16)


def _array(shapes, rounded):
    """float32 arrays; ``rounded`` makes many ties (integers in [-3, 3])."""
    values = st.floats(-3, 3, width=32).map(lambda v: np.float32(round(v) if rounded else v))
    return hnp.arrays(np.float32, shapes, elements=values)


def _forward_backward(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(codes.forward_of(code)), np.asarray(codes.backward_of(code))


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    x=st.booleans().flatmap(
        lambda r: _array(hnp.array_shapes(min_dims=2, max_dims=3, min_side=2, max_side=7), r)
    ),
    data=st.data(),
)
def test_streaming_selects_each_slice_like_stable_argsort(small_chunks, x, data):
    axis = data.draw(st.integers(0, x.ndim - 1))
    n = x.size // x.shape[axis]
    k_a = data.draw(st.integers(1, n))
    k_b = data.draw(st.integers(k_a, n))
    whole = np.flip(x.take(0, axis=axis))  # a whole leaf of the slice shape: walked in one group

    @jax.jit
    def codes_of(x, whole):
        ths = streaming.leaf_thresholds([x, whole], [k_a, 1], [k_b, k_a], axes=[axis, None])
        return (
            streaming.codes_from_thresholds(x, ths[0], axis),
            streaming.codes_from_thresholds(whole, ths[1]),
        )

    stack_codes, whole_codes = codes_of(jnp.asarray(x), jnp.asarray(whole))
    fwd, bwd = _forward_backward(stack_codes)
    for s, a, b in zip(*(reference.split_slices(v, axis) for v in (x, fwd, bwd)), strict=True):
        np.testing.assert_array_equal(a, reference.top_k_mask(s, k_a))
        np.testing.assert_array_equal(b, reference.top_k_mask(s, k_b))
    fwd, bwd = _forward_backward(whole_codes)
    np.testing.assert_array_equal(fwd, reference.top_k_mask(whole, 1))
    np.testing.assert_array_equal(bwd, reference.top_k_mask(whole, k_a))


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    xs=st.lists(_array(hnp.array_shapes(min_dims=2, max_dims=2, max_side=6), True), max_size=3),
    stack=_array((3, 4, 5), True),
    data=st.data(),
)
def test_global_top_k_spans_slices_and_leaves(small_chunks, xs, stack, data):
    """One threshold over all slices; ties in leaf order, then slice order, then index."""
    leaves = [stack, *xs]
    axes = [data.draw(st.integers(0, 2)), *[None] * len(xs)]
    total = sum(x.size for x in leaves)
    k_a = data.draw(st.integers(1, total))
    k_b = data.draw(st.integers(k_a, total))

    @jax.jit
    def codes_of(xs):
        ths = streaming.global_thresholds(xs, k_a, k_b, axes)
        return [
            streaming.codes_from_thresholds(x, th, axis)
            for x, th, axis in zip(xs, ths, axes, strict=True)
        ]

    got = [_forward_backward(c) for c in codes_of([jnp.asarray(x) for x in leaves])]
    flat = np.concatenate(
        [s.ravel() for x, a in zip(leaves, axes, strict=True) for s in reference.split_slices(x, a)]
    )
    for j, k in enumerate((k_a, k_b)):
        got_flat = np.concatenate(
            [
                s.ravel()
                for g, a in zip(got, axes, strict=True)
                for s in reference.split_slices(g[j], a)
            ]
        )
        np.testing.assert_array_equal(got_flat, reference.top_k_mask(flat, k))


@pytest.mark.parametrize("method", ["histogram", "bisect", "sort"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_masks_are_per_slice_for_every_method(method, axis):
    params = _stacked_params()
    axes = dict(AXES, stack=axis)
    tx = tk.topkast(
        optax.sgd(0.1), forward_sparsity=FS, backward_sparsity=BS, selection_method=method,
        layer_axis=axes,
    )  # fmt: skip
    masks = tk.get_masks(tk_harness.init(tx, params))
    for name in ("stack", "w"):
        want_a, want_b = reference.slice_masks(params[name], axes[name], 1 - FS, 1 - BS)
        np.testing.assert_array_equal(masks.forward[name], want_a, err_msg=name)
        np.testing.assert_array_equal(masks.backward[name], want_b, err_msg=name)
    assert masks.forward["b"] is None


def test_random_backward_set_is_per_slice():
    params = _stacked_params()
    tx = tk.topkast(
        optax.sgd(0.1), forward_sparsity=FS, backward_sparsity=BS,
        backward_selection="random", layer_axis=AXES,
    )  # fmt: skip
    masks = tk.get_masks(tk_harness.init(tx, params))
    a, b = np.asarray(masks.forward["stack"]), np.asarray(masks.backward["stack"])
    want_a, want_b = reference.slice_masks(params["stack"], 0, 1 - FS, 1 - BS)
    np.testing.assert_array_equal(a, want_a)
    assert not np.any(a & ~b)
    np.testing.assert_array_equal(b.sum(axis=(1, 2)), want_b.sum(axis=(1, 2)))


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_plan_counts_and_erk_densities_are_per_slice(distribution):
    params = _stacked_params()
    plan = tk.layer_densities(
        params, sparsify=tk.sparsify.default(), forward_sparsity=FS, backward_sparsity=BS,
        distribution=distribution, layer_axis=AXES,
    )  # fmt: skip
    by_path = {leaf.path: leaf for leaf in plan}
    stack, w = by_path["stack"], by_path["w"]
    assert (stack.layer_axis, stack.layers, stack.slice_size) == (0, 4, 30)
    assert (w.layer_axis, w.layers) == (None, 1) and not by_path["b"].sparse
    shapes = [(6, 5)] * 4 + [(5, 3)]  # the slices are the leaves of the distribution
    if distribution == "erk":
        want_fwd = reference.erk_densities(shapes, 1 - FS)
        want_bwd = reference.erk_densities(shapes, 1 - BS)
    else:
        want_fwd, want_bwd = [1 - FS] * 5, [1 - BS] * 5
    for leaf, i in ((stack, 0), (w, 4)):
        assert leaf.forward == pytest.approx(want_fwd[i])
        k_a, k_b = reference.mask_counts(leaf.slice_size, want_fwd[i], want_bwd[i])
        assert (leaf.slice_k_forward, leaf.slice_k_backward) == (k_a, k_b)
        assert (leaf.k_forward, leaf.k_backward) == (k_a * leaf.layers, k_b * leaf.layers)


def test_training_equals_the_reference_run_on_slices():
    """Each slice of the stack is a leaf of the reference: masks, params, penalty (D per slice)
    over a momentum run with the exploration penalty."""
    params = _stacked_params()
    problem = tk_harness.make_problem(params, seed=1)
    tx_kwargs = dict(forward_sparsity=FS, backward_sparsity=BS, exploration_l2=0.05)
    tx = tk.topkast(optax.sgd(0.05, momentum=0.9), layer_axis=AXES, **tx_kwargs)
    got = tk_harness.train(tx, params, problem.loss, 4)

    names = sorted(params)  # the leaves of the library, in tree order
    axes = [AXES[n] for n in names]
    counts = [1 if a is None else params[n].shape[a] for n, a in zip(names, axes, strict=True)]

    def to_slices(leaves):
        return [s for x, a in zip(leaves, axes, strict=True) for s in reference.split_slices(x, a)]

    def to_leaves(slices):
        out, start = [], 0
        for n, a in zip(counts, axes, strict=True):
            out.append(reference.join_slices(slices[start : start + n], a))
            start += n
        return out

    def grad_fn(alpha_slices, t):
        return to_slices(problem.grad_np(to_leaves(alpha_slices), t))

    slices = to_slices([np.asarray(params[n]) for n in names])
    cfgs = [
        reference.LeafConfig(
            sparse=np.ndim(s) >= 2, forward_density=1 - FS, backward_density=1 - BS
        )
        for s in slices
    ]
    want = reference.run(slices, cfgs, grad_fn, 4, learning_rate=0.05, momentum=0.9,
                         exploration_l2=0.05)  # fmt: skip
    for t, (snap, (ref_params, ref_state)) in enumerate(zip(got, want, strict=True)):
        for i, (p, a, b) in enumerate(
            zip(to_leaves(ref_params), to_leaves(ref_state.a), to_leaves(ref_state.b), strict=True)
        ):
            np.testing.assert_allclose(snap.params[i], p, rtol=2e-5, atol=2e-5, err_msg=f"{t}")
            if a is None:  # "b" is dense
                assert snap.forward[i] is None and snap.backward[i] is None
            else:
                np.testing.assert_array_equal(snap.forward[i], a, f"A step {t} leaf {i}")
                np.testing.assert_array_equal(snap.backward[i], b, f"B step {t} leaf {i}")
        want_penalty = reference.total_penalty(ref_params, ref_state, cfgs, 0.05)
        np.testing.assert_allclose(snap.penalty, want_penalty, rtol=1e-5, atol=1e-7)


def _per_slice_stats(stats: dict, name: str, key: str) -> np.ndarray:
    found = sorted((int(k.rsplit("/", 1)[1]), float(v)) for k, v in stats.items()
                   if k.startswith(f"{key}/{name}/"))  # fmt: skip
    return np.array([v for _, v in found])


@pytest.mark.parametrize("axis", [0, 2])  # packed along the layer axis, and along another one
def test_mask_stats_report_each_slice(axis):
    params = _stacked_params()
    axes = dict(AXES, stack=axis)
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=FS, backward_sparsity=BS, layer_axis=axes)
    state = tk_harness.init(tx, params)
    assert (state.sets["stack"].axis == axis) == (axis == 0)
    stats = jax.jit(tk.mask_stats)(state)
    masks = tk.get_masks(state)
    others = tuple(d for d in range(3) if d != axis)
    for key, mask in (("forward_density", masks.forward), ("backward_density", masks.backward)):
        want = np.asarray(mask["stack"]).mean(axis=others)
        np.testing.assert_allclose(_per_slice_stats(stats, "stack", key), want, rtol=1e-6)
        assert not any(k.startswith(f"{key}/w/") for k in stats)  # a whole leaf: no slices
    want_shape = [params["stack"].shape[axis] if d == axis else 1 for d in range(3)]
    np.testing.assert_allclose(state.densities["stack"], np.full(want_shape, 1 - FS))


BASELINES = {
    "static": lambda **kw: baselines.static_sparse(optax.sgd(0.1), sparsity=FS, **kw),
    "pruning": lambda **kw: baselines.magnitude_pruning(
        optax.sgd(0.1), sparsity=FS, begin_step=0, end_step=0, **kw
    ),
    "set": lambda **kw: baselines.set_(
        optax.sgd(0.1), sparsity=FS, end_step=9, update_every=1, **kw
    ),  # fmt: skip
    "rigl": lambda **kw: baselines.rigl(
        optax.sgd(0.1), sparsity=FS, end_step=9, update_every=1, **kw
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_mask_each_slice(name):
    params = _stacked_params()
    tx = BASELINES[name](layer_axis=AXES)
    state = jax.jit(tx.init)(params)
    k = reference.mask_counts(30, 1 - FS, 1 - FS)[0]
    if name == "pruning":  # one-shot magnitude pruning at step 0: top-k of every slice
        want, _ = reference.slice_masks(params["stack"], 0, 1 - FS, 1 - FS)
        np.testing.assert_array_equal(tk.get_masks(state).forward["stack"], want)
    rng = np.random.default_rng(3)
    update = jax.jit(tx.update)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        mask = np.asarray(tk.get_masks(state).forward["stack"])
        np.testing.assert_array_equal(mask.sum(axis=(1, 2)), [k] * 4)
        assert not np.any(np.asarray(params["stack"])[~mask])  # outside M: exactly 0
    stats = tk.mask_stats(state)
    np.testing.assert_allclose(_per_slice_stats(stats, "stack", "forward_density"), k / 30)
    np.testing.assert_allclose(state.densities["stack"], np.full((4, 1, 1), k / 30))


def test_layer_axis_forms_agree():
    """An int, a pytree and a callable giving the same axes give the same masks."""
    params = _stacked_params()

    def masks(layer_axis):
        tx = tk.topkast(optax.sgd(0.1), forward_sparsity=FS, layer_axis=layer_axis)
        return np.asarray(tk.get_masks(tk_harness.init(tx, params)).forward["stack"])

    by_tree = masks(AXES)
    np.testing.assert_array_equal(masks(lambda p: AXES), by_tree)
    plan = tk.layer_densities(params, sparsify=tk.sparsify.default(), forward_sparsity=FS,
                              layer_axis=0)  # fmt: skip
    assert [leaf.layer_axis for leaf in plan] == [None, 0, 0]  # an int: every sparse leaf
    np.testing.assert_array_equal(by_tree.sum(axis=(1, 2)), [8] * 4)  # k = ⌊0.25·30 + ½⌋
    assert masks(None)[0].sum() > 8  # one top-k over the stack favours the large layer 0


def test_bad_layer_axis_names_the_problem():
    params = _stacked_params()
    kwargs = dict(sparsify=tk.sparsify.default(), forward_sparsity=FS)
    with pytest.raises(ValueError, match="layer_axis 3 is out of range for leaf 'stack'"):
        tk.layer_densities(params, layer_axis={"b": None, "stack": 3, "w": None}, **kwargs)
    with pytest.raises(ValueError, match="structure of params"):
        tk.layer_densities(params, layer_axis={"stack": 0}, **kwargs)
    with pytest.raises(ValueError, match="must be an int, a name or None"):
        tk.layer_densities(params, layer_axis={"b": None, "stack": 0.5, "w": None}, **kwargs)
    with pytest.warns(UserWarning, match="match no axis"):
        tk.layer_densities(params, layer_axis="stage", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default finds no metadata here, silently
        plan = tk.layer_densities(params, **kwargs)
    assert all(leaf.layer_axis is None for leaf in plan)


def test_always_sparse_refuses_stacked_layers():
    """The host-side mode selects whole leaves: it says so instead of selecting differently."""
    params = {"blocks": {"kernel": nn.Partitioned(jnp.ones((4, 6, 5)), ("layers", None, None))}}
    with pytest.raises(NotImplementedError, match="stacked-layer axis"):
        tk.AlwaysSparse(optax.sgd(0.1), forward_sparsity=FS).plan(params)
