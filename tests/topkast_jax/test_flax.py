"""Top-KAST with Flax Linen and Flax NNX: a few training steps on a tiny regression."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
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
