"""The exploration penalty of Top-KAST (paper Eq. 3), in one definition.

For a sparse leaf with forward set ``A``, backward set ``B ⊇ A`` and forward density ``D`` (of each
slice, for a leaf with a layer axis: ``D`` is then an array that broadcasts against the leaf):

    penalty(θ) = λ · (½‖θ_A‖² + ½‖θ_{B∖A}‖² / D)

i.e. ``½ λ Σ_i s_i θ_i²`` with the per-weight scale ``s_i = 1`` on ``A``, ``1/D`` on ``B∖A`` and
``0`` elsewhere.  Its gradient is ``λ s ⊙ θ`` — what the optimizer adds to the masked gradient.
Weights in ``B∖A`` pay ``1/D`` times more, so a weight must earn its way into ``A``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from topkast_jax import boxes
from topkast_jax.state import Masks, sparse_states_or_dense
from topkast_jax.tree import cover, map_sparse, sparse_leaves


def penalty_scale(forward: jax.Array, backward: jax.Array, density: jax.Array) -> jax.Array:
    """Per-weight scale ``s``: 1 on ``A``, ``1/D`` on ``B∖A``, 0 elsewhere (float32)."""
    return jnp.where(forward, 1.0, jnp.where(backward, 1.0 / density, 0.0)).astype(jnp.float32)


def penalty_value(params: Any, masks: Masks, densities: Any, l2: jax.Array) -> jax.Array:
    """``Σ_leaves ½ λ Σ_i s_i θ_i²`` over sparse leaves (float32 scalar)."""
    total = jnp.zeros((), jnp.float32)
    for _, a, b, p, d in sparse_leaves(masks.forward, masks.backward, params, densities):
        total += jnp.sum(penalty_scale(a, b, d) * jnp.square(p.astype(jnp.float32)))
    return 0.5 * l2 * total


def add_penalty_gradient(
    grads: Any, params: Any, masks: Masks, densities: Any, l2: jax.Array
) -> Any:
    """``g + λ s ⊙ θ`` on sparse leaves; dense leaves unchanged.  ``densities`` (``D`` per leaf,
    per slice for a leaf with a layer axis) may be stored without the params' Flax boxes."""

    def add(g, a, b, p, d):
        return (g + l2 * penalty_scale(a, b, d) * p).astype(g.dtype)

    densities = boxes.rebox(grads, densities)
    return map_sparse(add, grads, masks.forward, masks.backward, params, densities)


def exploration_penalty(params: Any, opt_state: optax.OptState) -> jax.Array:
    """The current exploration penalty ``λ(½‖θ_A‖² + ½‖θ_{B∖A}‖²/D)`` summed over sparse leaves.

    Args:
      params: the dense parameters ``θ``.
      opt_state: an optimizer state containing a :class:`~topkast_jax.TopKastState`, or several
        over disjoint leaves (each with its own ``λ`` and ``D``; their penalties are summed).

    Returns:
      float32 scalar, for logging (the optimizer already applies its gradient); 0 with a
      one-time warning when ``opt_state`` holds no sparse state (Top-KAST switched off).
    """
    states = sparse_states_or_dense(opt_state, "tk.exploration_penalty")
    if not states:
        return jnp.zeros((), jnp.float32)
    values = [
        penalty_value(
            params,
            Masks(*(cover(m, params) for m in state.masks)),
            cover(state.densities, params),
            state.exploration_l2,
        )
        for state in states
    ]
    return sum(values[1:], values[0])
