"""A refresh draws PRNG keys only for the random ``B∖A`` ablation (``backward_selection="random"``).

With magnitude ``B`` nothing at a refresh is random, so the state's key is left as it is: the
compiled refresh holds no threefry split (26 fewer XLA kernels in the Transformer-XL's refresh
program).  With random ``B∖A`` the key advances by one split per refresh, the same in the masked
``tk.topkast`` (in the step or through ``tk.refresh_sets``) and in ``tk.AlwaysSparse``.
"""

import jax
import numpy as np
import optax
import pytest
from always_sparse_harness import batch_at, masked_step, mlp_loss, mlp_params

import topkast_jax as tk

BASE = dict(forward_sparsity=0.75, backward_sparsity=0.5, refresh_every=2, seed=3)
REFRESHES = 3  # steps 2, 4, 6


def _advanced(key: jax.Array, times: int) -> np.ndarray:
    for _ in range(times):
        key, _ = jax.random.split(key)
    return np.asarray(key)


def _masked_keys(selection: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key at init, key after 2·REFRESHES steps of the step, key after as many refresh_sets)."""
    tx = tk.topkast(optax.sgd(0.1), **BASE, backward_selection=selection)
    params = mlp_params()
    state = tx.init(params)
    step = masked_step(tx, mlp_loss)
    stepped = state
    for t in range(2 * REFRESHES):
        params, stepped, _ = step(params, stepped, batch_at(t))
    refresh = jax.jit(tk.refresh_sets(tx))
    refreshed = state
    for _ in range(REFRESHES):
        refreshed = refresh(refreshed, params)
    return np.asarray(state.rng), np.asarray(stepped.rng), np.asarray(refreshed.rng)


@pytest.mark.parametrize("selection,splits", [("magnitude", 0), ("random", REFRESHES)])
def test_masked_refresh_splits_the_key_only_for_random_backward(selection, splits):
    initial, stepped, refreshed = _masked_keys(selection)
    expected = _advanced(initial, splits)
    np.testing.assert_array_equal(stepped, expected)
    np.testing.assert_array_equal(refreshed, expected)


def test_magnitude_refresh_program_holds_no_prng_split():
    params = mlp_params()
    for selection, has_split in (("magnitude", False), ("random", True)):
        tx = tk.topkast(optax.sgd(0.1), **BASE, backward_selection=selection)
        text = jax.jit(tk.refresh_sets(tx)).lower(tx.init(params), params).as_text()
        assert ("threefry" in text) == has_split, selection


@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_always_sparse_key_follows_the_masked_key(selection):
    sparse = tk.AlwaysSparse(optax.sgd(0.1), **BASE, backward_selection=selection)
    step = sparse.make_step(mlp_loss, donate=False)
    state = sparse.init(mlp_params())
    for t in range(2 * REFRESHES):
        state, _ = step(state, batch_at(t))
    _, masked, _ = _masked_keys(selection)
    np.testing.assert_array_equal(np.asarray(state.rng), masked)
