"""The library's own inputs: half-precision params are selected exactly like their float32
widening, NaN weights rank as magnitude 0, and every bad argument is a ValueError naming the
argument or leaf (never a silent broadcast, a bare TypeError or NaN statistics)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import topkast_jax as tk
from topkast_jax import selection


def reference_mask(x32, k):
    """numpy: the ``k`` largest ``|x|`` (NaN as 0), ties to the lower row-major index."""
    magnitude = np.abs(np.asarray(x32, np.float32)).ravel()
    magnitude = np.where(np.isnan(magnitude), 0.0, magnitude)
    mask = np.zeros(magnitude.size, bool)
    mask[np.argsort(-magnitude, kind="stable")[:k]] = True
    return mask.reshape(np.shape(x32))


def count(density, size):
    return max(1, math.floor(density * size + 0.5))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_params_are_sparse_and_selected_like_float32(dtype):
    rng = np.random.default_rng(0)
    w32 = rng.normal(size=(12, 20)).astype(np.float32)
    params = {"w": jnp.asarray(w32, dtype), "b": jnp.zeros((20,), dtype)}
    widened = np.asarray(params["w"].astype(jnp.float32))  # exact; half precision has many ties
    assert len(np.unique(np.abs(widened))) < widened.size
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.75, backward_sparsity=0.5)
    state = tx.init(params)
    masks = tk.get_masks(state)
    assert masks.forward["b"] is None  # the bias stays dense
    np.testing.assert_array_equal(masks.forward["w"], reference_mask(widened, count(0.25, 240)))
    np.testing.assert_array_equal(masks.backward["w"], reference_mask(widened, count(0.5, 240)))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    assert updates["w"].dtype == dtype and updates["w"].shape == (12, 20)
    new = np.asarray(optax.apply_updates(params, updates)["w"].astype(jnp.float32))
    np.testing.assert_array_equal(
        tk.get_masks(state).forward["w"], reference_mask(new, count(0.25, 240))
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_default_sparsify_selects_every_floating_kernel(dtype):
    params = {"k": jnp.ones((3, 4), dtype), "i": jnp.ones((3, 4), jnp.int32), "e": jnp.ones((0, 4))}
    assert tk.sparsify.kernels()(params) == {"k": True, "i": False, "e": False}


@pytest.mark.parametrize("method", selection.METHODS)
def test_nan_weights_rank_as_magnitude_zero(method):
    x = jnp.array([3.0, np.nan, 1.0, 0.0, -2.0, -np.nan, np.inf, 0.5], jnp.float32)
    for k in range(1, 9):
        mask = selection.top_k_magnitude_mask(x, k, method=method)
        np.testing.assert_array_equal(mask, reference_mask(np.asarray(x), k), err_msg=f"k={k}")
    top4 = selection.top_k_magnitude_mask(x, 4, method=method)
    assert not top4[1] and not top4[5]  # NaN never beats a nonzero weight


def _params():
    return {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}


def _tx(**kwargs):
    kwargs = {"forward_sparsity": 0.5, **kwargs}
    return tk.topkast(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"forward_sparsity": "0.8"}, "forward_sparsity must be a number in \\[0, 1\\), got '0.8'"),
        ({"backward_sparsity": True}, "backward_sparsity must be a number"),
        ({"exploration_l2": math.nan}, "exploration_l2 must be finite, got nan"),
        ({"exploration_l2": math.inf}, "exploration_l2 must be finite, got inf"),
        ({"exploration_l2": -1e-4}, "exploration_l2 must be >= 0"),
        ({"exploration_l2": "1e-4"}, "exploration_l2 must be a real number"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _tx(**kwargs)


def test_inner_none_is_named():
    with pytest.raises(ValueError, match="inner must be an optax.GradientTransformation"):
        tk.topkast(None, forward_sparsity=0.5)


def test_gradients_of_another_shape_are_not_broadcast():
    params = _params()
    tx = _tx()
    state = tx.init(params)
    grads = {"w": jnp.ones((1, 3)), "b": jnp.ones((3,))}  # would broadcast against (4, 3)
    with pytest.raises(ValueError, match="grads leaf 'w' has shape \\(1, 3\\).*\\(4, 3\\)"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="grads must have the structure of params"):
        tx.update({"w": jnp.ones((4, 3))}, state, params)


def test_another_optimizers_state_is_named():
    params = _params()
    with pytest.raises(ValueError, match="state must be the TopKastState.*got ScaleByAdamState"):
        _tx().update(params, optax.scale_by_adam().init(params), params)


def test_params_of_another_shape_are_named():
    params = _params()
    tx = _tx()
    state = tx.init(params)
    other = {"w": jnp.ones((5, 3)), "b": jnp.ones((3,))}
    with pytest.raises(ValueError, match="params leaf 'w' has shape \\(5, 3\\).*\\(4, 3\\)"):
        tx.update(other, state, other)
    more = {**params, "c": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="params have 3 leaves.*initialised for 2"):
        tx.update(more, state, more)


def test_size_zero_leaf_is_dense_by_default_and_named_when_marked_sparse():
    params = {"empty": jnp.ones((0, 3)), "w": jnp.ones((4, 3))}
    state = _tx().init(params)
    assert tk.get_masks(state).forward["empty"] is None
    stats = tk.mask_stats(state, per_leaf=False)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(stats))
    with pytest.raises(ValueError, match="leaf 'empty' has no weights \\(shape \\(0, 3\\)\\)"):
        _tx(sparsify={"empty": True, "w": True}).init(params)


def test_checks_hold_under_jit():
    params = _params()
    tx = _tx()
    state = tx.init(params)
    grads = {"w": jnp.ones((1, 3)), "b": jnp.ones((3,))}
    with pytest.raises(ValueError, match="grads leaf 'w'"):
        jax.jit(tx.update)(grads, state, params)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    assert updates["w"].shape == (4, 3)
