"""The ``sparsify`` helpers for common choices (issue 2, Options)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import topkast_jax as tk

PARAMS = {
    "Conv_0": {"kernel": jnp.ones((3, 3, 3, 8)), "bias": jnp.zeros(8)},
    "Conv_1": {"kernel": jnp.ones((3, 3, 8, 8)), "bias": jnp.zeros(8)},
    "BatchNorm_0": {"scale": jnp.ones(8)},
    "Dense_0": {"kernel": jnp.ones((8, 10)), "bias": jnp.zeros(10)},
    "Dense_01": {"kernel": jnp.ones((8, 10))},  # a name containing "Dense_0" as a substring
    "steps": jnp.ones((2, 2), jnp.int32),
}


def test_kernels_selects_floating_leaves_with_ndim_at_least_two():
    got = tk.sparsify.kernels()(PARAMS)
    assert got == {
        "Conv_0": {"kernel": True, "bias": False},
        "Conv_1": {"kernel": True, "bias": False},
        "BatchNorm_0": {"scale": False},
        "Dense_0": {"kernel": True, "bias": False},
        "Dense_01": {"kernel": True},
        "steps": False,
    }
    only_4d = tk.sparsify.kernels(min_ndim=4)(PARAMS)
    assert only_4d["Conv_1"]["kernel"] and not only_4d["Dense_0"]["kernel"]


def test_kernels_except_excludes_named_layers():
    got = tk.sparsify.kernels_except(("Conv_0", "Dense_0"))(PARAMS)
    assert got["Conv_0"] == {"kernel": False, "bias": False}
    assert got["Dense_0"] == {"kernel": False, "bias": False}
    assert got["Conv_1"]["kernel"] and got["Dense_01"]["kernel"]
    assert not got["steps"]


def test_kernels_except_rejects_a_bare_string():
    with pytest.raises(ValueError, match="names"):
        tk.sparsify.kernels_except("Conv_0")


def test_helpers_drive_the_optimizer_and_the_plan():
    sparsify = tk.sparsify.kernels_except(("Conv_0", "Dense_0"))
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.5, sparsify=sparsify)
    masks = tk.get_masks(jax.jit(tx.init)(PARAMS))
    assert masks.forward["Conv_0"]["kernel"] is None
    assert masks.forward["Conv_1"]["kernel"] is not None
    plan = tk.layer_densities(PARAMS, sparsify=sparsify, forward_sparsity=0.5)
    assert {leaf.path for leaf in plan if leaf.sparse} == {"Conv_1/kernel", "Dense_01/kernel"}
