"""The warm start of :mod:`topkast_jax.streaming` (issue 8): a refresh first looks for every
``k``-th largest magnitude key in a window of 65,024 keys around a guess extrapolated from the
last two refreshes (:mod:`topkast_jax.warm_start`), and only the rows it misses search the key's
digits.

The sets must equal a stable argsort of each slice whatever the guesses — exact, near, outside
the window above or below, swapped between ``A`` and ``B``, close enough for one shared window,
clipped at the ends of the key range — with ties straddling the boundaries and with slices of
several sizes walked in overlapping chunks.  The passes the selection runs are counted through a
host callback (not timed): a window that holds every key leaves no digit pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slice_sets import assert_global_sets, assert_slice_sets

import topkast_jax as tk
from topkast_jax import streaming, warm_start

INT32_MAX = np.iinfo(np.int32).max


@pytest.fixture
def short_rows(monkeypatch):
    """Chunks of 16 weights (rows of 4): slices of a few dozen weights take several chunks, the
    last overlapping the one before."""
    monkeypatch.setattr(streaming, "CHUNK", 16)
    monkeypatch.setattr(streaming, "ROW", 8)


@pytest.fixture
def passes(monkeypatch):
    """Per histogram pass the selection runs, in order: ``True`` for a window pass, ``False`` for
    a digit pass (a host callback inside the loop over the levels)."""
    runs: list[bool] = []
    group_histograms = streaming._group_histograms

    def counted(*args, **kwargs):
        histograms = group_histograms(*args, **kwargs)

        def run(at, prefixes, run_P, shared, ties=None, tie_level=None, window=None):
            on = jnp.zeros((), bool) if window is None else window.on
            jax.debug.callback(lambda flag: runs.append(bool(flag)), on, ordered=True)
            return histograms(at, prefixes, run_P, shared, ties, tie_level, window)

        return run

    monkeypatch.setattr(streaming, "_group_histograms", counted)
    return runs


def true_keys(x: np.ndarray, axis: int | None, k_a: int, k_b: int) -> np.ndarray:
    """Reference: the magnitude keys (the bits of ``|x|`` as int32) of the ``k_a``-th and
    ``k_b``-th largest ``|x|`` of every slice: ``[1, 2]``, or ``[L, 2]`` along ``axis`` 0."""
    slices = [x] if axis is None else list(x)
    out = []
    for xi in slices:
        keys = np.sort(np.abs(xi).astype(np.float32).ravel().view(np.int32))[::-1]
        out.append([keys[k_a - 1], keys[k_b - 1]])
    return np.array(out, np.int32)


def moved(keys: np.ndarray, offset) -> np.ndarray:
    """``keys + offset``, clipped to the int32 keys' range."""
    return np.clip(keys.astype(np.int64) + offset, 0, INT32_MAX).astype(np.int32)


SHAPES = [(6, 10), (11, 4), (25, 4), (3, 3, 4)]  # 60, 44, 100 weights and 3 slices of 12
AXES = [None, None, None, 0]
OFFSETS = st.one_of(
    st.just(0),
    st.integers(-streaming.WINDOW_HALF, streaming.WINDOW_HALF),  # inside the window
    st.sampled_from([streaming.WINDOW_HALF + 1, -streaming.WINDOW_HALF - 1]),  # just outside
    st.integers(-(2**31), 2**31),  # anywhere, clipped at the ends
)


@settings(  # the fixture only shrinks the chunks: the same for every example
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**16),
    rounded=st.booleans(),
    fractions=st.tuples(st.floats(0.02, 1.0), st.floats(0.0, 1.0)),
    offsets=st.lists(st.tuples(OFFSETS, OFFSETS), min_size=6, max_size=6),
    swap=st.booleans(),
)
def test_property_sets_do_not_depend_on_the_guesses(
    short_rows, seed, rounded, fractions, offsets, swap
):
    """Any guesses give the stable-argsort sets: near or far, per row and set."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    if rounded:  # ties straddle most boundaries: the index digits run after the window
        xs = [np.round(x * 2) for x in xs]
    sizes = [x.size if a is None else x[0].size for x, a in zip(xs, AXES, strict=True)]
    k_a = [max(1, round(fractions[0] * n)) for n in sizes]
    k_b = [ka + round(fractions[1] * (n - ka)) for ka, n in zip(k_a, sizes, strict=True)]
    keys = np.concatenate([true_keys(*a) for a in zip(xs, AXES, k_a, k_b, strict=True)])
    guess = np.stack([moved(row, offset) for row, offset in zip(keys, offsets, strict=True)])
    assert_slice_sets(xs, AXES, k_a, k_b, guess[:, ::-1] if swap else guess)


def test_global_top_k_with_a_guess(short_rows):
    rng = np.random.default_rng(3)
    xs = [np.round(rng.normal(size=s) * 2).astype(np.float32) for s in [(6, 10), (10, 6), (7, 3)]]
    flat = np.concatenate([x.ravel() for x in xs])
    keys = true_keys(flat, None, 50, 101)[0]
    for offset in (0, 1000, -(10**6)):
        assert_global_sets(xs, 50, 101, moved(keys, offset))


def _untied(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_a_window_holding_every_key_leaves_no_digit_pass(short_rows, passes):
    xs = [_untied((6, 10)), _untied((25, 4), 1)]
    k_a, k_b = [12, 30], [30, 70]
    keys = np.concatenate([true_keys(x, None, a, b) for x, a, b in zip(xs, k_a, k_b, strict=True)])
    assert_slice_sets(xs, [None, None], k_a, k_b, moved(keys, 500))
    assert passes == [True]


def test_a_guess_outside_the_window_falls_back_to_the_digits(short_rows, passes):
    xs = [_untied((6, 10)), _untied((25, 4), 1)]
    k_a, k_b = [12, 30], [30, 70]
    near = true_keys(xs[0], None, 12, 30)
    far = moved(true_keys(xs[1], None, 30, 70), np.array([0, streaming.WINDOW_HALF + 2]))
    assert_slice_sets(xs, [None, None], k_a, k_b, np.concatenate([near, far]))
    assert passes == [True, False, False]  # the window, then the key's two 16-bit digits


def test_no_guesses_no_window_pass(short_rows, passes):
    assert_slice_sets([_untied((6, 10))], [None], [12], [30])
    assert passes == [False, False]


def test_close_keys_share_one_window(short_rows, passes):
    """Magnitudes 7 units of the last place apart, ``k_b − k_a`` of 0, 1 and 20: the two guesses
    lie within a window of each other, so ``A`` and ``B`` share one window (each weight counted
    once), and it holds both keys."""
    keys = np.float32(1.0).view(np.int32) + np.random.default_rng(4).permutation(60) * 7
    x = (keys.astype(np.int32).view(np.float32) * np.where(np.arange(60) % 2, 1, -1)).reshape(6, 10)
    for k_a, k_b in [(20, 20), (20, 21), (20, 40)]:
        passes.clear()
        keys = true_keys(x, None, k_a, k_b)
        base = streaming._window_bases(jnp.asarray(keys), np.dtype(np.int32))
        assert int(base[0, 0]) == int(base[0, 1])
        assert_slice_sets([x], [None], [k_a], [k_b], moved(keys, 100))
        assert passes == [True]


def test_window_bases_apart_or_shared():
    half, width = streaming.WINDOW_HALF, streaming._WINDOW
    guesses = jnp.array([[10 * width, width], [width + 5, width], [3, 1]], jnp.int32)
    base = np.asarray(streaming._window_bases(guesses, np.dtype(np.int32)))
    assert base.dtype == np.uint32
    np.testing.assert_array_equal(base[0], [10 * width - half, width - half])  # apart
    assert base[1, 0] == base[1, 1] == width + 2 - half  # one window, centred between
    np.testing.assert_array_equal(base[2], [0, 0])  # clipped at 0


@settings(max_examples=200, deadline=None)
@given(
    latest=st.integers(0, INT32_MAX),
    previous=st.integers(0, INT32_MAX),
)
def test_property_guess_extrapolates_within_the_key_range(latest, previous):
    history = jnp.array([[latest, latest], [previous, previous]], jnp.int32)
    got = np.asarray(warm_start.guess(history))
    want = min(max(2 * latest - previous, 0), INT32_MAX)
    np.testing.assert_array_equal(got, [want, want])


def test_history_start_and_push():
    key = jnp.array([[7, 3]], jnp.int32)
    history = warm_start.start(key)
    np.testing.assert_array_equal(history, [[[7, 3]], [[7, 3]]])
    np.testing.assert_array_equal(warm_start.guess(history), [[7, 3]])
    history = warm_start.push(history, jnp.array([[9, 4]], jnp.int32))
    np.testing.assert_array_equal(history, [[[9, 4]], [[7, 3]]])
    np.testing.assert_array_equal(warm_start.guess(history), [[11, 5]])


def test_a_guess_of_another_shape_names_the_argument():
    with pytest.raises(ValueError, match=r"guess must have shape \(4, 2\)"):
        streaming.leaf_thresholds(
            [jnp.ones((6, 10)), jnp.ones((3, 4, 5))], [5, 5], [9, 9], [None, 0], jnp.zeros((2, 2))
        )


def _model_params():
    rng = np.random.default_rng(5)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)},
        "stack": {"kernel": jnp.asarray(rng.normal(size=(3, 8, 6)), jnp.float32)},
        "bias": jnp.zeros(12),
    }


def test_state_keeps_the_last_two_refreshes_keys():
    params = _model_params()
    tx = tk.topkast(
        optax.adam(0.1),
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        layer_axis=lambda p: {"dense": {"kernel": None}, "stack": {"kernel": 0}, "bias": None},
    )
    state = tx.init(params)
    first = np.concatenate(
        [
            true_keys(np.asarray(params["dense"]["kernel"]), None, 38, 96),
            true_keys(np.asarray(params["stack"]["kernel"]), 0, 10, 24),
        ]
    )
    np.testing.assert_array_equal(state.key_history, [first, first])
    kept = []
    for step in range(3):
        grads = jax.tree.map(lambda p, s=step: jnp.sin(p * (s + 1)), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        dense = true_keys(np.asarray(params["dense"]["kernel"]), None, 38, 96)
        stack = true_keys(np.asarray(params["stack"]["kernel"]), 0, 10, 24)
        keys = np.concatenate([dense, stack])  # leaves in tree order: dense, then stack
        assert state.key_history.shape == (2, 4, 2)
        np.testing.assert_array_equal(state.key_history[0], keys)
        np.testing.assert_array_equal(state.key_history[1], kept[-1] if kept else first)
        kept.append(keys)
    assert len({k.tobytes() for k in kept}) == 3  # the keys moved: the history is not constant


@pytest.mark.parametrize(
    "options",
    [
        {"structure": tk.NM(2, 4)},
        {"backward_selection": "random"},
        {"selection_method": "sort"},
    ],
)
def test_no_key_history_where_no_magnitude_thresholds(options):
    params = {"w": jnp.arange(1.0, 25.0).reshape(4, 6)}
    sparsity = {} if "structure" in options else {"forward_sparsity": 0.5}
    tx = tk.topkast(optax.sgd(0.1), backward_sparsity=None, **sparsity, **options)
    state = tx.init(params)
    assert state.key_history is None
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert state.key_history is None


@pytest.mark.parametrize("offset", [0, 3000, -(10**6)])
def test_strided_walk_with_guesses(monkeypatch, offset):
    """The walk of a leaf whose first axis may be sharded over 8 devices (strided chunks of 4
    weights, no chunk order): the window pass and its fallback give the same sets."""
    monkeypatch.setattr(streaming, "_devices", lambda: 8)
    monkeypatch.setattr(streaming, "CHUNK", 4)
    rng = np.random.default_rng(6)
    xs = [np.round(rng.normal(size=s) * 2).astype(np.float32) for s in [(16, 6), (24, 5)]]
    k_a, k_b = [19, 30], [48, 90]
    keys = np.concatenate([true_keys(x, None, a, b) for x, a, b in zip(xs, k_a, k_b, strict=True)])
    assert_slice_sets(xs, [None, None], k_a, k_b, moved(keys, offset))


def test_float64_keys_take_no_window(short_rows, passes):
    """float64 leaves have int64 keys, where a window of 65,024 keys would span 1e-11 of a
    magnitude: the guess is ignored, the key's four 16-bit digits run, the sets stay exact."""
    with jax.enable_x64(True):
        x = np.random.default_rng(8).normal(size=(6, 10))
        guess = np.zeros((1, 2), np.int64)
        assert_slice_sets([x], [None], [12], [30], guess)
    assert passes == [False] * 4
