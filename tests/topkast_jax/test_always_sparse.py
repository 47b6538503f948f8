"""``tk.AlwaysSparse`` is the masked ``tk.topkast`` computed with only ``B`` on the device.

Exactness: with the same inner optimizer, data and ``refresh_every``, the two runs have identical
``A`` and ``B`` at every one of 300 steps.  Compiled without FMA contraction (``NO_FMA``) the two
are the same float arithmetic, so their parameters are bitwise equal; with XLA's default
optimisations they agree to float32 reassociation.
"""

import jax
import numpy as np
import optax
import pytest
from always_sparse_harness import NO_FMA, side_by_side

STEPS = 300
BASE = dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=1e-2)
EXACT_CASES = {
    "refresh1": dict(BASE, refresh_every=1),
    "refresh7": dict(BASE, refresh_every=7),
    "refresh100": dict(BASE, refresh_every=100),
    "0.9_0.8_refresh7": dict(BASE, forward_sparsity=0.9, backward_sparsity=0.8, refresh_every=7),
    "backward0": dict(BASE, backward_sparsity=0.0, refresh_every=3),
    "erk": dict(BASE, distribution="erk", refresh_every=7),
    "global_topk": dict(BASE, global_topk=True, refresh_every=7),
    "random_backward": dict(BASE, backward_selection="random", seed=5, refresh_every=7),
    "stop_exploration": dict(BASE, stop_exploration_step=150, refresh_every=7),
}


def _assert_trees_equal(x, y, rtol=0.0, atol=0.0):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(EXACT_CASES))
def test_bitwise_equal_to_masked_without_fma(name):
    run = side_by_side(optax.adam(1e-2), EXACT_CASES[name], STEPS, NO_FMA)
    assert run.mask_mismatch is None, f"A/B differ from step {run.mask_mismatch}"
    _assert_trees_equal(run.sparse_params, run.masked_params)


@pytest.mark.parametrize("name", ["refresh1", "0.9_0.8_refresh7"])
def test_clip_adam_with_default_compilation_matches_masked(name):
    """clip_by_global_norm sums the gradient norm in another order: reassociation only, far below
    the weights' scale (O(0.1–1)), so 1e-6 absolute is 1e-6 relative to the weights."""
    inner = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
    run = side_by_side(inner, EXACT_CASES[name], STEPS, None)
    assert run.mask_mismatch is None, f"A/B differ from step {run.mask_mismatch}"
    _assert_trees_equal(run.sparse_params, run.masked_params, rtol=1e-6, atol=1e-6)
