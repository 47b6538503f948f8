"""Reference checks of :func:`topkast_jax.streaming.leaf_thresholds`: the sets of every slice
must equal a stable argsort of ``−|x|`` (ties to the lower row-major index)."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from topkast_jax import codes, streaming


def stable_top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Reference: the ``k`` largest ``|x|`` by stable argsort (ties to the lower index)."""
    mask = np.zeros(x.size, bool)
    mask[np.argsort(-np.abs(x.ravel()), kind="stable")[:k]] = True
    return mask.reshape(x.shape)


def assert_slice_sets(
    xs: Sequence[np.ndarray],
    axes: Sequence[int | None],
    k_a: Sequence[int],
    k_b: Sequence[int],
    guess: np.ndarray | None = None,
) -> None:
    """Select ``A`` (``k_a`` per slice) and ``B`` (``k_b``) of every leaf in one call (warm
    started from ``guess``, ``[slices, 2]`` in leaf order, when given) and compare each slice
    (along the layer axis ``axes[i]``, which must be 0, or the whole leaf) with
    :func:`stable_top_k`."""
    guess = None if guess is None else jnp.asarray(guess)
    ths = streaming.leaf_thresholds([jnp.asarray(x) for x in xs], k_a, k_b, axes, guess)
    for x, th, axis, ka, kb in zip(xs, ths, axes, k_a, k_b, strict=True):
        code = np.asarray(streaming.codes_from_thresholds(jnp.asarray(x), th, axis))
        slices = [(x, code)] if axis is None else list(zip(x, code, strict=True))
        for xi, ci in slices:
            np.testing.assert_array_equal(codes.forward_of(ci), stable_top_k(xi, ka))
            np.testing.assert_array_equal(codes.backward_of(ci), stable_top_k(xi, kb))


def assert_global_sets(
    xs: Sequence[np.ndarray], k_a: int, k_b: int, guess: np.ndarray | None = None
) -> None:
    """Select ``A`` (``k_a`` weights) and ``B`` (``k_b``) over all leaves at once (global top-k;
    warm started from ``guess``, when given) and compare them with :func:`stable_top_k` of the
    leaves flattened and joined in order."""
    guess = None if guess is None else jnp.asarray(guess)
    ths = streaming.global_thresholds([jnp.asarray(x) for x in xs], k_a, k_b, None, guess)
    got = np.concatenate(
        [
            np.asarray(streaming.codes_from_thresholds(jnp.asarray(x), t)).ravel()
            for x, t in zip(xs, ths, strict=True)
        ]
    )
    flat = np.concatenate([x.ravel() for x in xs])
    np.testing.assert_array_equal(codes.forward_of(got), stable_top_k(flat, k_a))
    np.testing.assert_array_equal(codes.backward_of(got), stable_top_k(flat, k_b))
