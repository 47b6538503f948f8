"""The tie walk of :mod:`topkast_jax.streaming` (one device, slices of at least
``TIE_WALK_MIN`` weights): where ties straddle a boundary, one pass counts the tied weights chunk
by chunk in index order and a bisection inside the chunk that holds the ``need``-th finds the
cut — instead of the two histogram passes of the index digits.

``TIE_WALK_MIN``, ``CHUNK`` and ``ROW`` are shrunk so that slices of a few dozen weights take the
walk over several chunks; values are rounded to a few integers so that ties straddle most
boundaries.  The sets must equal a stable argsort of each slice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from slice_sets import assert_slice_sets as check

from topkast_jax import streaming


@pytest.fixture
def small_walk(monkeypatch):
    """Chunks of 16 weights (rows of 4), and the tie walk for slices of 40 weights or more."""
    monkeypatch.setattr(streaming, "CHUNK", 16)
    monkeypatch.setattr(streaming, "ROW", 8)
    monkeypatch.setattr(streaming, "TIE_WALK_MIN", 40)


@pytest.fixture
def walks(monkeypatch):
    """The shapes of the chunks the tie walk traced (``_count_ties`` is called only when
    tracing)."""
    calls = []
    count_ties = streaming._count_ties

    def counted(*args):
        calls.append(args[0].shape)
        return count_ties(*args)

    monkeypatch.setattr(streaming, "_count_ties", counted)
    return calls


def straddles(x: np.ndarray, k: int) -> bool:
    a = np.sort(np.abs(x.ravel()))[::-1]
    t = a[k - 1]
    return int((a == t).sum()) != k - int((a > t).sum())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_straddling_ties_are_cut_in_index_order(small_walk, walks, seed):
    """Slices of 60 weights in four shapes (one stack with a layer axis) walked together, values
    in {-2 … 2}: every boundary straddles ties, and the tied weights span several chunks."""
    rng = np.random.default_rng(seed)
    shapes = [(6, 10), (10, 6), (60,), (2, 3, 4, 5)]
    xs = [np.round(rng.normal(size=s)).astype(np.float32) for s in shapes]
    axes = [None, None, None, 0]
    k_a, k_b = [7, 1, 30, 12], [20, 2, 59, 30]
    assert straddles(xs[0], 7) and straddles(xs[2], 30)
    check(xs, axes, k_a, k_b)
    assert walks, "the tie walk did not run"


def test_one_stack_of_several_slices(small_walk, walks):
    """A single stack of five slices (layer axis), float64 keys: walked one slice per chunk."""
    rng = np.random.default_rng(4)
    x = np.round(rng.normal(size=(5, 8, 6)) * 1.5).astype(np.float64)
    check([x], [0], [11], [25])
    assert walks and all(shape[0] == 1 for shape in walks)


@pytest.mark.parametrize("seed", [0, 1])
def test_slices_of_several_sizes_with_an_overlapping_last_chunk(small_walk, walks, seed):
    """Slices of 60, 44 and 100 weights (rows of 4: 15, 11 and 25 rows, chunks of 4 rows) share
    one walk; each slice's last chunk starts inside the one before, and the rows that chunk
    held are not counted twice."""
    rng = np.random.default_rng(seed)
    xs = [np.round(rng.normal(size=s)).astype(np.float32) for s in [(6, 10), (4, 11), (10, 10)]]
    stacks = [streaming.stack_view(jnp.asarray(x), None) for x in xs]
    assert len(streaming._by_walk(stacks)) == 1
    assert all(s.shape[1] % streaming._chunk_rows(s) for s in stacks)
    k_a, k_b = [7, 20, 33], [30, 21, 70]
    assert all(straddles(x, k) for x, k in zip(xs, k_a, strict=True))
    check(xs, [None] * 3, k_a, k_b)
    assert walks, "the tie walk did not run"


@pytest.mark.parametrize("k", [1, 2, 47, 48])
def test_all_weights_tied(small_walk, walks, k):
    """Every weight ties (zeros): the cut is ``k`` itself, from the first or the last chunk."""
    x = np.zeros((12, 4), np.float32)
    check([x], [None], [k], [48])
    assert walks


def test_wanted_weight_first_or_last_in_its_chunk(small_walk, walks):
    """The ``need``-th tied weight at the first, then the last position of a chunk of 16."""
    x = np.arange(48, dtype=np.float32).reshape(12, 4) + 10
    tie = np.zeros(48, bool)
    tie[[3, 16, 31, 33]] = True  # positions 16 and 31: first and last of the second chunk
    x.reshape(-1)[tie] = 5.0  # below every other weight: the boundary sits on the ties
    for k in range(45, 48):
        check([x], [None], [k], [k + 1])
    assert walks


def test_tie_walk_and_index_digits_in_one_selection(small_walk, walks):
    """Slices of 60 weights take the walk, slices of 24 the index digits, in one select."""
    rng = np.random.default_rng(5)
    xs = [np.round(rng.normal(size=s)).astype(np.float32) for s in [(6, 10), (4, 6), (24,)]]
    assert straddles(xs[0], 9) and straddles(xs[1], 5) and straddles(xs[2], 12)
    check(xs, [None, None, None], [9, 5, 12], [31, 11, 20])
    # Only the 60-weight slices (viewed as rows of gcd(60, 8) = 4) walk their ties.
    assert walks and {shape[-1] for shape in walks} == {4}


def test_without_the_walk_below_its_size(small_walk, walks, monkeypatch):
    """Below ``TIE_WALK_MIN`` the index digits resolve the same ties; the walk never runs."""
    monkeypatch.setattr(streaming, "TIE_WALK_MIN", 1 << 30)
    rng = np.random.default_rng(6)
    x = np.round(rng.normal(size=(6, 10))).astype(np.float32)
    check([x], [None], [7], [20])
    assert not walks


def test_default_sizes_take_the_walk_on_a_large_leaf(walks):
    """At the library's own ``CHUNK``, ``ROW`` and ``TIE_WALK_MIN``: a 2048 × 2048 leaf (2²²
    weights, 32 chunks) of float32 values on a grid of 1/64, so thousands of weights tie at
    each boundary."""
    assert streaming.TIE_WALK_MIN == 2048 * 2048
    rng = np.random.default_rng(7)
    x = (np.round(rng.normal(size=(2048, 2048)) * 64) / 64).astype(np.float32)
    k_a, k_b = 838_861, 2_097_152
    assert straddles(x, k_a) and straddles(x, k_b)
    check([x], [None], [k_a], [k_b])
    assert walks


@pytest.fixture
def chunks_walked(monkeypatch):
    """How many chunks the tie walk counted at run time (a host callback per chunk)."""
    walked = []
    count_ties = streaming._count_ties

    def counted(*args):
        jax.debug.callback(lambda: walked.append(1), ordered=True)
        return count_ties(*args)

    monkeypatch.setattr(streaming, "_count_ties", counted)
    return walked


@pytest.mark.parametrize(("first", "chunks"), [(0, 1), (20, 2), (40, 3)])
def test_walk_ends_at_the_chunk_that_holds_both_cuts(small_walk, chunks_walked, first, chunks):
    """A 60-weight slice (four chunks of 16 weights, the last overlapping) whose tied weights
    all lie in positions ``first … first + 7``: the walk stops after the chunk holding both
    cuts, so it counts ``chunks`` chunks, not four."""
    x = np.arange(60, dtype=np.float32).reshape(6, 10) + 10
    x.reshape(-1)[first : first + 8] = 5.0  # below every other weight: both boundaries on ties
    check([x], [None], [54], [56])
    assert len(chunks_walked) == chunks


def test_walk_reads_every_chunk_when_a_cut_is_last(small_walk, chunks_walked):
    """The tied weights at the very end: every chunk is counted."""
    x = np.arange(60, dtype=np.float32).reshape(6, 10) + 10
    x.reshape(-1)[52:] = 5.0
    check([x], [None], [54], [57])
    assert len(chunks_walked) == 4


def test_walk_ends_at_the_one_cut_when_one_set_does_not_straddle(small_walk, chunks_walked):
    """Only ``A``'s boundary straddles (``B`` takes all 60): the walk stops after ``A``'s cut."""
    x = np.arange(60, dtype=np.float32).reshape(6, 10) + 10
    x.reshape(-1)[:8] = 5.0
    check([x], [None], [54], [60])
    assert len(chunks_walked) == 1
