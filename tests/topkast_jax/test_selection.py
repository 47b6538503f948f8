"""Exactness of every selection method against numpy's stable argsort (issue 2, semantics 1)."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st

from topkast_jax import selection, streaming

# "auto" resolves to one of the others; it gets its own cheap test below.
METHODS = tuple(m for m in selection.METHODS if m != "auto")
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)

# One compiled function per (shape, k, method), cached across tests.
_magnitude_mask = jax.jit(selection.top_k_magnitude_mask, static_argnames=("k", "method"))
_keys_mask = jax.jit(selection.top_k_keys_mask, static_argnames=("k", "method"))


def _mask(x, k, method):
    return np.asarray(_magnitude_mask(jnp.asarray(x), k=k, method=method))


def _assert_exact(x, k, method):
    got = _mask(x, k, method)
    want = reference.top_k_mask(np.asarray(x, np.float32), k)
    assert got.shape == np.shape(x)
    assert got.dtype == bool
    assert int(got.sum()) == k
    np.testing.assert_array_equal(got, want, err_msg=f"method={method} k={k} x={x!r}")


TIE_CASES = {
    "all_zeros": np.zeros((4, 5), np.float32),
    "signed_zeros": np.array([0.0, -0.0, 0.0, -0.0, 1.0, -0.0], np.float32),
    "all_equal": np.full((3, 7), 0.25, np.float32),
    "opposite_signs": np.array([[1.0, -1.0, 2.0], [-2.0, 1.0, -1.0], [2.0, 0.0, -2.0]], np.float32),
    "few_values": np.tile(np.array([0.5, -0.5, 0.0, 3.0, -3.0], np.float32), 9).reshape(5, 9),
    "tiny_and_inf": np.array([np.inf, -np.inf, 1e-45, -1e-45, 1e38, 0.0], np.float32),
}


@pytest.mark.parametrize("method", METHODS)
def test_tie_heavy_inputs_match_stable_argsort_for_every_k(method):
    # Every (case, k) pair selected in one compiled program (one vector per pair).
    pairs = [(name, k) for name in sorted(TIE_CASES) for k in range(TIE_CASES[name].size + 1)]
    ks = [k for _, k in pairs]

    @jax.jit
    def masks(xs):
        keys = [selection.magnitude_keys(x) for x in xs]
        return selection.top_k_masks(keys, ks, method=method)

    got = masks([jnp.asarray(TIE_CASES[name]) for name, _ in pairs])
    for (name, k), mask in zip(pairs, got, strict=True):
        want = reference.top_k_mask(TIE_CASES[name], k).ravel()
        np.testing.assert_array_equal(np.asarray(mask), want, f"{method} {name} k={k}")


@pytest.mark.parametrize("method", METHODS)
def test_ties_straddling_the_threshold_take_lowest_indices(method):
    x = np.array([1.0, 5.0, -1.0, 1.0, 5.0, -1.0, 1.0], np.float32)
    got = _mask(x, 4, method)
    # Two 5s, then the two lowest-index among the five entries of magnitude 1 (indices 0, 2).
    np.testing.assert_array_equal(got, [True, True, True, False, True, False, False])


_values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, 1e-30, -3.25])


@st.composite
def _array_and_k(draw, tie_heavy: bool):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6))
    if tie_heavy:
        elements = _values
    else:
        elements = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
    k = draw(st.integers(0, x.size))
    return x, k


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(data=_array_and_k(tie_heavy=True))
def test_property_tie_heavy_random_shapes(method, data):
    x, k = data
    _assert_exact(x, k, method)


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(data=_array_and_k(tie_heavy=False))
def test_property_random_floats_random_shapes(method, data):
    x, k = data
    _assert_exact(x, k, method)


@pytest.mark.parametrize("method", METHODS)
def test_larger_tensor_with_ties_across_16_bit_digits(method):
    # Values sharing the high 16 bits of their float pattern but differing in the low bits, plus
    # exact duplicates: exercises both radix digits and the tie pass.
    rng = np.random.default_rng(0)
    base = np.float32(1.5)
    bits = base.view(np.int32) + rng.integers(0, 50, size=3000).astype(np.int32)
    x = bits.view(np.float32) * rng.choice(np.array([-1, 1], np.float32), size=3000)
    x = x.reshape(30, 100)
    for k in (7, 1234, 2999):
        _assert_exact(x, k, method)


@pytest.mark.parametrize("method", METHODS)
def test_exact_under_jit(method):
    x = np.random.default_rng(1).normal(size=(17, 13)).astype(np.float32)
    x[3] = x[5]  # duplicated magnitudes
    x[4] = -x[5]
    f = jax.jit(lambda v: selection.top_k_magnitude_mask(v, 40, method=method))
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x))), reference.top_k_mask(x, 40))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(method, dtype):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(11, 9)), dtype)
    x32 = np.asarray(x.astype(jnp.float32))  # exact widening
    got = np.asarray(selection.top_k_magnitude_mask(x, 30, method=method))
    np.testing.assert_array_equal(got, reference.top_k_mask(x32, 30))


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(
    keys=hnp.arrays(np.int32, st.integers(1, 40), elements=st.integers(0, 6)),
    data=st.data(),
)
def test_property_keys_with_validity_mask(method, keys, data):
    valid = data.draw(hnp.arrays(bool, keys.shape))
    k = data.draw(st.integers(0, int(valid.sum())))
    got = np.asarray(_keys_mask(jnp.asarray(keys), k=k, valid_N=jnp.asarray(valid), method=method))
    np.testing.assert_array_equal(got, _reference_keys_mask(keys, k, valid))


def _reference_keys_mask(keys, k, valid):
    candidates = np.flatnonzero(valid)
    chosen = candidates[np.argsort(-keys[candidates], kind="stable")[:k]]
    want = np.zeros(keys.shape, bool)
    want[chosen] = True
    return want


@st.composite
def _batch(draw):
    """Several tie-heavy key vectors, several of one length (selected as rows of one matrix)."""
    lengths = draw(st.lists(st.sampled_from([3, 7, 7, 12]), min_size=1, max_size=5))
    keys, ks, valids = [], [], []
    for n in lengths:
        keys.append(draw(hnp.arrays(np.int32, n, elements=st.integers(0, 4))))
        valid = draw(st.one_of(st.none(), hnp.arrays(bool, n)))
        valids.append(valid)
        ks.append(draw(st.integers(0, n if valid is None else int(valid.sum()))))
    return keys, ks, valids


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(batch=_batch())
def test_property_batched_selection_of_many_vectors(method, batch):
    keys, ks, valids = batch
    got = jax.jit(lambda keys, valids: selection.top_k_masks(keys, ks, valids, method=method))(
        [jnp.asarray(k) for k in keys], [None if v is None else jnp.asarray(v) for v in valids]
    )
    for i, (key, k, valid) in enumerate(zip(keys, ks, valids, strict=True)):
        valid = np.ones(key.shape, bool) if valid is None else valid
        np.testing.assert_array_equal(
            np.asarray(got[i]), _reference_keys_mask(key, k, valid), f"vector {i}"
        )


def test_auto_resolves_to_an_exact_method():
    assert selection.resolve_method("auto") in METHODS
    x = TIE_CASES["few_values"]
    for k in (1, 20, 44):
        _assert_exact(x, k, "auto")


def test_magnitude_keys_rejects_integer_input():
    with pytest.raises(ValueError, match="floating"):
        selection.magnitude_keys(jnp.arange(4))


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        selection.top_k_magnitude_mask(jnp.ones(3), 1, method="quickselect")


def reference_bucket(hist: np.ndarray, k: int) -> tuple[int, int, int] | None:
    """The largest ``b`` with ``#(digit >= b) >= k``, ``#(digit > b)`` and ``#(digit == b)``;
    ``None`` when ``k`` exceeds every count."""
    at_least = np.cumsum(hist[::-1])[::-1]
    ok = np.nonzero(at_least >= k)[0]
    if not ok.size:
        return None
    b = int(ok[-1])
    return b, int(hist[b + 1 :].sum()), int(hist[b])


@pytest.mark.parametrize("gathers", [True, False])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_property_select_bucket_gather_and_masked_sum(gathers, data):
    """``select_bucket`` picks the same bucket, counts above and ties whether the chosen row of
    256 buckets is gathered (one device) or taken by a masked sum (a mesh): sparse histograms
    of 65,536 buckets, ``k`` from 1 to past the total (then no bucket: a negative one, every
    count above, no ties)."""
    rows = data.draw(st.integers(1, 3))
    hist = np.zeros((rows, 1 << 16), np.int32)
    for r in range(rows):
        for _ in range(data.draw(st.integers(1, 6))):
            hist[r, data.draw(st.integers(0, (1 << 16) - 1))] += data.draw(st.integers(1, 5))
    ks = [data.draw(st.integers(1, int(h.sum()) + 2)) for h in hist]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "_gathers", lambda: gathers)
        got = selection.select_bucket(jnp.asarray(hist), jnp.asarray(ks, jnp.int32))
    for r in range(rows):
        bucket, above, tied = (int(g[r]) for g in got)
        want = reference_bucket(hist[r], ks[r])
        if want is None:
            assert bucket < 0 and above == int(hist[r].sum()) and tied == 0, (r, ks[r])
        else:
            assert (bucket, above, tied) == want, (r, ks[r])


@pytest.mark.parametrize("gathers", [True, False])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_property_select_sets_reads_the_halves_in_place(gathers, data):
    """``streaming._select_sets`` equals ``select_bucket`` of each set's histogram written out:
    the half it owns, and where ``A``'s total is added (the window pass, windows apart), the
    ``(k − total_A)``-th of its own half with ``total_A`` more above; a ``k`` within
    ``total_A`` selects the top bucket (outside any window)."""
    rows = data.draw(st.integers(1, 3))
    hist = np.zeros((rows, 2, 1 << 16), np.int32)
    for r in range(rows):
        for half in (0, 1):
            for _ in range(data.draw(st.integers(0, 5))):
                bucket = data.draw(st.integers(0, (1 << 16) - 1))
                hist[r, half, bucket] += data.draw(st.integers(1, 5))
    own = np.array([[0, data.draw(st.integers(0, 1))] for _ in range(rows)], np.int32)
    add_a = np.array([[False, bool(o) and data.draw(st.booleans())] for _, o in own])
    total_a = hist[:, 0].sum(axis=1)
    mine = hist[np.arange(rows)[:, None], own]  # [rows, 2, 65536]
    extra = np.where(add_a, total_a[:, None], 0)
    ks = np.array(
        [
            [data.draw(st.integers(1, int(mine[r, s].sum() + extra[r, s]) + 2)) for s in (0, 1)]
            for r in range(rows)
        ],
        np.int32,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "_gathers", lambda: gathers)
        got = streaming._select_sets(*map(jnp.asarray, (hist, own, add_a, ks)))
    for r in range(rows):
        for s in (0, 1):
            bucket, above, tied = (int(g[r, s]) for g in got)
            k_own = int(ks[r, s] - extra[r, s])
            if k_own <= 0:
                assert bucket == (1 << 16) - 1, (r, s)
                continue
            want = reference_bucket(mine[r, s], k_own)
            if want is None:
                assert bucket < 0 and above == mine[r, s].sum() + extra[r, s] and tied == 0
            else:
                assert (bucket, above - extra[r, s], tied) == want, (r, s, ks[r, s])
