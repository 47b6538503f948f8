"""``AlwaysSparse(host_memory="pinned_host")``: the host ``θ`` as ``jax`` arrays in the
``pinned_host`` memory kind gives the run of the numpy host ``θ``, bit for bit.

The CPU backend exposes ``pinned_host`` (``jax.devices()[0].addressable_memories()``); on a
backend without it the option raises a ``ValueError`` naming ``host_memory``, and these tests skip.
"""

import jax
import numpy as np
import optax
import pytest
from always_sparse_harness import batch_at, mlp_loss, mlp_params, orbax_roundtrip

import topkast_jax as tk

KW = dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=1e-2, refresh_every=3)
HAS_PINNED = "pinned_host" in [m.kind for m in jax.devices()[0].addressable_memories()]
needs_pinned = pytest.mark.skipif(not HAS_PINNED, reason="no pinned_host memory kind")


def _host_thetas(state):
    return [h for h in jax.tree.leaves(state.host_params) if h is not None]


@needs_pinned
def test_pinned_host_run_equals_the_numpy_run():
    params = mlp_params()
    inner = optax.adam(5e-2)
    pinned = tk.AlwaysSparse(inner, host_memory="pinned_host", track_reservoir=True, **KW)
    plain = tk.AlwaysSparse(inner, track_reservoir=True, **KW)
    a, b = pinned.init(params), plain.init(params)
    step_a, step_b = pinned.make_step(mlp_loss), plain.make_step(mlp_loss)
    for t in range(8):  # refreshes after steps 3 and 6
        a, loss_a = step_a(a, batch_at(t))
        b, loss_b = step_b(b, batch_at(t))
        assert float(loss_a) == float(loss_b), f"step {t}"
        for theta in _host_thetas(a):
            assert isinstance(theta, jax.Array) and theta.sharding.memory_kind == "pinned_host"
        assert all(isinstance(theta, np.ndarray) for theta in _host_thetas(b))
    for x, y in zip(_host_thetas(a), _host_thetas(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    for x, y in zip(
        jax.tree.leaves(pinned.dense_params(a)), jax.tree.leaves(plain.dense_params(b)), strict=True
    ):
        assert isinstance(x, np.ndarray)
        np.testing.assert_array_equal(x, y)
    masks_a, masks_b = pinned.masks(a), plain.masks(b)
    for x, y in zip(jax.tree.leaves(masks_a), jax.tree.leaves(masks_b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert pinned.mask_stats(a) == plain.mask_stats(b)
    assert pinned.device_bytes(a) == plain.device_bytes(b)  # host θ is not device state
    abstract = pinned.abstract_state(params).host_params["l0"]["kernel"]
    assert abstract.sharding.memory_kind == "pinned_host"


@needs_pinned
def test_pinned_host_state_survives_orbax(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    sparse = tk.AlwaysSparse(optax.adam(5e-2), host_memory="pinned_host", **KW)
    state = sparse.init(mlp_params())
    step = sparse.make_step(mlp_loss, donate=False)
    for t in range(4):
        state, _ = step(state, batch_at(t))
    restored = orbax_roundtrip(state, tmp_path / "ckpt")
    for x, y in zip(_host_thetas(restored), _host_thetas(state), strict=True):
        assert x.sharding.memory_kind == "pinned_host"
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    a, loss_a = step(state, batch_at(4))
    b, loss_b = step(restored, batch_at(4))
    assert float(loss_a) == float(loss_b)
    dense_a, dense_b = sparse.dense_params(a), sparse.dense_params(b)
    for x, y in zip(jax.tree.leaves(dense_a), jax.tree.leaves(dense_b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_host_memory_is_checked():
    with pytest.raises(ValueError, match="host_memory"):
        tk.AlwaysSparse(optax.sgd(0.1), forward_sparsity=0.5, host_memory="device")
