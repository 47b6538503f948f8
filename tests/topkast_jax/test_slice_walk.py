"""The one-device walk of :mod:`topkast_jax.streaming`: every slice viewed as ``(n / c, c)``
rows (``c = gcd(n, ROW)``), slices of one row length and one chunk size walked in one loop one
slice at a time (a ``lax.switch`` over the stacks), the histograms of every group in one buffer.

Slices of 60 weights in four shapes — ``(6, 10)``, ``(10, 6)``, ``(60,)`` and the two layers of a
``(2, 3, 4, 5)`` stack — share one loop; with ``ROW = 8`` (rows of 4) and ``CHUNK = 16`` (4 rows)
each slice takes three chunks of 4 rows and a last one that overlaps the third by one row.  The
sets must equal a stable argsort of each slice, ties included (values rounded to integers)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from slice_sets import assert_global_sets, assert_slice_sets

from topkast_jax import streaming


@pytest.fixture
def short_rows(monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK", 16)
    monkeypatch.setattr(streaming, "ROW", 8)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rounded", [False, True])
def test_equal_size_slices_of_any_shape_share_one_walk(short_rows, seed, rounded):
    rng = np.random.default_rng(seed)
    shapes = [(6, 10), (10, 6), (60,), (2, 3, 4, 5)]
    xs = [rng.normal(size=s).astype(np.float32) * 3 for s in shapes]
    if rounded:  # many ties straddle the boundaries: the index digits run
        xs = [np.round(x) for x in xs]
    axes = [None, None, None, 0]
    stacks = [streaming.stack_view(jnp.asarray(x), a) for x, a in zip(xs, axes, strict=True)]
    assert {s.shape[1:] for s in stacks} == {(15, 4)}
    assert len(streaming._by_walk(stacks)) == 1
    assert_slice_sets(xs, axes, [7, 1, 30, 12], [20, 1, 59, 30])


def test_global_top_k_over_a_shared_walk(short_rows):
    """Global top-k: one threshold over all slices, the groups' counts summed into one row."""
    rng = np.random.default_rng(2)
    xs = [np.round(rng.normal(size=s) * 2).astype(np.float32) for s in [(6, 10), (10, 6), (7, 3)]]
    assert_global_sets(xs, 50, 101)


@pytest.mark.parametrize("rounded", [False, True])
def test_slices_of_several_sizes_share_one_walk(short_rows, rounded):
    """Slices of 60, 44, 100 and 36 weights (rows of 4: 15, 11, 25 and 9 rows) share one walk
    of chunks of 4 rows; the last chunk of each starts inside the one before, and the rows
    already counted are not counted again.  A slice of 12 weights (3 rows) takes chunks
    of 2 rows, a walk of its own."""
    rng = np.random.default_rng(3)
    shapes = [(6, 10), (4, 11), (10, 10), (36,), (3, 4)]
    xs = [rng.normal(size=s).astype(np.float32) * 3 for s in shapes]
    if rounded:  # ties straddle the boundaries: the index digits run
        xs = [np.round(x) for x in xs]
    stacks = [streaming.stack_view(jnp.asarray(x), None) for x in xs]
    assert [streaming._chunk_rows(s) for s in stacks] == [4, 4, 4, 4, 2]
    assert sorted(map(len, streaming._by_walk(stacks))) == [1, 4]
    assert_slice_sets(xs, [None] * 5, [7, 20, 33, 1, 5], [30, 21, 70, 36, 6])


def test_global_top_k_over_slices_of_several_sizes(short_rows):
    """Global top-k over one walk of slices of several sizes: the index field of the composite
    key ranks each weight within its own slice's size."""
    rng = np.random.default_rng(4)
    xs = [np.round(rng.normal(size=s) * 2).astype(np.float32) for s in [(6, 10), (4, 11), (25, 4)]]
    assert len(streaming._by_walk([streaming.stack_view(jnp.asarray(x), None) for x in xs])) == 1
    assert_global_sets(xs, 61, 150)
