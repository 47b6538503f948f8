"""``tk.refresh_sets``: the refresh of A and B as a program of its own equals the in-step refresh
bit for bit, and refuses what it cannot refresh."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tk_harness

import topkast_jax as tk

CONFIGS = {
    "paper": {},
    "reservoir": {"track_reservoir": True},
    "stop_at_a_refresh": {"stop_exploration_step": 3},
    "random_b": {"backward_selection": "random", "seed": 5},
    "global_topk": {"global_topk": True},
    "erk_sort": {"distribution": "erk", "selection_method": "sort"},
    "nm": {"structure": tk.NM(1, 2, axis=0), "forward_sparsity": None, "backward_sparsity": None},
    "layer_axis": {"layer_axis": {"b": None, "w1": None, "w2": 0}},
}


def _transform(**options):
    kwargs = {
        "forward_sparsity": 0.7,
        "backward_sparsity": 0.4,
        "exploration_l2": 0.01,
        "refresh_every": 3,
        **options,
    }
    return tk.topkast(optax.adam(0.05), **kwargs)


def _loop(tx, params, loss, steps, split):
    """``steps`` jitted steps refreshing after every third; ``split``: the step never refreshes
    and the jitted ``tk.refresh_sets(tx)`` runs after it instead."""

    @functools.partial(jax.jit, static_argnums=2)
    def step(params, state, refresh_masks):
        grads = jax.grad(loss)(tk.forward_params(params, state))
        updates, state = tx.update(grads, state, params, refresh_masks=refresh_masks)
        return optax.apply_updates(params, updates), state

    refresh = jax.jit(tk.refresh_sets(tx), donate_argnums=0)
    state = tk_harness.init(tx, params)
    states = []
    for t in range(steps):
        due = (t + 1) % 3 == 0
        params, state = step(params, state, due and not split)
        if due and split:
            state = refresh(state, params)
        states.append(jax.device_get((params, state)))
    return states


def _assert_identical(want, got, step):
    want_leaves, want_def = jax.tree.flatten(want)
    got_leaves, got_def = jax.tree.flatten(got)
    assert want_def == got_def
    for a, b in zip(want_leaves, got_leaves, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"after step {step}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_separate_refresh_equals_the_in_step_refresh(name):
    params = tk_harness.make_params(seed=3)
    problem = tk_harness.make_problem(params, seed=4)
    tx = _transform(**CONFIGS[name])
    want = _loop(tx, params, problem.loss, 7, split=False)
    got = _loop(tx, params, problem.loss, 7, split=True)
    for t, (w, g) in enumerate(zip(want, got, strict=True)):
        _assert_identical(w, g, t + 1)
    # The refreshes changed the sets, so the comparison covers a selection that moved.
    first, last = (tk.get_masks(s[1]).forward for s in (want[0], want[-1]))
    assert any(
        (a != b).any() for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last), strict=True)
    )


def test_separate_refresh_counts_the_step_it_follows():
    """The stop-exploration ablation reads the state's count: from step 3 on, B = A."""
    params = tk_harness.make_params(seed=3)
    tx = _transform(stop_exploration_step=2)
    state = tk_harness.init(tx, params)
    refresh = tk.refresh_sets(tx)
    early = tk.get_masks(refresh(state._replace(count=jnp.int32(1)), params))
    late = tk.get_masks(refresh(state._replace(count=jnp.int32(2)), params))
    assert not np.array_equal(early.forward["w1"], early.backward["w1"])
    np.testing.assert_array_equal(late.forward["w1"], late.backward["w1"])


@pytest.mark.parametrize(
    "tx",
    [
        optax.adam(0.1),
        optax.chain(_transform()),
        optax.inject_hyperparams(tk.topkast, static_args=("forward_sparsity",))(
            optax.sgd(0.1), forward_sparsity=0.8
        ),
    ],
    ids=["adam", "chain", "inject_hyperparams"],
)
def test_refresh_sets_needs_the_topkast_transformation(tx):
    with pytest.raises(ValueError, match="refresh_sets needs the transformation tk.topkast"):
        tk.refresh_sets(tx)


def test_refresh_checks_its_arguments():
    params = tk_harness.make_params()
    tx = _transform()
    state = tk_harness.init(tx, params)
    refresh = tk.refresh_sets(tx)
    with pytest.raises(ValueError, match="state must be the TopKastState"):
        refresh(optax.adam(0.1).init(params), params)
    wrong = dict(params, w1=jnp.zeros((5, 6)))
    with pytest.raises(ValueError, match="'w1' has shape \\(5, 6\\)"):
        refresh(state, wrong)


def test_check_exploration_keeps_the_refresh():
    """``tk.check_exploration`` keeps ``tx``'s state, so its refresh applies unchanged."""
    params = tk_harness.make_params(seed=3)
    tx = _transform()
    state = tk_harness.init(tx, params)
    moved = jax.tree.map(lambda x: x[::-1], params)
    want = tk.refresh_sets(tx)(state, moved)
    _assert_identical(want, tk.refresh_sets(tk.check_exploration(tx))(state, moved), 0)


def test_separate_refresh_inside_multisteps():
    """``optax.MultiSteps(tk.topkast(...))``: every micro-step with ``refresh_masks=False`` and
    the refresh applied to ``inner_opt_state`` after the due optimizer steps trains the run of
    ``refresh_masks`` set on the last micro-step of those steps, bit for bit."""
    params = tk_harness.make_params(seed=3)
    problem = tk_harness.make_problem(params, seed=4)
    k = 3
    topkast_tx = _transform(refresh_every=2)
    tx = optax.MultiSteps(topkast_tx, every_k_schedule=k)
    refresh = jax.jit(tk.refresh_sets(topkast_tx))

    @functools.partial(jax.jit, static_argnums=3)
    def micro_step(params, state, scale, refresh_masks):
        grads = jax.grad(lambda a: scale * problem.loss(a))(tk.forward_params(params, state))
        updates, state = tx.update(grads, state, params, refresh_masks=refresh_masks)
        return optax.apply_updates(params, updates), state

    def run(split):
        p, s = params, tx.init(params)
        for t in range(4 * k):
            due = t % k == k - 1 and (t // k + 1) % 2 == 0
            p, s = micro_step(p, s, 1.0 + t / 10, False if split else due)
            if split and due:
                s = s._replace(inner_opt_state=refresh(s.inner_opt_state, p))
        return jax.device_get((p, s))

    want = run(split=False)
    _assert_identical(want, run(split=True), 4 * k)
    assert float(tk.mask_stats(want[1])["mask_change"]) > 0  # the last refresh moved A
