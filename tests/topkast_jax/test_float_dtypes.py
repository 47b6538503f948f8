"""Exact selection for every float type: float16, bfloat16, float32 and float64 (issue 13).

Every method ranks by ``|θ|`` in the leaf's own precision: float16/bfloat16 widen to float32
exactly, float64 (``jax_enable_x64``, turned on only inside these tests) keeps its 64 bits, so
values that differ below float32 precision, under float32's smallest subnormal (1.4e-45) or over
its largest finite value (3.4e38) keep their order.  The reference is ``tests/reference.py``'s
stable argsort of the float64 magnitudes (NaN as magnitude 0).  Each float64 test first checks
that its values would be ranked differently after rounding to float32, so it cannot pass by
accident.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import reference

import topkast_jax as tk
from topkast_jax import always_sparse_host, baselines, selection
from topkast_jax.baselines.select import top_k_magnitude_traced

DTYPES = ["float16", "bfloat16", "float32", "float64"]
SHAPE = (6, 20)


def precision(dtype):
    """The context a dtype needs: 64-bit types on for float64, nothing otherwise."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def np_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def special_values(dtype):
    """Values whose order float32 keys would get wrong (float64), or ties, signed zeros, NaN and
    infinities (every dtype), shuffled with normal values into ``SHAPE``."""
    rng = np.random.default_rng(7)
    if dtype == "float64":
        special = [
            1.0, -(1.0 + 2.0**-40), 1.0 + 2.0**-45,  # one float32 value
            1e-300, -3e-310, 5e-324, 2e-46,  # float32: all 0
            1e300, -2e300, 4e38,  # float32: all inf
            np.nan, 0.0, -0.0,
        ]  # fmt: skip
    else:
        special = [1.0, -1.0, 1.0, np.inf, -np.inf, np.nan, 0.0, -0.0, 2.5, -2.5]
    n = math.prod(SHAPE)
    values = np.concatenate([special, rng.normal(size=n - len(special))])
    values[rng.permutation(n)[: n // 4]] = values[0]  # exact ties
    values = values[rng.permutation(n)].astype(np_dtype(dtype))
    return values.reshape(SHAPE)


def float32_rounded_masks_differ(values, ks):
    """Whether rounding ``values`` to float32 changes the top-k mask for some ``k``."""
    with np.errstate(over="ignore"):
        rounded = values.astype(np.float32)
    return any(
        not np.array_equal(reference.top_k_mask(values, k), reference.top_k_mask(rounded, k))
        for k in ks
    )


KS = (1, 40, 117)  # the huge values, the group of 1.0s, the magnitude-0 and tiny values


@pytest.mark.parametrize("method", ["histogram", "bisect", "top_k", "sort"])  # "auto": one of them
@pytest.mark.parametrize("dtype", DTYPES)
def test_selection_equals_reference(dtype, method):
    values = special_values(dtype)
    if dtype == "float64":
        assert float32_rounded_masks_differ(values, KS)
    with precision(dtype):
        x = jnp.asarray(values)
        assert x.dtype == np_dtype(dtype)
        keys = selection.magnitude_keys(x)
        assert keys.dtype == (jnp.int64 if dtype == "float64" else jnp.int32)
        select = jax.jit(
            selection.top_k_magnitude_mask, static_argnums=(1,), static_argnames="method"
        )
        for k in KS:
            got = np.asarray(select(x, k, method=method))
            np.testing.assert_array_equal(got, reference.top_k_mask(values, k), err_msg=f"k={k}")


@pytest.mark.parametrize("method", ["auto", "sort"])  # streaming radix select; stable argsort
@pytest.mark.parametrize("dtype", DTYPES)
def test_topkast_masks_equal_reference(dtype, method):
    """At init and after one jitted update: the update selects from ``θ + u`` as stored in the
    leaf's dtype (XLA may compute a bfloat16 ``θ + u`` in float32 inside the step)."""
    values = special_values(dtype)
    other = np.roll(values, 3, axis=1).T.copy()  # a second leaf, another shape
    fs, bs = 0.7, 0.4
    if dtype == "float64":
        assert float32_rounded_masks_differ(values, [round((1 - fs) * values.size)])
    finite = np.where(np.isfinite(values.astype(np.float64)), values, 0).astype(values.dtype)
    with precision(dtype):
        params = {"v": jnp.asarray(other), "w": jnp.asarray(values)}
        tx = tk.topkast(
            optax.sgd(0.1), forward_sparsity=fs, backward_sparsity=bs, selection_method=method
        )
        state = jax.jit(tx.init)(params)
        want = {"v": other, "w": values}
        assert_masks_equal(tk.get_masks(state), want, fs, bs)
        params = {"v": jnp.asarray(finite.T.copy()), "w": jnp.asarray(finite)}
        grads = {
            "v": jnp.asarray(np.roll(finite, 7).T.copy()),
            "w": jnp.asarray(np.roll(finite, 5)),
        }
        state = jax.jit(tx.init)(params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        new = optax.apply_updates(params, updates)
        assert new["w"].dtype == np_dtype(dtype)
        assert_masks_equal(tk.get_masks(state), jax.device_get(new), fs, bs)


def assert_masks_equal(masks, leaves, fs, bs):
    for name, leaf in leaves.items():
        a, b = reference.magnitude_masks(np.asarray(leaf), 1 - fs, 1 - bs)
        np.testing.assert_array_equal(masks.forward[name], a, err_msg=name)
        np.testing.assert_array_equal(masks.backward[name], b, err_msg=name)


@pytest.mark.parametrize("method", ["auto", "sort"])
def test_global_topk_over_float32_and_float64_leaves(method):
    """One threshold over a float32 and a float64 leaf: both ranked by float64 magnitudes.  The
    float64 leaf holds 1 + 2^-40 and 1 + 2^-45 among many exact 1.0 (some in the float32 leaf
    too); ``k_A`` ends just inside that group, where float32 keys would see one tie."""
    wide = special_values("float64")
    narrow = (np.random.default_rng(5).normal(size=SHAPE) * 0.5).astype(np.float32)
    narrow.ravel()[::7] = 1.0  # cross-leaf ties
    above = int(np.sum(reference.magnitudes(np.concatenate([narrow.ravel(), wide.ravel()])) > 1))
    fs, bs = 1 - (above + 2) / (2 * wide.size), 0.5
    want = reference.global_masks([narrow, wide], 1 - fs, 1 - bs)
    with np.errstate(over="ignore"):
        rounded = reference.global_masks([narrow, wide.astype(np.float32)], 1 - fs, 1 - bs)
    assert any(not np.array_equal(w[0], r[0]) for w, r in zip(want, rounded, strict=True))
    with jax.enable_x64(True):
        params = {"a": jnp.asarray(narrow), "b": jnp.asarray(wide)}
        tx = tk.topkast(
            optax.sgd(0.1), forward_sparsity=fs, backward_sparsity=bs, global_topk=True,
            selection_method=method,
        )  # fmt: skip
        masks = tk.get_masks(jax.jit(tx.init)(params))
        for name, (a, b) in zip(("a", "b"), want, strict=True):
            np.testing.assert_array_equal(masks.forward[name], a, err_msg=name)
            np.testing.assert_array_equal(masks.backward[name], b, err_msg=name)
        host = always_sparse_host.select_masks(
            [narrow, wide],
            [leaf for leaf in tx_plan(params, fs, bs) if leaf.sparse],
            global_topk=True,
            backward_selection="magnitude",
            rng=None,
        )
    for (a, b), (got_a, got_b) in zip(want, host, strict=True):
        np.testing.assert_array_equal(got_a, a.ravel())
        np.testing.assert_array_equal(got_b, b.ravel())


def tx_plan(params, fs, bs):
    return tk.layer_densities(
        params, sparsify=tk.sparsify.default(), forward_sparsity=fs, backward_sparsity=bs
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_always_sparse_host_selection_equals_reference(dtype):
    values = special_values(dtype)
    fs, bs = 0.7, 0.4
    with precision(dtype):
        plan = [leaf for leaf in tx_plan({"w": jnp.asarray(values)}, fs, bs) if leaf.sparse]
    ((a, b),) = always_sparse_host.select_masks(
        [values], plan, global_topk=False, backward_selection="magnitude", rng=None
    )
    want_a, want_b = reference.magnitude_masks(values, 1 - fs, 1 - bs)
    np.testing.assert_array_equal(a, want_a.ravel())
    np.testing.assert_array_equal(b, want_b.ravel())


@pytest.mark.parametrize("dtype", DTYPES)
def test_baselines_rank_in_the_leaf_precision(dtype):
    """The traced top-k of SET/RigL's drop and of pruning, and RigL's drop-and-grow step (weights
    and gradients of the leaf's dtype) equal numpy's stable argsort (pruning's initial mask is
    :func:`topkast_jax.selection.top_k_magnitude_mask`, tested above)."""
    values = special_values(dtype)
    grads = np.roll(values, 5)  # gradients with the same special values elsewhere
    rng = np.random.default_rng(3)
    valid = rng.random(values.size) < 0.6
    with precision(dtype):
        x = jnp.asarray(values)
        for k in (1, 5, int(valid.sum()) // 2):
            got = jax.jit(top_k_magnitude_traced)(x.ravel(), jnp.int32(k), jnp.asarray(valid))
            want = np.zeros(values.size, bool)
            order = np.argsort(-np.where(valid, reference.magnitudes(values), -1.0), kind="stable")
            want[order[:k]] = True
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"k={k}")
        k = values.size // 4
        rigl = baselines.rigl(optax.sgd(0.1), sparsity=0.75, end_step=10, drop_fraction=0.5)
        state = jax.jit(rigl.init)({"w": x})
        mask = np.asarray(tk.get_masks(state).forward["w"])
        _, state = jax.jit(rigl.update)({"w": jnp.asarray(grads)}, state, {"w": x})
    drop = int(0.5 * k)  # step 0 replaces the gradient step; f_0 = α
    scores = np.where(mask, reference.magnitudes(values).reshape(SHAPE), -1.0)
    kept = np.zeros(values.size, bool)
    kept[np.argsort(-scores.ravel(), kind="stable")[: k - drop]] = True
    grow = np.where(kept, -1.0, reference.magnitudes(grads))
    grown = np.zeros(values.size, bool)
    grown[np.argsort(-grow, kind="stable")[:drop]] = True
    np.testing.assert_array_equal(
        np.asarray(tk.get_masks(state).forward["w"]).ravel(), kept | grown
    )
