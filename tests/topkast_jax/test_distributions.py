"""Per-leaf densities (uniform, ERK) and global top-k against the reference (issue 2, Options)."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import tk_harness
from hypothesis import given, settings
from hypothesis import strategies as st

import topkast_jax as tk

LR = 0.05

CNN_SHAPES = {
    "conv0": (3, 3, 3, 8),
    "conv1": (3, 3, 8, 16),
    "dense": (16, 10),
    "bias": (10,),
}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    shapes=st.lists(hnp.array_shapes(min_dims=1, max_dims=4, max_side=12), min_size=1, max_size=6),
    density=st.floats(0.01, 0.99),
)
def test_property_erk_matches_reference_and_conserves_budget(shapes, density):
    got = tk.erk_densities(shapes, density)
    want = reference.erk_densities(shapes, density)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    sizes = np.array([np.prod(s) for s in shapes], np.float64)
    assert all(0.0 < d <= 1.0 + 1e-12 for d in got)
    np.testing.assert_allclose(np.dot(got, sizes), density * sizes.sum(), rtol=1e-9)
    # Uncapped leaves are proportional to (Σ dims)/(Π dims).
    raw = np.array([sum(s) / np.prod(s) for s in shapes])
    free = np.array(got) < 1.0
    if free.sum() >= 2:
        ratio = np.array(got)[free] / raw[free]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 10**7),
    forward_sparsity=st.floats(0.0, 0.999),
    extra=st.floats(0.0, 1.0),
)
def test_property_mask_counts_follow_the_formula(n, forward_sparsity, extra):
    backward_sparsity = forward_sparsity * extra
    d, db = 1.0 - forward_sparsity, 1.0 - backward_sparsity
    k_a, k_b = tk.mask_counts(d, db, n)
    assert (k_a, k_b) == reference.mask_counts(n, d, db)
    assert 1 <= k_a <= k_b <= n


@pytest.mark.filterwarnings("ignore:`sparsify` selects no leaf")
@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    shapes=st.lists(hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), min_size=1, max_size=4),
    forward_sparsity=st.sampled_from([0.0, 0.5, 0.8, 0.95, 0.999]),
    extra=st.floats(0.0, 1.0),
)
def test_property_plan_counts_for_random_shapes(shapes, forward_sparsity, extra):
    backward_sparsity = forward_sparsity * extra
    params = {f"p{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}
    plan = tk.layer_densities(
        params,
        sparsify=tk.sparsify.kernels(),
        forward_sparsity=forward_sparsity,
        backward_sparsity=backward_sparsity,
    )
    for leaf in plan:
        if len(leaf.shape) < 2:
            assert not leaf.sparse and leaf.k_forward == leaf.k_backward == leaf.size
            continue
        want = reference.mask_counts(leaf.size, 1 - forward_sparsity, 1 - backward_sparsity)
        assert leaf.sparse and (leaf.k_forward, leaf.k_backward) == want


def test_erk_caps_small_leaves_and_renormalises():
    shapes = [(4, 2), (100, 100)]  # raw: 0.75 vs 0.02
    got = tk.erk_densities(shapes, 0.5)
    assert got[0] == 1.0
    np.testing.assert_allclose(got[1], (0.5 * 10008 - 8) / 10000)


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_layer_densities_match_reference(distribution):
    params = tk_harness.make_params(seed=0, shapes=CNN_SHAPES)
    fs, bs = 0.8, 0.5
    plan = tk.layer_densities(
        params,
        sparsify=tk.sparsify.kernels(),
        forward_sparsity=fs,
        backward_sparsity=bs,
        distribution=distribution,
    )
    names = sorted(CNN_SHAPES)  # "bias" sorts first
    assert [leaf.path for leaf in plan] == names
    sparse_shapes = [CNN_SHAPES[n] for n in names if n != "bias"]
    if distribution == "uniform":
        d_fwd, d_bwd = [1 - fs] * 3, [1 - bs] * 3
    else:
        d_fwd = reference.erk_densities(sparse_shapes, 1 - fs)
        d_bwd = reference.erk_densities(sparse_shapes, 1 - bs)
    assert not plan[0].sparse and plan[0].forward == 1.0 and plan[0].backward == 1.0
    for leaf, shape, df, db in zip(plan[1:], sparse_shapes, d_fwd, d_bwd, strict=True):
        assert leaf.sparse and leaf.shape == shape and leaf.size == np.prod(shape)
        np.testing.assert_allclose([leaf.forward, leaf.backward], [df, max(df, db)], rtol=1e-9)
        assert (leaf.k_forward, leaf.k_backward) == reference.mask_counts(
            leaf.size, df, max(df, db)
        )
    if distribution == "erk":
        assert len({round(leaf.forward, 6) for leaf in plan[1:]}) == 3  # really non-uniform


def test_layer_densities_work_on_abstract_params():
    params = tk_harness.make_params(seed=0, shapes=CNN_SHAPES)
    abstract = jax.eval_shape(lambda: params)
    kwargs = dict(sparsify=tk.sparsify.kernels(), forward_sparsity=0.9, distribution="erk")
    assert tk.layer_densities(abstract, **kwargs) == tk.layer_densities(params, **kwargs)


def _cfgs_from_plan(plan):
    return [reference.LeafConfig(leaf.sparse, leaf.forward, leaf.backward) for leaf in plan]


def test_erk_masks_and_trajectory_match_reference():
    params = tk_harness.make_params(seed=21, shapes=CNN_SHAPES)
    problem = tk_harness.make_problem(params, seed=22)
    tx_kwargs = dict(
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        exploration_l2=0.05,
        distribution="erk",
    )
    plan = tk.layer_densities(params, sparsify=tk.sparsify.kernels(), **_plan_kwargs(tx_kwargs))
    cfgs = _cfgs_from_plan(plan)
    got = tk_harness.train(
        tk.topkast(optax.sgd(LR, momentum=0.9), **tx_kwargs), params, problem.loss, 4
    )
    want = reference.run(
        [np.asarray(p) for p in jax.tree.leaves(params)],
        cfgs,
        problem.grad_np,
        4,
        learning_rate=LR,
        momentum=0.9,
        exploration_l2=0.05,
    )
    tk_harness.assert_matches_reference(got, want, cfgs, tx_kwargs)
    # Non-uniform per leaf, but the same total budget as uniform.
    stats = tk.mask_stats(got[-1].state)
    assert abs(float(stats["forward_density"]) - 0.2) < 0.01
    assert abs(float(stats["backward_density"]) - 0.5) < 0.01
    per_leaf = [float(stats[f"forward_density/{n}"]) for n in ("conv0", "conv1", "dense")]
    assert max(per_leaf) > 1.5 * min(per_leaf)


def _plan_kwargs(tx_kwargs):
    return {
        k: tx_kwargs[k]
        for k in ("forward_sparsity", "backward_sparsity", "distribution")
        if k in tx_kwargs
    }


def test_global_topk_masks_and_trajectory_match_reference():
    params = tk_harness.make_params(seed=31, shapes=CNN_SHAPES)
    # Different scales per leaf so that one global threshold gives unequal per-leaf densities.
    params = {k: v * (3.0 if k == "dense" else 1.0) for k, v in params.items()}
    problem = tk_harness.make_problem(params, seed=32)
    tx_kwargs = dict(
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        exploration_l2=0.05,
        global_topk=True,
        refresh_every=2,
    )
    cfgs = tk_harness.leaf_configs(params, tx_kwargs)
    tx = tk.topkast(optax.sgd(LR, momentum=0.9), **tx_kwargs)
    got = tk_harness.train(tx, params, problem.loss, 4)
    want = reference.run(
        [np.asarray(p) for p in jax.tree.leaves(params)],
        cfgs,
        problem.grad_np,
        4,
        learning_rate=LR,
        momentum=0.9,
        exploration_l2=0.05,
        refresh_every=2,
        global_topk=True,
    )
    tk_harness.assert_matches_reference(got, want, cfgs, tx_kwargs)
    sparse_sizes = [np.prod(CNN_SHAPES[n]) for n in ("conv0", "conv1", "dense")]
    k_a, k_b = reference.mask_counts(int(sum(sparse_sizes)), 0.2, 0.5)
    forward = [a for a in got[0].forward if a is not None]
    backward = [b for b in got[0].backward if b is not None]
    assert sum(int(a.sum()) for a in forward) == k_a
    assert sum(int(b.sum()) for b in backward) == k_b
    per_leaf = [a.mean() for a in forward]
    assert max(per_leaf) > 2 * min(per_leaf), "global top-k should not be uniform here"


def test_global_topk_ties_follow_leaf_order():
    params = {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 2))}
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.5, backward_sparsity=0.25, global_topk=True)
    state = tk_harness.init(tx, params)
    masks = tk.get_masks(state)
    (a_a, b_a), (a_b, b_b) = reference.global_masks([np.ones((2, 3)), np.ones((3, 2))], 0.5, 0.75)
    np.testing.assert_array_equal(masks.forward["a"], a_a)
    np.testing.assert_array_equal(masks.forward["b"], a_b)
    np.testing.assert_array_equal(masks.backward["a"], b_a)
    np.testing.assert_array_equal(masks.backward["b"], b_b)
    assert bool(masks.forward["a"].all()) and not bool(masks.forward["b"].any())
