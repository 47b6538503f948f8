"""ImageNet weight decay per method (issue 13): the baselines decay their sparse kernels.

RigL's ImageNet recipe (google-research/rigl ``imagenet_train_eval.py``, ``--weight_decay 1e-4``)
puts an ``l2_regularizer`` on every kernel, so the loss gradient of a weight gains ``λθ``.  With a
zero data gradient, one SGD + momentum step from a zero trace is then exactly
``u = −η λ θ`` on every kernel weight the method trains, and nothing on biases and BatchNorm
parameters; weights outside the method's mask end the step at exactly 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import topkast_jax as tk
from configs.imagenet import tiny
from experiments.imagenet import optimizer as opt_lib
from experiments.imagenet import train

BASELINES = ("static", "pruning", "set", "rigl")


def small_resnet_params():
    """A few leaves named like the ResNet's (first conv, a block, BatchNorm, classifier)."""
    rng = np.random.default_rng(0)
    shapes = {
        "conv_init": {"kernel": (3, 3, 3, 8)},
        "bn_init": {"scale": (8,), "bias": (8,)},
        "stage1_block1": {"conv1": {"kernel": (1, 1, 8, 8)}, "conv2": {"kernel": (3, 3, 8, 8)}},
        "head": {"kernel": (8, 10), "bias": (10,)},
    }
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def zero_gradient_step(method):
    """``(params, updates, M ∩ M', η, λ, sparse flags)`` of one zero-gradient step that is not a
    skipped mask-update step (RigL skips the gradient at step 0: the second step is taken); SET
    updates its mask after this step (M' the new mask, M the one before)."""
    config = tiny.get_config("0.8,0.5")
    config.sparsity.method = method
    config.sparsity.begin_step = 0  # pruning: sparse from the start
    config.sparsity.initial_sparsity = 0.5
    config.optimizer.warmup_epochs = 0.0  # η = peak from the first step
    config.optimizer.nesterov = False
    params = small_resnet_params()
    sparsify = train.sparsify_fn(config)
    tx, schedule = opt_lib.make_optimizer(config, params, sparsify)
    state = jax.jit(tx.init)(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    if method == "rigl":  # step 0 updates the mask and skips the gradient, as RigL's optimizer
        updates, state = update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    before = tk.get_masks(state).forward
    updates, state = update(zeros, state, params)
    kept = jax.tree.map(jnp.logical_and, before, tk.get_masks(state).forward)
    return params, updates, kept, float(schedule(0)), config.optimizer.weight_decay, sparsify


@pytest.mark.parametrize("method", [*BASELINES, "dense"])
def test_one_zero_gradient_step_decays_every_trained_kernel_weight(method):
    params, updates, kept, lr, wd, sparsify = zero_gradient_step(method)
    assert lr > 0 and wd > 0
    flags = sparsify(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    get = {jax.tree_util.keystr(path): x for path, x in flat}
    u = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(updates)[0]}
    m = {
        jax.tree_util.keystr(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(kept, is_leaf=lambda x: x is None)[0]
    }
    f = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(flags)[0]}
    sparse_seen = 0
    for name, theta in get.items():
        theta, step = np.asarray(theta, np.float64), np.asarray(u[name], np.float64)
        if theta.ndim < 2:  # biases, BatchNorm: no decay
            np.testing.assert_array_equal(step, 0.0, err_msg=name)
            continue
        active = np.ones(theta.shape, bool) if m.get(name) is None else np.asarray(m[name])
        if f[name] and method != "dense":
            sparse_seen += 1
            assert 0 < active.sum() < active.size, name
            np.testing.assert_array_equal(theta[~active] + step[~active], 0.0, err_msg=name)
        np.testing.assert_allclose(
            step[active], -lr * wd * theta[active], rtol=1e-5, atol=1e-12, err_msg=name
        )
        assert np.all(step[active][theta[active] != 0] != 0), name  # the decay is not lost
    assert sparse_seen > 0 or method == "dense"


def test_only_topkast_sparse_kernels_skip_plain_l2():
    config = tiny.get_config("0.8,0.5")
    params = train.abstract_variables(train.create_model(config), 16)["params"]
    flags = train.sparsify_fn(config)(params)
    conv = ("stage1_block1", "conv1", "kernel")
    assert flags[conv[0]][conv[1]][conv[2]]  # a sparse kernel
    for method in (*BASELINES, "dense", "topkast"):
        mask = opt_lib.l2_mask(params, flags, method)
        assert mask[conv[0]][conv[1]][conv[2]] == (method != "topkast"), method
        assert mask["conv_init"]["kernel"] and mask["head"]["kernel"]
        assert not mask["head"]["bias"] and not mask["bn_init"]["scale"]
