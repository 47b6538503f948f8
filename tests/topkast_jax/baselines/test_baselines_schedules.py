"""Schedules, traced top-k and argument errors of ``topkast_jax.baselines`` (issue 5)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from topkast_jax import baselines
from topkast_jax.baselines import schedules
from topkast_jax.baselines.select import top_k_mask_traced


def zhu_gupta(t, s_i, s_f, t0, n, dt):
    """Zhu & Gupta (2018), Eq. 1, written out: s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3."""
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (n * dt)) ** 3


def test_pruning_schedule_is_the_cubic_of_zhu_and_gupta():
    t0, n, dt = 10, 5, 4
    steps = schedules.pruning_steps(t0, t0 + n * dt, dt)
    assert steps == [10, 14, 18, 22, 26, 30]
    for t in steps:
        got = schedules.pruning_sparsity(
            t, initial_sparsity=0.1, final_sparsity=0.9, begin_step=t0, end_step=t0 + n * dt
        )
        assert got == pytest.approx(zhu_gupta(t, 0.1, 0.9, t0, n, dt), abs=1e-12)
    kw = dict(initial_sparsity=0.1, final_sparsity=0.9, begin_step=t0, end_step=30)
    assert schedules.pruning_sparsity(t0, **kw) == pytest.approx(0.1)
    assert schedules.pruning_sparsity(30, **kw) == pytest.approx(0.9)
    assert schedules.pruning_sparsity(100, **kw) == pytest.approx(0.9)


def test_pruning_steps_end_on_end_step_when_not_a_multiple():
    assert schedules.pruning_steps(0, 10, 4) == [0, 4, 8, 10]
    assert schedules.pruning_steps(5, 5, 3) == [5]  # one-shot pruning


def test_cosine_drop_fraction_of_rigl():
    alpha, end = 0.3, 1000
    for t in (0, 100, 250, 500, 999, 1000):
        want = alpha / 2 * (1 + math.cos(t * math.pi / end))
        assert schedules.drop_fraction_at(t, alpha, end, "cosine") == pytest.approx(want)
        assert schedules.drop_fraction_at(t, alpha, end, "constant") == alpha
    assert schedules.drop_fraction_at(end, alpha, end, "cosine") == pytest.approx(0.0, abs=1e-17)
    assert schedules.drop_fraction_at(end + 1, alpha, end, "constant") == 0.0
    assert schedules.drop_fraction_at(0, alpha, 0, "cosine") == 0.0  # t = T_end = 0
    # RigL's is_mask_update_iter (begin_step 0): 0, ΔT, 2ΔT, ... <= end_step, step 0 included.
    assert schedules.update_steps(100, 350) == [0, 100, 200, 300]
    assert schedules.update_steps(100, 300) == [0, 100, 200, 300]
    assert schedules.update_steps(100, 0) == [0]
    # RigL's n_prune = int(n_ones · drop_fraction): truncation.
    assert schedules.drop_count(0.3, 10) == 3
    assert schedules.drop_count(0.25, 10) == 2  # int(2.5)
    assert schedules.drop_count(0.299, 10) == 2  # int(2.99)
    assert schedules.drop_count(0.0, 10) == 0


def test_event_table_lookup_under_jit():
    table = schedules.make_table([3, 7], [[5, 6], [1, 2]], 2)
    due = jax.jit(table.due)
    row = jax.jit(table.row)
    assert [bool(due(jnp.int32(t))) for t in range(9)] == [t in (3, 7) for t in range(9)]
    np.testing.assert_array_equal(row(jnp.int32(7)), [1, 2])
    np.testing.assert_array_equal(row(jnp.int32(3)), [5, 6])
    empty = schedules.make_table([], [], 2)
    assert not bool(empty.due(jnp.int32(1)))


def stable_top_k(keys, k, valid):
    """numpy reference: the k valid entries of largest key, ties to the lower index."""
    order = np.argsort(-np.where(valid, keys.astype(np.int64), -1), kind="stable")[:k]
    mask = np.zeros(keys.shape, bool)
    mask[order] = True
    return mask


@pytest.mark.parametrize("n", [1, 7, 300])
def test_traced_top_k_equals_stable_argsort(n):
    select = jax.jit(top_k_mask_traced)
    rng = np.random.default_rng(n)
    for trial in range(12):
        high = 4 if trial % 2 else 2**31 - 1  # tie-heavy and distinct keys
        keys = rng.integers(0, high, n).astype(np.int32)
        valid = rng.random(n) < (0.3 if trial % 3 else 1.0)
        if not valid.any():
            valid[0] = True
        for k in sorted({0, 1, int(valid.sum()) // 2, int(valid.sum())}):
            got = np.asarray(select(jnp.asarray(keys), jnp.int32(k), jnp.asarray(valid)))
            np.testing.assert_array_equal(got, stable_top_k(keys, k, valid), err_msg=f"k={k}")


PARAMS = {"w": jnp.ones((4, 5)), "b": jnp.zeros(5)}


def builders():
    sgd = optax.sgd(0.1)
    return {
        "static": lambda **kw: baselines.static_sparse(sgd, **{"sparsity": 0.5, **kw}),
        "pruning": lambda **kw: baselines.magnitude_pruning(
            sgd, **{"sparsity": 0.5, "begin_step": 0, "end_step": 10, **kw}
        ),
        "set": lambda **kw: baselines.set_(sgd, **{"sparsity": 0.5, "end_step": 10, **kw}),
        "rigl": lambda **kw: baselines.rigl(sgd, **{"sparsity": 0.5, "end_step": 10, **kw}),
    }


@pytest.mark.parametrize("method", ["static", "pruning", "set", "rigl"])
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_raises(method, sparsity):
    with pytest.raises(ValueError, match="sparsity must be in"):
        builders()[method](sparsity=sparsity)


@pytest.mark.parametrize("method", ["static", "pruning", "set", "rigl"])
def test_bad_distribution_and_sparsify_raise(method):
    make = builders()[method]
    with pytest.raises(ValueError, match="distribution"):
        make(distribution="gaussian")
    with pytest.raises(ValueError, match="structure of params"):
        make(sparsify={"w": True}).init(PARAMS)
    int_params = {"w": jnp.ones((4, 5)), "i": jnp.ones((2, 2), jnp.int32)}
    with pytest.raises(ValueError, match="'i'"):
        make(sparsify={"w": True, "i": True}).init(int_params)
    tx = make()
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(PARAMS, state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(sparsify={"w": False, "b": False}).init(PARAMS)
    assert any("selects no leaf" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"begin_step": -1}, "begin_step"),
        ({"begin_step": 5, "end_step": 4}, "end_step"),
        ({"frequency": 0}, "frequency"),
        ({"frequency": 2.5}, "frequency"),
        ({"initial_sparsity": 0.6}, "initial_sparsity"),
        ({"initial_sparsity": 1.0}, "initial_sparsity"),
    ],
)
def test_pruning_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        builders()["pruning"](**kwargs)


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"update_every": 0}, "update_every"),
        ({"update_every": True}, "update_every"),
        ({"end_step": -3}, "end_step"),
        ({"drop_fraction": 1.5}, "drop_fraction"),
        ({"drop_fraction": -0.1}, "drop_fraction"),
        ({"drop_schedule": "linear"}, "drop_schedule"),
    ],
)
def test_drop_and_grow_bad_arguments_raise(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builders()[method](**kwargs)
