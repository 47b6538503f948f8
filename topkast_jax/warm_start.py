"""The thresholds' keys of the last two refreshes, kept to guess the next ones (a warm start).

A refresh selects ``A`` and ``B`` by the ``k``-th largest magnitude key of every slice
(:func:`topkast_jax.streaming.leaf_thresholds`).  Between refreshes the weights move a little, so
the keys move a little too, and mostly the same way as at the refresh before: on the
Transformer-XL of ``scripts/benchmark_step.py`` (Adam, refresh every step) the keys of float32
thresholds moved by a median 40,517 units of the last place in one step, and the linear guess
``2 · latest − previous`` missed by a median of 748 (``scripts/benchmark_warm_start.py``, 2-core
CPU, 2026-11-23).  The selection looks for each key in a window of 65,024 keys around its guess
first and searches the key's digits only where that misses, so it takes one histogram pass
instead of two where the guesses hold (:class:`topkast_jax.streaming._Window`).  The guesses
change the cost only, never the sets.

The state holds one array ``history[2, R, 2]`` for all sparse leaves (``R`` rows: every slice of
every sparse leaf in order, :func:`topkast_jax.streaming.leaf_keys`; one row with global top-k):
``history[0]`` the latest keys of ``A`` and ``B``, ``history[1]`` the ones before — 16 bytes per
slice.  One array, not one per leaf: each of these small operations is one XLA kernel, and on
XLA's CPU backend every kernel costs about 14 ms of compile time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def start(key: jax.Array) -> jax.Array:
    """The history after the first selection: ``[key, key]`` (the first guess is ``key``)."""
    return jnp.stack([key, key])


def push(history: jax.Array, key: jax.Array) -> jax.Array:
    """The history after a refresh selected ``key``: ``[key, latest]``."""
    return jnp.stack([key, history[0]])


def guess(history: jax.Array) -> jax.Array:
    """The next keys, extrapolated: ``latest + (latest − previous)``, clipped to the keys'
    range ``[0, max]`` (magnitude keys are never negative; computed without overflow)."""
    latest, previous = history[0], history[1]
    most = jnp.iinfo(latest.dtype).max
    step = jnp.clip(latest - previous, -latest, most - latest)
    return latest + step
