"""Flax NNX helper: Top-KAST with an ``nnx.Module``, stateful layers included.

NNX modules carry their parameters; Top-KAST needs them as a pytree so the optimizer can mask
them, and the forward pass must run on ``α = θ ⊙ A``. The recipe is split → mask → merge, with
the non-parameter state (``nnx.BatchNorm`` statistics, ``nnx.Dropout`` RNG counts) threaded
through the step by :func:`apply`::

    graphdef, params, rest = tk.nnx.split(model)       # model.train() first for BatchNorm
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, rest, opt_state, x, y):
        def loss_fn(alpha):                              # alpha = θ ⊙ A
            logits, new_rest = tk.nnx.apply(graphdef, alpha, rest, lambda m: m(x))
            return loss(logits, y), new_rest
        alpha = tk.forward_params(params, opt_state)
        (value, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(alpha)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, value

    model = tk.nnx.sparse_model(graphdef, params, rest, opt_state)   # for evaluation

With ``nnx.Optimizer``, the optimizer keeps the Top-KAST state; build it on
:func:`for_optimizer` (``nnx.Optimizer`` rewrites the state's pytree types, which the wrapper
restores) and let :func:`forward_params` read the masks from it::

    optimizer = nnx.Optimizer(model, tk.nnx.for_optimizer(tx), wrt=nnx.Param)


    @nnx.jit
    def train_step(model, optimizer, x, y):
        graphdef, params, rest = tk.nnx.split(model)
        alpha = tk.nnx.forward_params(params, optimizer)
        def loss_fn(alpha):
            logits, new_rest = tk.nnx.apply(graphdef, alpha, rest, lambda m: m(x))
            return loss(logits, y), new_rest
        (value, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(alpha)
        nnx.update(model, new_rest)        # BatchNorm statistics, RNG counts
        optimizer.update(model, grads)     # the Top-KAST update of θ, from ∂L/∂α
        return value

Requires ``flax`` (``pip install flax``; not a dependency of the core library).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from topkast_jax import state as state_lib

INSTALL_HINT = (
    "topkast_jax.nnx needs Flax, which the core library does not install: "
    "pip install flax  (or pip install 'topkast-jax[flax]')"
)


def _nnx() -> Any:
    """``flax.nnx``, or a ModuleNotFoundError that says how to install it."""
    try:
        from flax import nnx
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(INSTALL_HINT, name=e.name) from e
    return nnx


def split(model: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, params, rest)``: the ``nnx.Param`` state as a pytree, everything else
    (batch statistics, RNG state, ...) in ``rest``."""
    nnx = _nnx()
    return nnx.split(model, nnx.Param, ...)


def apply(
    graphdef: Any, params: Any, rest: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Any, Any]:
    """Run ``fn(module, *args, **kwargs)`` on the module built from ``params`` (usually α) and
    ``rest``; return ``(output, new_rest)``, the non-parameter state after the call.

    Safe inside ``jax.grad`` / ``jax.jit``: ``rest`` is copied at the current trace level before
    merging, so layers that update state in the forward pass (``nnx.BatchNorm`` in training mode,
    ``nnx.Dropout``'s RNG counter) do not raise ``TraceContextError``. ``new_rest`` has the
    structure of ``rest``: return it as the auxiliary output of the loss and feed it to the next
    step (or ``nnx.update(model, new_rest)``).
    """
    nnx = _nnx()
    rest = jax.tree.map(lambda x: x, rest)  # fresh Variables owned by this trace
    module = nnx.merge(graphdef, params, rest)
    out = fn(module, *args, **kwargs)
    _, _, new_rest = nnx.split(module, nnx.Param, ...)
    return out, new_rest


def restore_state(tx: optax.GradientTransformation, params: Any, opt_state: Any) -> Any:
    """``opt_state`` with the pytree types ``tx.init(params)`` produces.

    ``nnx.Optimizer`` stores the optimizer state as ``nnx`` variables and turns dataclass pytree
    nodes (Top-KAST's packed mask sets) into plain ``nnx.State`` dicts when it writes an update
    back; the leaves and their order are unchanged, so the state is rebuilt on the structure of
    ``jax.eval_shape(tx.init, params)``.

    Raises:
      ValueError: the number of leaves differs (the state does not belong to ``tx``).
    """
    nnx = _nnx()
    treedef = jax.tree.structure(jax.eval_shape(tx.init, nnx.as_pure(params)))
    leaves = jax.tree.leaves(nnx.as_pure(opt_state))
    if treedef.num_leaves != len(leaves):
        raise ValueError(
            f"opt_state has {len(leaves)} leaves but tx.init(params) has {treedef.num_leaves}: "
            "pass the optimizer state of this transformation and these params"
        )
    return jax.tree.unflatten(treedef, leaves)


def for_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` made safe for ``nnx.Optimizer``: its update first rebuilds the state with
    :func:`restore_state` (``nnx.Optimizer(model, tk.nnx.for_optimizer(tx), wrt=nnx.Param)``)."""

    def update_fn(updates: Any, opt_state: Any, params: Any = None, **extra: Any) -> Any:
        if params is None:
            raise ValueError(
                "tk.nnx.for_optimizer: update needs params (nnx.Optimizer passes them)"
            )
        return tx.update(updates, restore_state(tx, params, opt_state), params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def optimizer_state(optimizer: Any, params: Any) -> optax.OptState:
    """The plain optax state of an ``nnx.Optimizer`` (for ``tk.get_masks``, ``tk.mask_stats``,
    ``tk.exploration_penalty``): without its ``nnx`` wrappers, with the pytree types of
    ``optimizer.tx.init(params)``."""
    return restore_state(optimizer.tx, params, optimizer.opt_state)


def forward_params(params: Any, opt_state_or_optimizer: Any) -> Any:
    """``θ ⊙ A`` in the structure of ``params`` (the ``nnx.Param`` state from :func:`split`),
    with the masks from an optax state or from an ``nnx.Optimizer`` built on ``tk.topkast``."""
    nnx = _nnx()
    if not isinstance(opt_state_or_optimizer, nnx.Optimizer):
        return state_lib.forward_params(params, opt_state_or_optimizer)
    opt_state = optimizer_state(opt_state_or_optimizer, params)
    alpha = state_lib.forward_params(nnx.as_pure(params), opt_state)
    return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(alpha))


def sparse_model(graphdef: Any, params: Any, rest: Any, opt_state: Any) -> Any:
    """The module with ``θ ⊙ A`` as its parameters (what the sparse network computes);
    ``opt_state`` may be an optax state or an ``nnx.Optimizer``."""
    nnx = _nnx()
    return nnx.merge(graphdef, forward_params(params, opt_state), rest)
