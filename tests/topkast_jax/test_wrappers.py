"""The Top-KAST state found inside optax.chain, optax.MultiSteps and optax.inject_hyperparams."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import tk_harness

import topkast_jax as tk

FS, BS = 0.8, 0.5


def _grads(params, scale=1.0):
    return jax.tree.map(lambda p: scale * (jnp.cos(2.0 * p) + 0.5), params)


def _assert_trees_close(x, y, **kw):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **kw)


def _assert_masks_equal(x, y):
    for a, b in zip(
        tk_harness.np_leaves(x.forward) + tk_harness.np_leaves(x.backward),
        tk_harness.np_leaves(y.forward) + tk_harness.np_leaves(y.backward),
        strict=True,
    ):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


def _run(tx, params, grads_list):
    state = tk_harness.init(tx, params)
    update = jax.jit(tx.update)
    for g in grads_list:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_inside_chain_with_clipping():
    params = tk_harness.make_params(seed=81)
    grads = [_grads(params, 10.0), _grads(params, -3.0)]
    kwargs = dict(forward_sparsity=FS, backward_sparsity=BS, exploration_l2=0.01)
    chained = optax.chain(optax.clip_by_global_norm(1.0), tk.topkast(optax.sgd(0.1), **kwargs))
    p_chain, s_chain = _run(chained, params, grads)
    # The same as Top-KAST alone on clipped gradients.
    clip = optax.clip_by_global_norm(1.0)
    clipped = [clip.update(g, clip.init(params))[0] for g in grads]
    p_alone, s_alone = _run(tk.topkast(optax.sgd(0.1), **kwargs), params, clipped)
    _assert_trees_close(p_chain, p_alone, rtol=1e-6, atol=1e-7)
    _assert_masks_equal(tk.get_masks(s_chain), tk.get_masks(s_alone))
    _assert_trees_close(
        tk.forward_params(p_chain, s_chain), tk.forward_params(p_alone, s_alone), rtol=1e-6
    )
    np.testing.assert_allclose(
        tk.exploration_penalty(p_chain, s_chain), tk.exploration_penalty(p_alone, s_alone)
    )
    assert set(tk.mask_stats(s_chain)) == set(tk.mask_stats(s_alone))


def test_inside_multisteps_accumulates_then_applies_one_topkast_step():
    params = tk_harness.make_params(seed=82)
    g1, g2 = _grads(params, 1.0), _grads(params, -0.4)
    kwargs = dict(forward_sparsity=FS, backward_sparsity=BS, exploration_l2=0.01)
    multi = optax.MultiSteps(tk.topkast(optax.sgd(0.1, momentum=0.9), **kwargs), 2)
    state = tk_harness.init(multi, params)
    masks0 = tk.get_masks(state)
    update = jax.jit(multi.update)
    u1, state = update(g1, state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(u1))  # accumulating
    _assert_masks_equal(tk.get_masks(state), masks0)
    u2, state = update(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    p_alone, s_alone = _run(tk.topkast(optax.sgd(0.1, momentum=0.9), **kwargs), params, [mean])
    _assert_trees_close(optax.apply_updates(params, u2), p_alone, rtol=1e-6, atol=1e-7)
    _assert_masks_equal(tk.get_masks(state), tk.get_masks(s_alone))
    alpha = tk.forward_params(params, state)
    np.testing.assert_array_equal(
        alpha["w1"], np.where(tk.get_masks(state).forward["w1"], params["w1"], 0.0)
    )
    assert np.isfinite(float(tk.exploration_penalty(params, state)))


def test_inject_hyperparams_with_injectable_exploration_l2():
    params = tk_harness.make_params(seed=83)
    make = optax.inject_hyperparams(
        tk.topkast,
        static_args=("forward_sparsity", "backward_sparsity", "refresh_every", "seed"),
    )
    tx = make(
        optax.sgd(1.0),
        forward_sparsity=FS,
        backward_sparsity=BS,
        refresh_every=1,
        seed=0,
        exploration_l2=1e-4,
    )
    state = tk_harness.init(tx, params)
    assert "exploration_l2" in state.hyperparams
    masks = tk.get_masks(state)
    state.hyperparams["exploration_l2"] = jnp.asarray(0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, new_state = jax.jit(tx.update)(zeros, state, params)
    for name in ("w1", "w2"):
        want = reference.penalty_grad(
            np.asarray(params[name]),
            np.asarray(masks.forward[name]),
            np.asarray(masks.backward[name]),
            0.5,
            1 - FS,
        )
        np.testing.assert_allclose(-np.asarray(updates[name]), want, rtol=1e-6, atol=1e-7)
    # The functions find the state; the penalty uses the injected λ after the update.
    new_params = optax.apply_updates(params, updates)
    new_masks = tk.get_masks(new_state)
    want_pen = sum(
        reference.penalty(
            np.asarray(new_params[n]),
            np.asarray(new_masks.forward[n]),
            np.asarray(new_masks.backward[n]),
            0.5,
            1 - FS,
        )
        for n in ("w1", "w2")
    )
    np.testing.assert_allclose(tk.exploration_penalty(new_params, new_state), want_pen, rtol=1e-5)
    alpha = tk.forward_params(new_params, new_state)
    np.testing.assert_array_equal(
        alpha["w2"], np.where(new_masks.forward["w2"], new_params["w2"], 0.0)
    )


def test_missing_topkast_state():
    """No sparse state (Top-KAST switched off): get_masks without params is a clear error;
    forward_params passes the params through (tests/topkast_jax/test_footguns.py pins its
    one-time warning)."""
    params = tk_harness.make_params()
    state = optax.sgd(0.1).init(params)
    with pytest.raises(ValueError, match="opt_state"):
        tk.get_masks(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tk.forward_params(params, state) is params
