"""Two bits per weight whatever the leaf's shape: the sets are packed along the axis that pads
least (a convolution's ``(H, W, I, O)`` kernel has ``H`` of 1 or 3, where the first axis would
cost a byte per weight or per three weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import topkast_jax as tk
from topkast_jax import codes, sharding
from topkast_jax.state import PackedSets


@pytest.mark.parametrize(
    "shape, axis",
    [((1, 1, 12, 8), 2), ((3, 3, 8, 8), 2), ((7, 7, 3, 64), 3), ((8, 5), 0), ((5, 8), 1)]
    + [((6,), 0)],
)
def test_packing_axis_pads_least(shape, axis):
    assert sharding.packing_axis(jnp.zeros(shape)) == axis


def test_convolution_kernels_cost_two_bits_per_weight():
    shapes = {"c1": (1, 1, 12, 8), "c3": (3, 3, 8, 8), "stem": (7, 7, 3, 16), "fc": (12, 6)}
    params = {k: {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=s), jnp.float32)}
              for k, s in shapes.items()}  # fmt: skip
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
    state = jax.jit(tx.init)(params)
    weights = sum(int(np.prod(s)) for s in shapes.values())
    assert sum(b.size for b in jax.tree.leaves(state.sets)) * 4 == weights
    for name, shape in shapes.items():  # and the packed sets hold the right codes
        sets = state.sets[name]["kernel"]
        x = np.abs(np.asarray(params[name]["kernel"])).ravel()
        order = np.argsort(-x, kind="stable")
        k_a, k_b = round(0.2 * x.size), round(0.5 * x.size)
        want = np.zeros(x.size, np.uint8)
        want[order[:k_b]] = codes.IN_B
        want[order[:k_a]] |= codes.IN_A
        np.testing.assert_array_equal(np.asarray(sets.codes()).ravel(), want)
        assert isinstance(sets, PackedSets) and sets.shape == shape
