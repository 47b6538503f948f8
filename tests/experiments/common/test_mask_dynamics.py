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
