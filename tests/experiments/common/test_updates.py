"""``experiments.common.updates``: the train step, then the refresh program on the due steps;
the first call of each counted as compile time, the refresh's penalty in the metrics."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import topkast_jax as tk
from experiments.common import sparsity as sparsity_lib
from experiments.common import updates as updates_lib
from experiments.common.progress import ProgressLogger


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_updates_run_the_refresh_after_the_due_steps_and_count_first_calls_as_compile():
    clock = FakeClock()
    progress = ProgressLogger(total_steps=10, clock=clock)
    calls = []

    def train_step(state, batch):
        clock.now += 10.0 if "step" not in calls else 1.0
        calls.append("step")
        return state + batch, {"loss": state, "exploration_penalty": -1.0}

    def refresh_step(state):
        clock.now += 20.0 if "refresh" not in calls else 2.0
        calls.append("refresh")
        return state * 10, 7.0

    update = updates_lib.Updates(train_step, refresh_step, lambda step: step % 2 == 1, progress)
    state, metrics = update(0, 1, 1)
    assert (state, metrics) == (2, {"loss": 1, "exploration_penalty": -1.0})
    state, metrics = update(1, state, 1)
    assert (state, metrics) == (30, {"loss": 2, "exploration_penalty": 7.0})
    update(2, state, 1)
    update(3, state, 1)
    assert calls == ["step", "step", "refresh", "step", "step", "refresh"]
    assert progress.excluded_seconds() == {"compile": 30.0}  # the first step and first refresh
    assert progress.training_seconds() == 1.0 * 3 + 2.0


def test_without_a_refresh_step_only_the_train_step_runs():
    progress = ProgressLogger(total_steps=10, clock=FakeClock())
    update = updates_lib.Updates(lambda s, b: (s + b, {}), None, lambda step: True, progress)
    assert update(0, 1, 2) == (3, {})


def test_refresh_step_refreshes_the_opt_state_and_reports_its_penalty():
    params = {"w": jnp.arange(1.0, 11.0).reshape(2, 5)}
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, exploration_l2=0.5, refresh_every=10)
    state = {"params": params, "opt_state": tx.init(params)}
    flipped = {"w": params["w"][::-1]}
    refreshed, penalty = updates_lib.make_refresh_step(tx)(dict(state, params=flipped))
    np.testing.assert_array_equal(
        tk.get_masks(refreshed["opt_state"]).forward["w"], np.abs(flipped["w"]) >= 9
    )
    assert float(penalty) == float(tk.exploration_penalty(flipped, refreshed["opt_state"]))
    in_a, rest = 9.0**2 + 10.0**2, sum(v**2 for v in range(1, 9))  # B: every weight
    assert float(penalty) == 0.5 * (0.5 * in_a + 0.5 * rest / 0.2)  # λ(½‖θ_A‖² + ½‖θ_B∖A‖²/D)


def test_separate_refresh_only_for_masked_topkast_refreshing_every_few_steps():
    def sparsity(**fields):
        return ml_collections.ConfigDict({"method": "topkast", "refresh_every": 100, **fields})

    assert sparsity_lib.separate_refresh(sparsity())
    assert not sparsity_lib.separate_refresh(sparsity(refresh_every=1))
    assert not sparsity_lib.separate_refresh(sparsity(always_sparse=True))
    assert not sparsity_lib.separate_refresh(sparsity(method="rigl"))
    due = sparsity_lib.refresh_schedule(sparsity())
    assert [s for s in range(300) if due(s)] == [99, 199, 299]
