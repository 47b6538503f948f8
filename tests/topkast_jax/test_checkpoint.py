"""An orbax save/restore mid-run continues identically (issue 2, "It must work everywhere")."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import tk_harness

import topkast_jax as tk


def _tx():
    # Random B∖A makes the PRNG key part of the state that must round-trip too.
    return tk.topkast(
        optax.adam(0.05),
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        exploration_l2=0.01,
        refresh_every=2,
        backward_selection="random",
        seed=7,
    )


def _stepper(tx, loss_fn):
    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss_fn)(tk.forward_params(params, opt_state))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def _assert_identical(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_mid_run_gives_identical_continuation(tmp_path):
    params = tk_harness.make_params(seed=91)
    problem = tk_harness.make_problem(params, seed=92)
    tx = _tx()
    step = _stepper(tx, problem.loss)
    state = (params, tk_harness.init(tx, params))
    for _ in range(3):  # odd: the restore lands between refreshes
        state = step(*state)

    with ocp.CheckpointManager(
        tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2)
    ) as manager:
        manager.save(3, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        # Abstract targets: from jax.eval_shape, and from the live state.
        from_eval_shape = jax.eval_shape(lambda: (params, tx.init(params)))
        from_live = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(3, args=ocp.args.StandardRestore(from_eval_shape))
        restored_live = manager.restore(3, args=ocp.args.StandardRestore(from_live))

    _assert_identical(restored, state)
    _assert_identical(restored_live, state)
    assert isinstance(restored[1], tk.TopKastState)
    uninterrupted, resumed = state, restored
    for _ in range(4):
        uninterrupted = step(*uninterrupted)
        resumed = step(*resumed)
    _assert_identical(resumed, uninterrupted)
    np.testing.assert_array_equal(
        tk.get_masks(resumed[1]).backward["w1"], tk.get_masks(uninterrupted[1]).backward["w1"]
    )
