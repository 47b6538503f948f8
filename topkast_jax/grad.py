"""The checked gradient of Top-KAST: differentiate with respect to ``α = θ ⊙ A``.

The natural first attempt, ``jax.grad(lambda θ: loss(tk.forward_params(θ, state)))``, takes the
gradient through the mask: ``∂L/∂θ = A ⊙ ∂L/∂α``, zero on ``B ∖ A``, so no weight outside ``A``
is ever updated and exploration dies (silently).  :func:`value_and_grad` evaluates the loss at
``α`` and differentiates with respect to ``α`` itself, which gives every weight of ``B`` its
gradient — what the Top-KAST update expects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from topkast_jax.state import forward_params


def value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """``jax.value_and_grad`` of ``loss_fn`` at ``α = θ ⊙ A``, with respect to ``α``.

    ``value_and_grad(loss_fn)(params, opt_state, *args, **kwargs)`` computes
    ``α = tk.forward_params(params, opt_state)`` (``A`` from the sparse state in ``opt_state``)
    and returns ``(loss_fn(α, *args, **kwargs), ∂loss/∂α)``; pass the gradient to
    ``tx.update(grads, opt_state, params)``.  Jit-able.

    Args:
      loss_fn: ``loss_fn(alpha, *args, **kwargs)``, a scalar (``(scalar, aux)`` with
        ``has_aux``); ``alpha`` has the structure of ``params``.
      has_aux: as in ``jax.value_and_grad``.

    Returns:
      A function of ``(params, opt_state, *args, **kwargs)`` returning ``(value, grads)``
      (``((value, aux), grads)`` with ``has_aux``), ``grads`` shaped like ``params``.

    Example::

        loss, grads = tk.value_and_grad(loss_fn)(params, opt_state, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def wrapped(
        params: Any, opt_state: optax.OptState, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        return grad_fn(forward_params(params, opt_state), *args, **kwargs)

    return wrapped
