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


FLAX_PARAMS = {
    "blocks": {  # nn.scan-stacked: every leaf has rank >= 2
        "Dense_0": {"kernel": jnp.ones((4, 8, 8)), "bias": jnp.zeros((4, 8))},
        "LayerNorm_0": {"scale": jnp.ones((4, 8)), "bias": jnp.zeros((4, 8))},
        "attention": {"r_w_bias": jnp.zeros((4, 8, 64))},  # Transformer-XL's u, per layer
    },
    "Embed_0": {"embedding": jnp.ones((100, 8))},
    "head": {"kernel": jnp.ones((8, 1)), "bias": jnp.zeros(1)},
    "step": jnp.zeros((2, 2), jnp.int32),
}


def test_default_follows_flax_naming_whatever_the_rank():
    got = tk.sparsify.default()(FLAX_PARAMS)
    assert got == {
        "blocks": {
            "Dense_0": {"kernel": True, "bias": False},
            "LayerNorm_0": {"scale": False, "bias": False},
            "attention": {"r_w_bias": False},
        },
        "Embed_0": {"embedding": True},
        "head": {"kernel": True, "bias": False},
        "step": False,
    }
    assert tk.sparsify.kernels()(FLAX_PARAMS)["blocks"]["LayerNorm_0"]["scale"]  # the old rule


def test_default_without_flax_names_takes_rank_two_leaves_but_no_bias_or_scale():
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "bias": jnp.zeros((2, 4)),
              "scale": jnp.ones((2, 4)), "v": jnp.ones(3)}  # fmt: skip
    got = tk.sparsify.default()(params)
    assert got == {"w": True, "b": False, "bias": False, "scale": False, "v": False}


def test_default_is_what_the_optimizer_uses():
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.5)
    masks = tk.get_masks(jax.jit(tx.init)(FLAX_PARAMS)).forward
    assert masks["blocks"]["LayerNorm_0"]["scale"] is None
    assert masks["blocks"]["Dense_0"]["kernel"] is not None


def test_describe_says_the_rule():
    assert "kernel or embedding" in tk.sparsify.describe(None)
    assert tk.sparsify.describe(tk.sparsify.kernels(3)) == "floating leaves with ndim >= 3"
    assert "except under Conv_0, Dense_0" in tk.sparsify.describe(
        tk.sparsify.kernels_except(("Dense_0", "Conv_0"))
    )
    assert tk.sparsify.describe({"w": True}) == "an explicit bool per leaf"
