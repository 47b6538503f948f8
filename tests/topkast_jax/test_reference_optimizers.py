"""Top-KAST with Nesterov momentum and Adam inside, against the numpy reference (issue 13), and
the reference's NaN rule against the library's.

The reference (``tests/reference.py``) writes optax's SGD (heavy-ball and Nesterov momentum) and
Adam out in float64 numpy, with the inner state zero outside ``B``; the library runs the same
least-squares problems as ``test_transform.py``'s trajectories (``tk_harness``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import tk_harness

import topkast_jax as tk

STEPS = 10
CASES = {  # name: (optax inner, reference inner kwargs, refresh_every, fs, bs)
    "nesterov_refresh1": (
        optax.sgd(tk_harness.LR, momentum=0.9, nesterov=True),
        dict(momentum=0.9, nesterov=True),
        1,
        0.8,
        0.5,
    ),
    "adam_refresh1": (optax.adam(0.02), dict(adam=reference.Adam()), 1, 0.8, 0.5),
    "adam_refresh3": (
        optax.adam(0.02, b1=0.8, b2=0.99, eps=1e-6),
        dict(adam=reference.Adam(b1=0.8, b2=0.99, eps=1e-6)),
        3,
        0.7,
        0.4,
    ),
}


@functools.cache
def trajectory(name):
    inner, ref_inner, refresh_every, fs, bs = CASES[name]
    params = tk_harness.make_params(seed=2)
    problem = tk_harness.make_problem(params, seed=3)
    tx_kwargs = dict(
        forward_sparsity=fs,
        backward_sparsity=bs,
        exploration_l2=tk_harness.LAM,
        refresh_every=refresh_every,
    )
    got = tk_harness.train(tk.topkast(inner, **tx_kwargs), params, problem.loss, STEPS)
    cfgs = tk_harness.leaf_configs(params, tx_kwargs)
    learning_rate = 0.02 if "adam" in ref_inner else tk_harness.LR
    want = reference.run(
        [np.asarray(p) for p in jax.tree.leaves(params)],
        cfgs,
        problem.grad_np,
        STEPS,
        learning_rate=learning_rate,
        exploration_l2=tk_harness.LAM,
        refresh_every=refresh_every,
        **ref_inner,
    )
    return got, want, cfgs, tx_kwargs


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_with_inner_optimizer_matches_reference(name):
    got, want, cfgs, tx_kwargs = trajectory(name)
    tk_harness.assert_matches_reference(got, want, cfgs, tx_kwargs)
    final = want[-1][1]
    if "adam" in name:  # the moments, zero outside B, equal the reference's
        mu = jax.tree.leaves(optax.tree_utils.tree_get(got[-1].state, "mu"))
        nu = jax.tree.leaves(optax.tree_utils.tree_get(got[-1].state, "nu"))
        for i in range(len(cfgs)):
            np.testing.assert_allclose(mu[i], final.trace[i], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(nu[i], final.nu[i], rtol=1e-4, atol=1e-8)
    else:
        trace = jax.tree.leaves(optax.tree_utils.tree_get(got[-1].state, "trace"))
        for i in range(len(cfgs)):
            np.testing.assert_allclose(trace[i], final.trace[i], rtol=1e-4, atol=1e-5)
    changed = any(
        not np.array_equal(a.forward[1], b.forward[1]) for a, b in zip(got, got[1:], strict=False)
    )
    assert changed, "A never changed: the trajectory does not exercise refreshes"


def test_reference_inner_updates_are_optax():
    """The reference's update rules equal optax's on one leaf for four steps (no masks)."""
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=6) for _ in range(4)]
    for inner, kwargs in [
        (optax.sgd(0.1), dict(learning_rate=0.1)),
        (optax.sgd(0.1, momentum=0.9), dict(learning_rate=0.1, momentum=0.9)),
        (
            optax.sgd(0.1, momentum=0.9, nesterov=True),
            dict(learning_rate=0.1, momentum=0.9, nesterov=True),
        ),
        (optax.adam(0.1, b1=0.8, b2=0.9), dict(learning_rate=0.1, adam=reference.Adam(0.8, 0.9))),
    ]:
        state = inner.init(jnp.zeros(6))
        trace, nu = np.zeros(6), np.zeros(6)
        for count, g in enumerate(grads, start=1):
            want, trace, nu = reference.inner_update(g, trace, nu, count, **kwargs)
            got, state = inner.update(jnp.asarray(g, jnp.float32), state)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=str(kwargs))


def test_nan_ranks_as_magnitude_zero_in_library_and_reference():
    """NaN weights rank as magnitude 0 (tied with the zeros, by index): numpy's own order would
    put them after every zero instead."""
    w = np.array([[np.nan, 0.0, 3.0, -0.0], [0.5, np.nan, -2.0, 0.0]], np.float32)
    k = 5  # 3, -2, 0.5, then the first two of the magnitude-0 entries: NaN at 0 and 0 at 1
    want = np.zeros(8, bool)
    want[[2, 6, 4, 0, 1]] = True
    np.testing.assert_array_equal(reference.top_k_mask(w, k).ravel(), want)
    numpy_order = np.argsort(-np.abs(w.ravel().astype(np.float64)), kind="stable")[:k]
    assert 0 not in numpy_order  # numpy would skip the NaN: the rule is not numpy's
    for method in tk.selection.METHODS:
        got = tk.selection.top_k_magnitude_mask(jnp.asarray(w), k, method=method)
        np.testing.assert_array_equal(np.asarray(got).ravel(), want, err_msg=method)
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=1 - k / 8, backward_sparsity=0.25)
    masks = tk.get_masks(tk_harness.init(tx, {"w": jnp.asarray(w)}))
    a, b = reference.magnitude_masks(w, k / 8, 0.75)
    np.testing.assert_array_equal(masks.forward["w"], a)
    np.testing.assert_array_equal(masks.backward["w"], b)
