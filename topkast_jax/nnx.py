"""Flax NNX helper: Top-KAST with an ``nnx.Module``.

NNX modules carry their parameters; Top-KAST needs them as a pytree so the optimizer can mask
them.  The recipe is split → mask → merge::

    graphdef, params, rest = tk.nnx.split(model)
    opt_state = tx.init(params)

    def loss_fn(alpha, rest, batch):               # alpha = θ ⊙ A
        model = nnx.merge(graphdef, alpha, rest)
        return loss(model(batch["x"]), batch["y"])

    grads = jax.grad(loss_fn)(tk.forward_params(params, opt_state), rest, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    model = tk.nnx.sparse_model(graphdef, params, rest, opt_state)   # for evaluation

Requires ``flax`` (not a dependency of the core library).
"""

from __future__ import annotations

from typing import Any

import optax

from topkast_jax.state import forward_params


def split(model: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, params, rest)``: the ``nnx.Param`` state as a pytree, everything else apart."""
    from flax import nnx

    return nnx.split(model, nnx.Param, ...)


def sparse_model(graphdef: Any, params: Any, rest: Any, opt_state: optax.OptState) -> Any:
    """The module with ``θ ⊙ A`` as its parameters (what the sparse network computes)."""
    from flax import nnx

    return nnx.merge(graphdef, forward_params(params, opt_state), rest)
