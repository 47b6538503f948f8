"""Table 1 ablations: random B∖A, and exploration stopped after step t (issue 2, Options)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import reference
import tk_harness

import topkast_jax as tk

FS, BS = 0.8, 0.4


def test_random_backward_set_has_exact_size_and_magnitude_forward_set():
    params = tk_harness.make_params(seed=51)
    problem = tk_harness.make_problem(params, seed=52)
    tx = tk.topkast(
        optax.sgd(0.05, momentum=0.9),
        forward_sparsity=FS,
        backward_sparsity=BS,
        exploration_l2=0.01,
        backward_selection="random",
        seed=3,
    )
    got = tk_harness.train(tx, params, problem.loss, 6)
    extras_seen = {"w1": [], "w2": []}
    for t, snap in enumerate(got):
        for i, name in ((1, "w1"), (2, "w2")):
            theta, a, b = snap.params[i], snap.forward[i], snap.backward[i]
            k_a, k_b = reference.mask_counts(theta.size, 1 - FS, 1 - BS)
            np.testing.assert_array_equal(a, reference.top_k_mask(theta, k_a), f"A at step {t}")
            assert not np.any(a & ~b), "A must be a subset of B"
            assert int((b & ~a).sum()) == k_b - k_a
            extras_seen[name].append(b & ~a)
            if t > 0:  # nothing outside the previous B moved
                prev = got[t - 1]
                outside = ~prev.backward[i]
                np.testing.assert_array_equal(theta[outside], prev.params[i][outside])
    # Random, not by magnitude: B∖A differs from the next-largest weights, and it is redrawn at
    # refreshes.
    theta0 = got[0].params[1]
    k_a, k_b = reference.mask_counts(theta0.size, 1 - FS, 1 - BS)
    magnitude_extra = reference.top_k_mask(theta0, k_b) & ~reference.top_k_mask(theta0, k_a)
    assert not np.array_equal(extras_seen["w1"][0], magnitude_extra)
    assert any(not np.array_equal(extras_seen["w1"][0], e) for e in extras_seen["w1"][1:])


def test_random_backward_set_depends_on_seed_only():
    params = tk_harness.make_params(seed=53)

    def init_fn(seed):
        tx = tk.topkast(
            optax.sgd(0.1),
            forward_sparsity=FS,
            backward_sparsity=BS,
            backward_selection="random",
            seed=seed,
        )
        return jax.jit(lambda p: tk.get_masks(tx.init(p)).backward["w1"])

    seed0 = init_fn(0)
    np.testing.assert_array_equal(seed0(params), init_fn(0)(params))
    assert not np.array_equal(seed0(params), init_fn(1)(params))


def _stop_run(refresh_every, stop, num_steps=6):
    params = tk_harness.make_params(seed=61)
    problem = tk_harness.make_problem(params, seed=62)
    tx_kwargs = dict(
        forward_sparsity=FS,
        backward_sparsity=BS,
        exploration_l2=0.05,
        refresh_every=refresh_every,
        stop_exploration_step=stop,
    )
    got = tk_harness.train(
        tk.topkast(optax.sgd(0.05, momentum=0.9), **tx_kwargs), params, problem.loss, num_steps
    )
    cfgs = tk_harness.leaf_configs(params, tx_kwargs)
    want = reference.run(
        [np.asarray(p) for p in jax.tree.leaves(params)],
        cfgs,
        problem.grad_np,
        num_steps,
        learning_rate=0.05,
        momentum=0.9,
        exploration_l2=0.05,
        refresh_every=refresh_every,
        stop_exploration_step=stop,
    )
    return got, want, cfgs, tx_kwargs


def _moved_outside_a(got, t, i):
    """Whether a weight outside A_{t} moved during step t -> t+1."""
    outside = ~got[t].forward[i]
    return not np.array_equal(got[t + 1].params[i][outside], got[t].params[i][outside])


def test_stop_exploration_matches_reference_and_freezes_b_minus_a():
    stop = 3
    got, want, cfgs, tx_kwargs = _stop_run(refresh_every=1, stop=stop)
    tk_harness.assert_matches_reference(got, want, cfgs, tx_kwargs, stop=stop)
    for i in (1, 2):
        assert any(_moved_outside_a(got, t, i) for t in range(stop)), "B∖A never moved before t"
        for t in range(stop, len(got) - 1):
            assert not _moved_outside_a(got, t, i), f"B∖A moved at step {t} >= {stop}"


def test_stop_exploration_reports_b_equal_a_from_step_t_with_refresh_every_2():
    """From count >= t on, B = A — also when step t is not a refresh step."""
    stop = 3
    got, want, cfgs, tx_kwargs = _stop_run(refresh_every=2, stop=stop)
    for t in range(stop, len(got) - 1):
        for i in (1, 2):
            assert not _moved_outside_a(got, t, i), f"B∖A moved at step {t} >= {stop}"
    for t in range(stop, len(got)):
        for i in (1, 2):
            np.testing.assert_array_equal(
                got[t].backward[i], got[t].forward[i], f"get_masks B != A at count {t}"
            )
    tk_harness.assert_matches_reference(got, want, cfgs, tx_kwargs, stop=stop)


def test_stop_exploration_at_zero_is_b_equals_a_from_init():
    params = {"w": jnp.arange(1.0, 21.0).reshape(4, 5)}
    tx = tk.topkast(
        optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.4, stop_exploration_step=0
    )
    masks = tk.get_masks(tk_harness.init(tx, params))
    np.testing.assert_array_equal(masks.backward["w"], masks.forward["w"])
