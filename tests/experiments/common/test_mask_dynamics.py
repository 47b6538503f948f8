"""Figure-3 mask dynamics: window change against a numpy reference, the logged record, the
default window."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.common import mask_dynamics


def test_window_change_is_the_fraction_of_flipped_positions():
    rng = np.random.default_rng(0)
    old = {"a": rng.random((6, 5)) < 0.3, "b": None, "c": {"k": rng.random((4, 4)) < 0.5}}
    new = {"a": rng.random((6, 5)) < 0.3, "b": None, "c": {"k": old["c"]["k"].copy()}}
    new["c"]["k"][0, :2] = ~new["c"]["k"][0, :2]
    as_jax = lambda t: {"a": jnp.asarray(t["a"]), "b": None, "c": {"k": jnp.asarray(t["c"]["k"])}}
    change = mask_dynamics.window_change(as_jax(old), as_jax(new))
    assert set(change) == {"a", "c/k"}  # the dense leaf (None) is skipped
    assert float(change["a"]) == pytest.approx(np.mean(old["a"] != new["a"]))
    assert float(change["c/k"]) == pytest.approx(2 / 16)


def test_window_metrics_record():
    record = mask_dynamics.window_metrics({"l1": 0.1, "l2": 0.3}, window=50)
    assert record == {
        "window_change/l1": 0.1,
        "window_change/l2": 0.3,
        "window_change_min": 0.1,
        "window_change_mean": pytest.approx(0.2),
        "window_change_max": 0.3,
        "window_steps": 50.0,
    }
    assert mask_dynamics.window_metrics({}, window=50) == {}


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"num_train_steps": 1_000_000}, 5000),  # the paper's window
        ({"num_train_steps": 1500}, 150),  # a tenth of a short run
        ({"num_train_steps": 5}, 1),
        ({"num_train_steps": 1500, "mask_window_steps": 7}, 7),  # set explicitly
    ],
)
def test_window_steps(fields, expected):
    assert mask_dynamics.window_steps(ml_collections.ConfigDict(fields)) == expected


def test_jitted_window_fns_measure_then_move_the_snapshot():
    import optax

    import topkast_jax as tk

    params = {"w": jnp.arange(20.0).reshape(4, 5)}
    tx = tk.topkast(optax.sgd(1.0), forward_sparsity=0.5, backward_sparsity=0.5)
    opt_state = tx.init(params)
    state = {"opt_state": opt_state, "mask_snapshot": tk.get_masks(opt_state).forward}
    change_fn, snapshot_fn = mask_dynamics.jitted_window_fns(None)
    assert float(change_fn(state)["w"]) == 0.0
    # reversing the magnitudes moves A to the other half: every position flips
    _, opt_state = tx.update({"w": jnp.full((4, 5), 0.0)}, opt_state, {"w": 20.0 - params["w"]})
    state = dict(state, opt_state=opt_state)
    flipped = np.mean(
        np.asarray(tk.get_masks(opt_state).forward["w"]) != np.asarray(state["mask_snapshot"]["w"])
    )
    assert flipped == 1.0
    assert float(change_fn(state)["w"]) == pytest.approx(flipped)
    state = snapshot_fn(state)
    assert float(change_fn(state)["w"]) == 0.0
