r"""Logged statistics of an always-sparse run (``tk.AlwaysSparse``), read from its ``B``-state.

The device holds, per sparse leaf, the ``k_B`` values ``θ_B``, their indices and the ``A``-flags
``in_a``; nothing here builds a dense array or touches the host ``θ``:

* ``|B_ℓ| = k_B`` is the length of the index vector (a shape, no device work);
* ``|A_ℓ| = Σ in_a`` (a sum over ``k_B`` flags on the device);
* the exploration penalty (paper Eq. 3), ``λ Σ_ℓ ½ Σ_{i∈B_ℓ} s_i θ_i²`` with ``s_i = 1`` on ``A``
  and ``1/D_ℓ`` on ``B∖A`` (``topkast_jax.penalty``), a sum over the ``k_B`` values.

The names are those of ``tk.mask_stats`` (``forward_density``, ``backward_density`` over all
sparse leaves, and ``forward_density/<path>``, ``backward_density/<path>`` per leaf), so the
records go under ``masks/`` as in the masked trainers.

For Figure 3 (``experiments/common/mask_dynamics.py``) the forward mask of the previous window is
kept on the host, bit-packed (``n/8`` bytes per sparse leaf, a fixed shape for checkpoints):
:func:`packed_forward_masks` and :func:`window_change`, once per window, read the ``k_B`` indices
and flags from the device and unpack on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _sparse_rows(state: Any) -> list[tuple[str, Any, Any, Any]]:
    """``(path, host θ, indices, in_a)`` of every sparse leaf, in tree order."""
    from topkast_jax.tree import path_name

    flat, _ = jax.tree_util.tree_flatten_with_path(state.host_params, is_leaf=lambda x: x is None)
    indices = jax.tree.leaves(state.device.indices, is_leaf=lambda x: x is None)
    in_a = jax.tree.leaves(state.device.in_a, is_leaf=lambda x: x is None)
    return [
        (path_name(path), h, i, a)
        for (path, h), i, a in zip(flat, indices, in_a, strict=True)
        if h is not None
    ]


def mask_densities(state: Any) -> dict[str, float]:
    """``|A|/n`` and ``|B|/n`` over all sparse leaves and per leaf (``tk.mask_stats`` names);
    empty when no leaf is sparse.  The density entries of ``tk.AlwaysSparse.mask_stats``, which
    the trainer logs whole (with the mask change and the reservoir statistic).

    Args:
      state: a ``tk.always_sparse.AlwaysSparseState``.
    """
    from topkast_jax import AlwaysSparse

    stats = AlwaysSparse.mask_stats(state)
    return {k: v for k, v in stats.items() if k.startswith(("forward_density", "backward_density"))}


def penalty_fn(sparse: Any, state: Any) -> Callable[[Any], jax.Array]:
    """Jitted ``device_state -> λ(½‖θ_A‖² + ½‖θ_{B∖A}‖²/D)`` summed over sparse leaves (float32),
    for ``sparse`` (a ``tk.AlwaysSparse``) and states laid out like ``state``."""
    from topkast_jax.penalty import penalty_scale

    plan = sparse.plan(sparse.abstract_params(state))
    densities = tuple(leaf.forward if leaf.sparse else None for leaf in plan)
    l2 = sparse.exploration_l2

    @jax.jit
    def penalty(device: Any) -> jax.Array:
        values = jax.tree.leaves(device.params)
        in_a = jax.tree.leaves(device.in_a, is_leaf=lambda x: x is None)
        total = jnp.zeros((), jnp.float32)
        for p, a, d in zip(values, in_a, densities, strict=True):
            if d is not None:
                scale = penalty_scale(a, True, jnp.asarray(d, jnp.float32))
                total += jnp.sum(scale * jnp.square(p.astype(jnp.float32)))
        return 0.5 * l2 * total

    return penalty


def _forward_masks(state: Any) -> list[tuple[str, np.ndarray]]:
    """``(path, flat dense bool A)`` of every sparse leaf, built on the host."""
    rows = _sparse_rows(state)
    indices, in_a = jax.device_get(([i for _, _, i, _ in rows], [a for *_, a in rows]))
    out = []
    for (name, h, *_), i, a in zip(rows, indices, in_a, strict=True):
        mask = np.zeros(h.size, bool)
        mask[np.asarray(i)[np.asarray(a)]] = True
        out.append((name, mask))
    return out


def packed_forward_masks(state: Any) -> list[np.ndarray]:
    """The forward mask of every sparse leaf, flat and bit-packed (``np.packbits``, uint8)."""
    return [np.packbits(mask) for _, mask in _forward_masks(state)]


def window_change(previous: list[np.ndarray], state: Any) -> dict[str, float]:
    """Per sparse leaf, the fraction of positions where ``state``'s forward mask differs from
    ``previous`` (:func:`packed_forward_masks` of an earlier state): ``mean(m_t ≠ m_{t−w})``,
    the ``mask_dynamics.window_change`` of the masked trainers."""
    current = _forward_masks(state)
    if len(previous) != len(current):
        raise ValueError(f"previous holds {len(previous)} masks, the state {len(current)}")
    return {
        name: float(np.mean(np.unpackbits(old, count=mask.size).astype(bool) != mask))
        for old, (name, mask) in zip(previous, current, strict=True)
    }
