"""Top-KAST trajectories against the numpy reference (issue 2, semantics 1-3 and 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import tk_harness

import topkast_jax as tk

LR, LAM = tk_harness.LR, tk_harness.LAM


@pytest.mark.parametrize("name", sorted(tk_harness.TRAJECTORIES))
def test_trajectory_matches_reference(name):
    case = tk_harness.TRAJECTORIES[name]
    got, want, cfgs, tx_kwargs = tk_harness.trajectory(name)
    tk_harness.assert_matches_reference(got, want, cfgs, tx_kwargs)
    if case["momentum"]:
        # Inner momentum equals the reference trace (itself zeroed outside B every step).
        trace = jax.tree.leaves(optax.tree_utils.tree_get(got[-1].state, "trace"))
        for i in range(len(cfgs)):
            np.testing.assert_allclose(trace[i], want[-1][1].trace[i], rtol=1e-4, atol=1e-5)
    if case["fs"] != case["bs"]:
        # The test only means something if the masks actually moved during the run.
        changed = any(
            not np.array_equal(a.forward[1], b.forward[1])
            for a, b in zip(got, got[1:], strict=False)
        )
        assert changed, "A never changed: the trajectory does not exercise refreshes"


def test_masks_at_init_have_exact_sizes_and_are_nested():
    params = tk_harness.make_params(seed=3)
    for fs, bs in [(0.8, 0.5), (0.99, 0.0), (0.0, 0.0)]:
        tx = tk.topkast(optax.sgd(0.1), forward_sparsity=fs, backward_sparsity=bs)
        state = tk_harness.init(tx, params)
        masks = tk.get_masks(state)
        for p, a, b in zip(
            jax.tree.leaves(params),
            tk_harness.np_leaves(masks.forward),
            tk_harness.np_leaves(masks.backward),
            strict=True,
        ):
            if np.ndim(p) < 2:
                assert a is None and b is None
                continue
            k_a, k_b = reference.mask_counts(p.size, 1 - fs, 1 - bs)
            assert a.shape == b.shape == p.shape
            assert a.sum() == k_a and b.sum() == k_b
            assert not np.any(a & ~b), "A must be a subset of B"
            np.testing.assert_array_equal(a, reference.top_k_mask(np.asarray(p), k_a))
            np.testing.assert_array_equal(b, reference.top_k_mask(np.asarray(p), k_b))


def test_counts_round_half_up_and_keep_at_least_one():
    # n = 10.  D = 0.25: floor(2.5 + 0.5) = 3 (half rounds up).  D = 0.01: floor(0.1 + 0.5) = 0,
    # kept at 1.  D = 0.05: floor(0.5 + 0.5) = 1; D + M = 0.35: floor(3.5 + 0.5) = 4.
    params = {"w": jnp.arange(1.0, 11.0).reshape(2, 5)}
    for fs, bs, k_a, k_b in [(0.75, 0.75, 3, 3), (0.99, 0.99, 1, 1), (0.95, 0.65, 1, 4)]:
        masks = tk.get_masks(
            tk_harness.init(
                tk.topkast(optax.sgd(1.0), forward_sparsity=fs, backward_sparsity=bs), params
            )
        )
        assert int(masks.forward["w"].sum()) == k_a
        assert int(masks.backward["w"].sum()) == k_b
        assert (k_a, k_b) == reference.mask_counts(10, 1 - fs, 1 - bs)


def test_ties_in_params_go_to_lower_index():
    # |θ| = 1 2 2 0 / 2 1 1 2: A (k=2) = the first two 2s; B (k=4) = all four 2s.
    params = {"w": jnp.array([[1.0, -2.0, 2.0, 0.0], [-2.0, 1.0, -1.0, 2.0]])}
    tx = tk.topkast(optax.sgd(1.0), forward_sparsity=0.75, backward_sparsity=0.5)
    state = tk_harness.init(tx, params)
    masks = tk.get_masks(state)
    np.testing.assert_array_equal(
        masks.forward["w"], [[False, True, True, False], [False, False, False, False]]
    )
    np.testing.assert_array_equal(
        masks.backward["w"], [[False, True, True, False], [True, False, False, True]]
    )


def test_forward_params_masks_sparse_leaves_only():
    params = tk_harness.make_params(seed=4)
    params["b"] = params["b"].astype(jnp.bfloat16)
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
    state = tk_harness.init(tx, params)
    alpha = jax.jit(tk.forward_params)(params, state)
    masks = tk.get_masks(state)
    assert jax.tree.structure(alpha) == jax.tree.structure(params)
    np.testing.assert_array_equal(alpha["b"], params["b"])  # dense leaf untouched
    assert alpha["b"].dtype == jnp.bfloat16
    for name in ("w1", "w2"):
        want = np.where(masks.forward[name], params[name], 0.0)
        np.testing.assert_array_equal(alpha[name], want)
        assert alpha[name].dtype == params[name].dtype


def test_zero_sparsity_is_dense_training_with_l2():
    """forward = backward = 0: A = B = everything, D = 1, so Top-KAST is sgd + λθ on kernels."""
    params = tk_harness.make_params(seed=6)
    problem = tk_harness.make_problem(params, seed=7)
    tx = tk.topkast(
        optax.sgd(LR, momentum=0.9), forward_sparsity=0.0, backward_sparsity=0.0, exploration_l2=LAM
    )
    got = tk_harness.train(tx, params, problem.loss, 5)
    decay_mask = {"b": False, "w1": True, "w2": True}
    dense_tx = optax.chain(
        optax.add_decayed_weights(LAM, mask=decay_mask), optax.sgd(LR, momentum=0.9)
    )
    p, s = params, dense_tx.init(params)
    for t in range(1, 6):
        g = jax.grad(problem.loss)(p)
        u, s = dense_tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        for got_leaf, want_leaf in zip(got[t].params, jax.tree.leaves(p), strict=True):
            np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)
        assert all(a.all() for a in got[t].forward if a is not None)
        assert all(b.all() for b in got[t].backward if b is not None)


def test_update_without_params_is_an_error():
    params = tk_harness.make_params()
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.5)
    state = tk_harness.init(tx, params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, state)


def test_update_is_jittable_equals_eager_and_leaves_dense_leaves_to_the_inner_optimizer():
    params = tk_harness.make_params(seed=8)
    inner = optax.adam(0.01)
    tx = tk.topkast(inner, forward_sparsity=0.7, backward_sparsity=0.3, exploration_l2=0.1)
    state = tk_harness.init(tx, params)
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    eager_updates, eager_state = tx.update(grads, state, params)
    jit_updates, jit_state = jax.jit(tx.update)(grads, state, params)
    inner_updates, _ = inner.update(grads, inner.init(params), params)
    np.testing.assert_array_equal(jit_updates["b"], inner_updates["b"])  # dense leaf untouched
    for x, y in zip(
        jax.tree.leaves((eager_updates, eager_state)),
        jax.tree.leaves((jit_updates, jit_state)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), 1e-6)
