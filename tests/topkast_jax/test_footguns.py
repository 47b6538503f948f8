"""Footguns the library catches: the gradient through the mask (``tk.value_and_grad``, the
``tk.check_exploration`` debug check), Top-KAST switched off (no sparse state: dense answers with
one warning), a ``kernels_except`` name that matches nothing."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import topkast_jax as tk
from topkast_jax import state as state_lib

FS, BS = 0.75, 0.5


def problem():
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
        "b1": jnp.zeros((16,), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    return params, x


def loss_fn(p, x):
    return jnp.mean(jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"])


def through_the_mask(params, state, x):
    """The natural first attempt: ∂L/∂θ of L(θ ⊙ A) — zero on every weight outside A."""
    return jax.grad(lambda p: loss_fn(tk.forward_params(p, state), x))(params)


def make_tx(backward_sparsity=BS, patience=3):
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=FS, backward_sparsity=backward_sparsity)
    return tk.check_exploration(tx, patience=patience)


def test_value_and_grad_differentiates_alpha():
    params, x = problem()
    tx = make_tx()
    state = tx.init(params)
    masks = tk.get_masks(state)
    alpha = {
        k: np.where(masks.forward[k], params[k], 0) if k != "b1" else params[k] for k in params
    }
    want_loss, want = jax.value_and_grad(loss_fn)(alpha, x)
    loss, grads = jax.jit(tk.value_and_grad(loss_fn))(params, state, x)
    assert float(loss) == float(want_loss)
    (aux_loss, aux), _ = tk.value_and_grad(lambda a, x: (loss_fn(a, x), 7), has_aux=True)(
        params, state, x
    )
    assert float(aux_loss) == float(want_loss) and aux == 7
    wrong = through_the_mask(params, state, x)
    for k in ("w1", "w2"):
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-5, atol=1e-7)
        explore = np.asarray(masks.backward[k] & ~masks.forward[k])
        # B ∖ A gets its gradient (zero only where a unit's other layer is all outside A)
        assert np.count_nonzero(np.asarray(grads[k])[explore]) > 0.9 * explore.sum(), k
        assert np.all(np.asarray(wrong[k])[explore] == 0), k  # through the mask: none


def run(tx, params, x, grad_of, steps):
    """``steps`` jitted updates with gradients from ``grad_of``; the warnings they raised."""

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grad_of(params, state, x), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_step = []
        for _ in range(steps):
            params, state = step(params, state)
            jax.effects_barrier()
            per_step.append([str(w.message) for w in caught[len(sum(per_step, [])) :]])
    return per_step


def alpha_grad(params, state, x):
    return tk.value_and_grad(loss_fn)(params, state, x)[1]


def test_check_exploration_warns_once_when_b_minus_a_gets_no_gradient():
    params, x = problem()
    per_step = run(make_tx(patience=3), params, x, through_the_mask, steps=5)
    assert [len(w) for w in per_step] == [0, 0, 1, 0, 0]
    message = per_step[2][0]
    assert "B∖A of w1, w2 received exactly zero gradient for 3 consecutive updates" in message
    assert "tk.value_and_grad" in message


def test_check_exploration_is_silent_when_exploration_is_alive():
    params, x = problem()
    assert run(make_tx(patience=2), params, x, alpha_grad, steps=4) == [[]] * 4
    # B = A: nothing to explore, nothing to warn about
    assert run(make_tx(FS, patience=2), params, x, through_the_mask, steps=3) == [[]] * 3
    # a run of zero-gradient updates broken by one good update starts again from 0
    tx = make_tx(patience=3)
    state = tx.init(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for grad_of in (through_the_mask,) * 2 + (alpha_grad,) + (through_the_mask,) * 2:
            _, state = tx.update(grad_of(params, state, x), state, params)
            jax.effects_barrier()
    assert caught == []


def test_no_sparse_state_means_dense_with_one_warning(monkeypatch):
    monkeypatch.setattr(state_lib, "_WARNED_DENSE", set())
    params, x = problem()
    dense_state = optax.adam(1e-3).init(params)
    with pytest.warns(UserWarning, match=r"tk\.forward_params: opt_state holds no sparse"):
        assert tk.forward_params(params, dense_state) is params
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        assert tk.forward_params(params, dense_state) is params
        alpha = jax.jit(tk.forward_params)(params, dense_state)
    np.testing.assert_array_equal(alpha["w1"], params["w1"])
    with pytest.warns(UserWarning, match=r"tk\.exploration_penalty"):
        assert float(tk.exploration_penalty(params, dense_state)) == 0.0
    with pytest.warns(UserWarning, match=r"tk\.mask_stats"):
        assert tk.mask_stats(dense_state) == {}
    with pytest.warns(UserWarning, match=r"tk\.get_masks"):
        masks = tk.get_masks(dense_state, params)
    assert masks.forward == {"w1": None, "b1": None, "w2": None} == masks.backward
    with pytest.raises(ValueError, match=r"found 0.*get_masks\(opt_state, params\)"):
        tk.get_masks(dense_state)
    loss, grads = tk.value_and_grad(loss_fn)(params, dense_state, x)  # one code path
    np.testing.assert_allclose(grads["w1"], jax.grad(loss_fn)(params, x)["w1"])


def test_kernels_except_warns_on_a_name_that_matches_nothing():
    params = {"Dense_0": {"kernel": jnp.ones((4, 4))}, "Dense_1": {"kernel": jnp.ones((4, 4))}}
    with pytest.warns(UserWarning, match=r"kernels_except: 'Dnse_1' is no component.*Dense_0"):
        flags = tk.sparsify.kernels_except(("Dense_0", "Dnse_1"))(params)
    assert flags == {"Dense_0": {"kernel": False}, "Dense_1": {"kernel": True}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.sparsify.kernels_except(("Dense_0",))(params)
