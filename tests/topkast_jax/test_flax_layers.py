"""Scan-stacked Flax models (issue 14): the layer axis is read from Flax metadata — Linen
``nn.scan(..., metadata_params={nn.PARTITION_NAME: "layers"})`` over ``nn.Partitioned`` params and
NNX ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: "layers"})`` stacks run with
``nnx.scan`` — so with no argument every layer keeps exactly its own ``k``, even with layer 0
three times larger, through training; and the default ``sparsify`` leaves the stacked norm scales
and biases dense."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import topkast_jax as tk

LAYERS, WIDTH, FS = 4, 8, 0.75
K = reference.mask_counts(WIDTH * WIDTH, 1 - FS, 1 - FS)[0]  # per layer and kernel


def _init(names):
    return nn.with_partitioning(nn.initializers.lecun_normal(), names)


class Block(nn.Module):
    """Dense → LayerNorm → ReLU → Dense, residual; partitioned params."""

    @nn.compact
    def __call__(self, x_BxD, _):
        zeros = nn.with_partitioning(nn.initializers.zeros, ("mlp",))
        h_BxD = nn.Dense(WIDTH, kernel_init=_init(("embed", "mlp")), bias_init=zeros)(x_BxD)
        h_BxD = nn.LayerNorm(
            scale_init=nn.with_partitioning(nn.initializers.ones, ("mlp",)), bias_init=zeros
        )(h_BxD)
        out_BxD = nn.Dense(WIDTH, kernel_init=_init(("mlp", "embed")))(nn.relu(h_BxD))
        return x_BxD + out_BxD, None


class ScanModel(nn.Module):
    @nn.compact
    def __call__(self, x_BxD):
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_BxD, _ = stack(name="blocks")(x_BxD, None)
        return nn.Dense(1, kernel_init=_init(("embed", None)))(x_BxD)


def _linen_problem():
    model = ScanModel()
    x_BxD = jax.random.normal(jax.random.PRNGKey(1), (16, WIDTH))
    params = model.init(jax.random.PRNGKey(0), x_BxD)["params"]
    params = jax.tree.map(lambda p: p.at[0].multiply(3.0) if p.ndim == 3 else p, params)

    def loss(alpha):
        return jnp.mean(model.apply({"params": alpha}, x_BxD) ** 2)

    return params, loss


def _per_layer_counts(mask) -> list[int]:
    return np.asarray(mask).reshape(LAYERS, -1).sum(axis=1).tolist()


def test_linen_scan_stack_is_selected_per_layer_through_training():
    params, loss = _linen_problem()
    tx = tk.topkast(optax.adam(1e-2), forward_sparsity=FS, backward_sparsity=0.5)
    plan = {leaf.path: leaf for leaf in tk.layer_densities(params, sparsify=tk.sparsify.default(),
                                                           forward_sparsity=FS)}  # fmt: skip
    assert plan["blocks/Dense_0/kernel"].layer_axis == 0
    assert plan["blocks/Dense_0/kernel"].layers == LAYERS
    assert plan["Dense_0/kernel"].layer_axis is None  # the head: no 'layers' name
    assert not plan["blocks/LayerNorm_0/scale"].sparse  # stacked (4, 8), yet a scale
    assert not plan["blocks/Dense_0/bias"].sparse

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(tk.forward_params(params, state))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(tx.init)(params)
    for _ in range(3):
        masks = tk.get_masks(state).forward["blocks"]
        for name in ("Dense_0", "Dense_1"):
            kernel = masks[name]["kernel"]
            assert isinstance(kernel, nn.Partitioned)  # the mask keeps the kernel's box
            assert _per_layer_counts(kernel.value) == [K] * LAYERS
        params, state = step(params, state)
    stats = tk.mask_stats(state)
    for i in range(LAYERS):
        assert float(stats[f"forward_density/blocks/Dense_0/kernel/{i}"]) == K / WIDTH**2

    whole = tk.topkast(optax.adam(1e-2), forward_sparsity=FS, layer_axis=None)
    counts = _per_layer_counts(tk.get_masks(whole.init(params)).forward["blocks"]["Dense_0"]
                               ["kernel"].value)  # fmt: skip
    assert counts[0] > 2 * K and sum(counts) == LAYERS * K  # what the issue measured


def test_default_sparsify_leaves_stacked_scales_and_biases_dense():
    params, _ = _linen_problem()
    flags = jax.tree_util.tree_flatten_with_path(tk.sparsify.default()(params))[0]
    sparse = {tk.tree.path_name(path) for path, flag in flags if flag}
    assert sparse == {"blocks/Dense_0/kernel", "blocks/Dense_1/kernel", "Dense_0/kernel"}
    old = jax.tree_util.tree_flatten_with_path(tk.sparsify.kernels()(params))[0]
    assert "blocks/LayerNorm_0/scale" in {tk.tree.path_name(p) for p, flag in old if flag}


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        self.linear = nnx.Linear(WIDTH, WIDTH, kernel_init=init, rngs=rngs)
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)

    def __call__(self, x_BxD):
        return x_BxD + self.norm(nnx.relu(self.linear(x_BxD)))


@pytest.fixture
def nnx_stack():
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return NNXBlock(rngs)

    with nnx.use_eager_sharding(False):
        return make(nnx.Rngs(0))


def test_nnx_scan_stack_is_selected_per_layer(nnx_stack):
    graphdef, params, rest = tk.nnx.split(nnx_stack)
    params = jax.tree.map(lambda p: p.at[0].multiply(3.0) if p.ndim == 3 else p, params)
    x_BxD = jax.random.normal(jax.random.PRNGKey(1), (16, WIDTH))

    def forward(stack):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x_BxD, block):
            return block(x_BxD)

        return run(x_BxD, stack)

    def loss(alpha):
        out, _ = tk.nnx.apply(graphdef, alpha, rest, forward)
        return jnp.mean(out**2)

    tx = tk.topkast(optax.adam(1e-2), forward_sparsity=FS)
    state = tx.init(params)
    plan = {leaf.path: leaf for leaf in tk.layer_densities(params, sparsify=tk.sparsify.default(),
                                                           forward_sparsity=FS)}  # fmt: skip
    assert plan["linear/kernel"].layer_axis == 0 and not plan["norm/scale"].sparse
    for _ in range(2):
        mask = tk.get_masks(state).forward["linear"]["kernel"]
        assert _per_layer_counts(jax.tree.leaves(mask)[0]) == [K] * LAYERS
        grads = jax.grad(loss)(tk.forward_params(params, state))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
