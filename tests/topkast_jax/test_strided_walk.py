"""The walk of a leaf whose first axis may be sharded (issue 14, "Sharding at scale"): strided
chunks (rows ``j, j + c, j + 2c, …``) that never cut across a device, and the order-free tie pass
they need, give exactly numpy's stable-argsort selection.  Run on one device by making the walk
believe it may be spread over 8 (as on an auto-axis mesh); ``test_fsdp_layout.py`` checks the
same on 8 devices."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topkast_jax import codes, streaming

_SETTINGS = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def eight_devices(monkeypatch):
    """Strided walks (the first axis may be sharded over 8 devices), chunks of 4 weights each."""
    monkeypatch.setattr(streaming, "_devices", lambda: 8)
    monkeypatch.setattr(streaming, "CHUNK", 4)


def _array(shapes):
    """float32 integers in [-3, 3]: many ties, so the tie pass runs."""
    values = st.integers(-3, 3).map(np.float32)
    return hnp.arrays(np.float32, shapes, elements=values)


def _masks(code) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(codes.forward_of(code)), np.asarray(codes.backward_of(code))


@pytest.mark.parametrize("shape", [(64, 48), (24, 5, 3), (12,), (7, 6)])
def test_walk_is_strided_along_a_possibly_sharded_axis(eight_devices, shape):
    walk = streaming._walk(jnp.zeros((1, *shape)))
    step = math.gcd(shape[0], 8)
    assert walk.rows * walk.chunks == shape[0] and walk.rows % step == 0, walk
    assert walk.strided == (walk.chunks > 1)
    # about CHUNK weights per device: the smallest admissible rows that fit, else `step` rows
    row_size = math.prod(shape[1:])
    fitting = [q for q in range(step, shape[0] + 1, step) if shape[0] % q == 0]
    assert walk.rows == max([q for q in fitting if q * row_size <= 32], default=min(fitting))


def test_walk_on_one_device_is_runs_of_rows():
    walk = streaming._walk(jnp.zeros((1, 10, 3)))
    assert not walk.strided and walk.rows * 3 <= streaming.CHUNK


@_SETTINGS
@given(x=_array(hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=16)), data=st.data())
def test_strided_walk_selects_like_stable_argsort(eight_devices, x, data):
    n = x.size
    k_a = data.draw(st.integers(1, n))
    k_b = data.draw(st.integers(k_a, n))
    (th,) = jax.jit(lambda x: streaming.leaf_thresholds([x], [k_a], [k_b]))(jnp.asarray(x))
    fwd, bwd = _masks(streaming.codes_from_thresholds(jnp.asarray(x), th))
    np.testing.assert_array_equal(fwd, reference.top_k_mask(x, k_a))
    np.testing.assert_array_equal(bwd, reference.top_k_mask(x, k_b))


@_SETTINGS
@given(stack=_array((4, 8, 6)), w=_array((16, 3)), data=st.data())
def test_strided_walk_global_top_k(eight_devices, stack, w, data):
    """Ties across leaves and slices go to leaf order, then slice order, then index."""
    leaves, axes = [stack, w], [data.draw(st.integers(0, 2)), None]
    total = stack.size + w.size
    k_a = data.draw(st.integers(1, total))
    k_b = data.draw(st.integers(k_a, total))

    @jax.jit
    def codes_of(xs):
        ths = streaming.global_thresholds(xs, k_a, k_b, axes)
        return [
            streaming.codes_from_thresholds(x, t, a) for x, t, a in zip(xs, ths, axes, strict=True)
        ]

    got = [_masks(c) for c in codes_of([jnp.asarray(x) for x in leaves])]
    want = reference.global_slice_masks(leaves, axes, k_a / total, k_b / total)
    for (fwd, bwd), (a, b) in zip(got, want, strict=True):
        np.testing.assert_array_equal(fwd, a)
        np.testing.assert_array_equal(bwd, b)
