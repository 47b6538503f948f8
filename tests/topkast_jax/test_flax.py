"""Top-KAST with Flax Linen and Flax NNX: a few training steps on a tiny regression; NNX with
BatchNorm and Dropout state, and with ``nnx.Optimizer``."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import topkast_jax as tk

FS, BS = 0.7, 0.4
NUM_STEPS = 40


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    w_true = rng.normal(size=(8, 1)).astype(np.float32) * (rng.random((8, 1)) < 0.5)
    return jnp.asarray(x), jnp.asarray(np.tanh(x @ w_true))


def _check_sparse_leaf(name, theta, a, b, prev_theta, prev_b):
    k_a, k_b = reference.mask_counts(theta.size, 1 - FS, 1 - BS)
    assert a.sum() == k_a and b.sum() == k_b and not np.any(a & ~b), name
    np.testing.assert_array_equal(theta[~prev_b], prev_theta[~prev_b], f"{name} moved outside B")


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(16)(x)))


def test_linen_training_reduces_loss_and_keeps_sparsity():
    x, y = _data()
    model = _LinenMLP()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    tx = tk.topkast(
        optax.adam(0.03),
        forward_sparsity=FS,
        backward_sparsity=BS,
        exploration_l2=1e-4,
        sparsify=tk.sparsify.kernels(),
    )

    def loss_fn(alpha):
        return jnp.mean((model.apply({"params": alpha}, x) - y) ** 2)

    @jax.jit
    def step(params, opt_state):
        alpha = tk.forward_params(params, opt_state)
        loss, grads = jax.value_and_grad(loss_fn)(alpha)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = jax.jit(tx.init)(params)
    losses = []
    for _ in range(NUM_STEPS):
        prev_params, prev_masks = params, tk.get_masks(opt_state)
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
        masks = tk.get_masks(opt_state)
        for layer in ("Dense_0", "Dense_1"):
            _check_sparse_leaf(
                layer,
                np.asarray(params[layer]["kernel"]),
                np.asarray(masks.forward[layer]["kernel"]),
                np.asarray(masks.backward[layer]["kernel"]),
                np.asarray(prev_params[layer]["kernel"]),
                np.asarray(prev_masks.backward[layer]["kernel"]),
            )
            assert masks.forward[layer]["bias"] is None
    assert losses[-1] < 0.5 * losses[0], losses
    alpha = tk.forward_params(params, opt_state)
    nonzero = int(jnp.sum(alpha["Dense_0"]["kernel"] != 0))
    assert nonzero <= reference.mask_counts(8 * 16, 1 - FS, 1 - BS)[0]


class _NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def test_nnx_training_reduces_loss_and_keeps_sparsity():
    x, y = _data()
    model = _NNXMLP(nnx.Rngs(0))
    graphdef, params, rest = tk.nnx.split(model)
    tx = tk.topkast(
        optax.adam(0.03),
        forward_sparsity=FS,
        backward_sparsity=BS,
        exploration_l2=1e-4,
        sparsify=tk.sparsify.kernels(),
    )

    def loss_fn(alpha, rest):
        return jnp.mean((nnx.merge(graphdef, alpha, rest)(x) - y) ** 2)

    @jax.jit
    def step(params, opt_state, rest):
        loss, grads = jax.value_and_grad(loss_fn)(tk.forward_params(params, opt_state), rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = jax.jit(tx.init)(params)
    losses = []
    for _ in range(NUM_STEPS):
        prev_params, prev_masks = params, tk.get_masks(opt_state)
        params, opt_state, loss = step(params, opt_state, rest)
        losses.append(float(loss))
        masks = tk.get_masks(opt_state)
        for layer in ("l1", "l2"):
            _check_sparse_leaf(
                layer,
                np.asarray(jax.tree.leaves(params[layer]["kernel"])[0]),
                np.asarray(jax.tree.leaves(masks.forward[layer]["kernel"])[0]),
                np.asarray(jax.tree.leaves(masks.backward[layer]["kernel"])[0]),
                np.asarray(jax.tree.leaves(prev_params[layer]["kernel"])[0]),
                np.asarray(jax.tree.leaves(prev_masks.backward[layer]["kernel"])[0]),
            )
    assert losses[-1] < 0.5 * losses[0], losses
    sparse = tk.nnx.sparse_model(graphdef, params, rest, opt_state)
    kernel = np.asarray(sparse.l1.kernel[...])
    a = np.asarray(jax.tree.leaves(tk.get_masks(opt_state).forward["l1"]["kernel"])[0])
    np.testing.assert_array_equal(kernel[~a], 0.0)
    assert np.count_nonzero(kernel) <= a.sum()
    final_loss = float(jnp.mean((sparse(x) - y) ** 2))
    np.testing.assert_allclose(
        final_loss, float(loss_fn(tk.forward_params(params, opt_state), rest)), rtol=1e-5
    )


class _NNXBatchNormNet(nnx.Module):
    """Linear → BatchNorm → ReLU → Dropout → Linear: state that changes in the forward pass."""

    def __init__(self, rngs, dropout=0.1):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _nnx_tx():
    return tk.topkast(
        optax.adam(0.03),
        forward_sparsity=FS,
        backward_sparsity=BS,
        exploration_l2=1e-4,
        sparsify=tk.sparsify.kernels(),
    )


def _mse_step(graphdef, x, y):
    def loss_fn(alpha, rest):
        pred, new_rest = tk.nnx.apply(graphdef, alpha, rest, lambda m: m(x))
        return jnp.mean((pred - y) ** 2), new_rest

    return loss_fn


def _functional_step(graphdef, tx, x, y):
    """The README's functional NNX recipe: ``(params, rest, opt_state) -> (..., loss)``."""
    loss_fn = _mse_step(graphdef, x, y)

    @jax.jit
    def step(params, rest, opt_state):
        alpha = tk.forward_params(params, opt_state)
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(alpha, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return step


def _leaf(tree, *path):
    for key in path:
        tree = tree[key]
    return np.asarray(jax.tree.leaves(tree)[0])


def test_nnx_batchnorm_and_dropout_state_threads_through_the_step():
    x, y = _data()
    model = _NNXBatchNormNet(nnx.Rngs(0, dropout=1))
    graphdef, params, rest = tk.nnx.split(model)
    tx = _nnx_tx()
    step = _functional_step(graphdef, tx, x, y)

    opt_state = tx.init(params)
    # BatchNorm's running mean after one step, from a numpy forward pass on α = θ ⊙ A
    w1 = _leaf(params, "l1", "kernel") * _leaf(tk.get_masks(opt_state).forward, "l1", "kernel")
    h = np.asarray(x) @ w1 + _leaf(params, "l1", "bias")
    count0 = _leaf(rest, "drop", "rngs", "count")
    params, rest, opt_state, loss = step(params, rest, opt_state)
    np.testing.assert_allclose(_leaf(rest, "bn", "mean"), 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_leaf(rest, "bn", "var"), 0.9 + 0.1 * h.var(0), rtol=1e-5)
    assert _leaf(rest, "drop", "rngs", "count") == count0 + 1  # a fresh dropout key
    losses = [float(loss)]
    for _ in range(NUM_STEPS):
        prev_params, prev_masks = params, tk.get_masks(opt_state)
        params, rest, opt_state, loss = step(params, rest, opt_state)
        losses.append(float(loss))
        masks = tk.get_masks(opt_state)
        for layer in ("l1", "l2"):
            _check_sparse_leaf(
                layer,
                _leaf(params, layer, "kernel"),
                _leaf(masks.forward, layer, "kernel"),
                _leaf(masks.backward, layer, "kernel"),
                _leaf(prev_params, layer, "kernel"),
                _leaf(prev_masks.backward, layer, "kernel"),
            )
    assert losses[-1] < 0.5 * losses[0], losses
    # evaluation: the sparse network with the running statistics
    sparse = tk.nnx.sparse_model(graphdef, params, rest, opt_state)
    sparse.eval()
    kernel = np.asarray(sparse.l1.kernel[...])
    np.testing.assert_array_equal(kernel[~_leaf(masks.forward, "l1", "kernel")], 0.0)
    np.testing.assert_allclose(np.asarray(sparse.bn.mean[...]), _leaf(rest, "bn", "mean"))
    assert np.isfinite(np.asarray(sparse(x))).all()


def test_nnx_optimizer_recipe_equals_the_functional_recipe():
    x, y = _data()
    tx = _nnx_tx()
    # functional: params, rest and opt_state as pytrees
    graphdef, params, rest = tk.nnx.split(_NNXBatchNormNet(nnx.Rngs(0, dropout=1)))
    step = _functional_step(graphdef, tx, x, y)

    # nnx.Optimizer: the module and the optimizer hold everything
    model = _NNXBatchNormNet(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, tk.nnx.for_optimizer(tx), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        graphdef, params, rest = tk.nnx.split(model)
        alpha = tk.nnx.forward_params(params, optimizer)
        (loss, new_rest), grads = jax.value_and_grad(_mse_step(graphdef, x, y), has_aux=True)(
            alpha, rest
        )
        nnx.update(model, new_rest)
        optimizer.update(model, grads)
        return loss

    opt_state = tx.init(params)
    for _ in range(5):
        params, rest, opt_state, loss = step(params, rest, opt_state)
        np.testing.assert_allclose(float(nnx_step(model, optimizer)), float(loss), rtol=1e-6)
    _, nnx_params, nnx_rest = tk.nnx.split(model)
    for a, b in zip(jax.tree.leaves(nnx_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_leaf(nnx_rest, "bn", "mean"), _leaf(rest, "bn", "mean"), rtol=1e-6)
    masks = tk.get_masks(tk.nnx.optimizer_state(optimizer, nnx_params))
    want = tk.get_masks(opt_state)
    for layer in ("l1", "l2"):
        np.testing.assert_array_equal(
            _leaf(masks.forward, layer, "kernel"), _leaf(want.forward, layer, "kernel")
        )
    sparse = tk.nnx.sparse_model(*tk.nnx.split(model), optimizer)
    np.testing.assert_array_equal(
        np.asarray(sparse.l1.kernel[...]) != 0, _leaf(want.forward, "l1", "kernel")
    )


def test_nnx_without_flax_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)  # as if flax were not installed
    monkeypatch.setitem(sys.modules, "flax.nnx", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install flax"):
        tk.nnx.split(object())
