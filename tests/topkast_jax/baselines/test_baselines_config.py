"""``experiments/common/baselines_config.py``: config.sparsity -> tk.baselines (issue 5)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import topkast_jax as tk
from experiments.common import baselines_config
from topkast_jax import baselines

PARAMS = {"w": jnp.arange(1.0, 41.0).reshape(5, 8), "b": jnp.zeros(8)}


def sparsity_config(method, **fields):
    c = ml_collections.ConfigDict(
        {"method": method, "forward": 0.75, "backward": 0.5, "distribution": "uniform"}
    )
    baselines_config.add_baseline_fields(c)
    c.update(fields)
    return c


def make(method, **kw):
    num_train_steps = kw.pop("num_train_steps", 1000)
    return baselines_config.make_baseline_optimizer(
        optax.sgd(0.1), sparsity_config(method, **kw), None, num_train_steps=num_train_steps
    )


@pytest.mark.parametrize("method", baselines_config.BASELINE_METHODS)
def test_each_method_builds_a_baseline_at_the_forward_sparsity(method):
    state = make(method, begin_step=0).init(PARAMS)
    assert isinstance(tk.find_sparse_state(state), baselines.BaselineState)
    masks = tk.get_masks(state)
    want = 40 if method == "pruning" else 10  # pruning with s_i = 0 starts dense
    assert int(masks.forward["w"].sum()) == want
    np.testing.assert_array_equal(masks.forward["w"], masks.backward["w"])


def test_step_fields_default_to_fractions_of_training():
    c = sparsity_config("rigl")
    assert baselines_config.resolve_step(c, "end", 1000) == 750
    assert baselines_config.resolve_step(c, "begin", 1000) == 250
    c.end_step = 40
    assert baselines_config.resolve_step(c, "end", 1000) == 40
    with pytest.raises(ValueError, match="num_train_steps"):
        baselines_config.resolve_step(sparsity_config("rigl"), "end", None)
    c.end_fraction = 1.5
    c.end_step = -1
    with pytest.raises(ValueError, match="end_fraction"):
        baselines_config.resolve_step(c, "end", 1000)


def test_pruning_reaches_forward_sparsity_at_end_step():
    tx = make(
        "pruning", num_train_steps=8, begin_fraction=0.0, end_fraction=0.5, pruning_frequency=2
    )
    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(4):
        updates, state = tx.update(PARAMS, state, params)
        params = optax.apply_updates(params, updates)
    assert int(tk.get_masks(state).forward["w"].sum()) == 10


def test_unknown_method_and_bad_values_raise():
    with pytest.raises(ValueError, match="not a baseline"):
        make("topkast")
    with pytest.raises(ValueError, match="drop_fraction"):
        make("rigl", drop_fraction=2.0)
    with pytest.raises(ValueError, match="drop_schedule"):
        make("set", drop_schedule="linear")
    with pytest.raises(ValueError, match="sparsity must be in"):
        make("static", forward=1.0)


def test_add_baseline_fields_keeps_existing_values():
    c = ml_collections.ConfigDict({"method": "set", "update_every": 7})
    baselines_config.add_baseline_fields(c)
    assert c.update_every == 7 and c.drop_fraction == 0.3 and c.end_step == -1
