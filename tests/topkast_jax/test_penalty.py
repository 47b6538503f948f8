"""The exploration penalty: its value, and its gradient is what update adds (semantics 3b, 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import tk_harness

import topkast_jax as tk

LAM = 0.3


@pytest.mark.parametrize("fs,bs", [(0.8, 0.5), (0.6, 0.0), (0.5, 0.5), (0.0, 0.0)])
def test_penalty_value_matches_reference(fs, bs):
    params = tk_harness.make_params(seed=11)
    state = tk_harness.init(
        tk.topkast(optax.sgd(0.1), forward_sparsity=fs, backward_sparsity=bs, exploration_l2=LAM),
        params,
    )
    masks = tk.get_masks(state)
    want = 0.0
    for p, a, b in zip(
        jax.tree.leaves(params),
        tk_harness.np_leaves(masks.forward),
        tk_harness.np_leaves(masks.backward),
        strict=True,
    ):
        if a is not None:
            want += reference.penalty(np.asarray(p), a, b, LAM, 1 - fs)
    got = tk.exploration_penalty(params, state)
    assert got.shape == ()
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    if bs < fs:  # B∖A is weighted 1/D: the penalty is not the plain L2 of B.
        plain = sum(
            0.5 * LAM * float(np.sum(np.asarray(p)[b] ** 2))
            for p, b in zip(
                jax.tree.leaves(params), tk_harness.np_leaves(masks.backward), strict=True
            )
            if b is not None
        )
        assert float(got) > plain * 1.01


def test_penalty_gradient_equals_what_update_adds():
    params = tk_harness.make_params(seed=12)
    fs, bs = 0.7, 0.3
    # Inner sgd(1): updates = -(masked grad + penalty grad).  With zero loss gradients the update is
    # exactly minus the penalty gradient on sparse leaves (and zero on the dense leaf).
    tx = tk.topkast(optax.sgd(1.0), forward_sparsity=fs, backward_sparsity=bs, exploration_l2=LAM)
    state = tk_harness.init(tx, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, state, params)
    autodiff = jax.grad(lambda p: tk.exploration_penalty(p, state))(params)
    masks = tk.get_masks(state)
    for name in ("w1", "w2"):
        want = reference.penalty_grad(
            np.asarray(params[name]),
            np.asarray(masks.forward[name]),
            np.asarray(masks.backward[name]),
            LAM,
            1 - fs,
        )
        np.testing.assert_allclose(-np.asarray(updates[name]), want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(autodiff[name]), want, rtol=1e-6, atol=1e-7)
        # 1/D weighting on B∖A, nothing outside B.
        b_only = np.asarray(masks.backward[name] & ~masks.forward[name])
        assert b_only.any()
        np.testing.assert_allclose(
            want[b_only], LAM / (1 - fs) * np.asarray(params[name])[b_only], rtol=1e-6
        )
    np.testing.assert_array_equal(updates["b"], np.zeros(5))
    np.testing.assert_array_equal(autodiff["b"], np.zeros(5))


def test_penalty_gradient_is_added_to_masked_loss_gradient():
    params = tk_harness.make_params(seed=13)
    fs, bs = 0.8, 0.5
    tx = tk.topkast(optax.sgd(1.0), forward_sparsity=fs, backward_sparsity=bs, exploration_l2=LAM)
    state = tk_harness.init(tx, params)
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 1.0, params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    masks = tk.get_masks(state)
    for name in ("w1", "w2"):
        a, b = np.asarray(masks.forward[name]), np.asarray(masks.backward[name])
        g = np.where(b, np.asarray(grads[name]), 0.0)
        g += reference.penalty_grad(np.asarray(params[name]), a, b, LAM, 1 - fs)
        np.testing.assert_allclose(-np.asarray(updates[name]), g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(-np.asarray(updates["b"]), np.asarray(grads["b"]), rtol=1e-6)


def test_zero_lambda_gives_zero_penalty():
    params = tk_harness.make_params(seed=14)
    state = tk_harness.init(tk.topkast(optax.sgd(0.1), forward_sparsity=0.5), params)
    assert float(tk.exploration_penalty(params, state)) == 0.0
