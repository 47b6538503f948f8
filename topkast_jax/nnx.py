"""Flax NNX helper: Top-KAST with an ``nnx.Module``, stateful layers included.

NNX modules carry their parameters; Top-KAST needs them as a pytree so the optimizer can mask
them, and the forward pass must run on ``α = θ ⊙ A``.  The supported path is
:class:`Optimizer` (an ``nnx.Optimizer`` that keeps the masks) with :func:`value_and_grad`
(runs the loss on ``θ ⊙ A``, differentiates with respect to ``α``, writes ``nnx.BatchNorm``
statistics and ``nnx.Dropout`` RNG counts back into the model)::

    optimizer = tk.nnx.Optimizer(model, tx)            # tx = tk.topkast(...)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = tk.nnx.value_and_grad(loss_fn)(model, optimizer, x, y)
        optimizer.update(model, grads)                 # refuses nnx.grad's dense gradients
        return loss

    model_for_eval = tk.nnx.sparse_model(*tk.nnx.split(model), optimizer)

At ``refresh_every > 1`` the step may pass ``refresh_masks=False`` to ``optimizer.update`` and
the loop call ``optimizer.refresh(model)`` (jitted apart) after every ``refresh_every``-th step:
the selection then stays out of the step (:func:`topkast_jax.refresh_sets`).

Without an optimizer object, split → mask → merge, the non-parameter state threaded through the
step by :func:`apply`::

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

A plain ``nnx.Optimizer`` takes the transformation through :func:`for_optimizer` (which restores
the state's pytree types and, given the params, their ``nnx.Variable`` metadata), with
:func:`forward_params` reading the masks from the optimizer; nothing then checks that the
gradients are ``∂L/∂α``::

    optimizer = nnx.Optimizer(
        model, tk.nnx.for_optimizer(tx, nnx.state(model, nnx.Param)), wrt=nnx.Param
    )

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

import dataclasses
import functools
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


def restore_state(
    tx: optax.GradientTransformation, params: Any, opt_state: Any, *, keep_boxes: bool = False
) -> Any:
    """``opt_state`` with the pytree types ``tx.init(params)`` produces (``tx.init(bare
    params)`` unless ``keep_boxes``: then with ``params``' ``nnx.Variable`` boxes).

    ``nnx.Optimizer`` stores the optimizer state as ``nnx`` variables and turns dataclass pytree
    nodes (Top-KAST's packed mask sets) into plain ``nnx.State`` dicts when it writes an update
    back; the leaves and their order are unchanged, so the state is rebuilt on the structure of
    ``jax.eval_shape(tx.init, params)``.

    Raises:
      ValueError: the number of leaves differs (the state does not belong to ``tx``).
    """
    nnx = _nnx()
    treedef = jax.tree.structure(
        jax.eval_shape(tx.init, params if keep_boxes else nnx.as_pure(params))
    )
    leaves = jax.tree.leaves(nnx.as_pure(opt_state))
    if treedef.num_leaves != len(leaves):
        raise ValueError(
            f"opt_state has {len(leaves)} leaves but tx.init(params) has {treedef.num_leaves}: "
            "pass the optimizer state of this transformation and these params"
        )
    return jax.tree.unflatten(treedef, leaves)


def for_optimizer(
    tx: optax.GradientTransformation, params: Any = None
) -> optax.GradientTransformationExtraArgs:
    """``tx`` made safe for ``nnx.Optimizer``: its update first rebuilds the state with
    :func:`restore_state` (``nnx.Optimizer(model, tk.nnx.for_optimizer(tx), wrt=nnx.Param)``).

    Args:
      tx: the transformation (``tk.topkast(...)``, possibly inside optax wrappers).
      params: optional, the model's ``nnx.state(model, nnx.Param)``.  ``nnx.Optimizer`` hands
        ``update`` bare arrays, without the ``nnx.Variable`` metadata ``init`` saw — among it the
        ``"layers"`` axis of an ``nnx.vmap`` / ``nnx.scan`` stack, so from the second step on
        the stack would be selected as one tensor.  Given ``params``, ``update`` puts the
        gradients, params and state back into those variables before calling ``tx.update``
        (and returns bare arrays, as ``nnx.Optimizer`` expects).  :class:`Optimizer` passes it.
    """
    nnx = _nnx()
    boxed = None if params is None else jax.tree.structure(params)

    def rebox(tree: Any) -> Any:
        return jax.tree.unflatten(boxed, jax.tree.leaves(tree))

    def on_tx_state(fn: Callable[..., Any], opt_state: Any, params: Any, *trees: Any) -> Any:
        """``fn(*trees, state, params)`` on ``tx``'s own state (:func:`restore_state`); given
        the init's ``params``, with their boxes put back on ``params`` and ``trees`` and bare
        arrays returned, as ``nnx.Optimizer`` expects."""
        if boxed is None:
            return fn(*trees, restore_state(tx, params, opt_state), params)
        params = rebox(params)
        state = restore_state(tx, params, opt_state, keep_boxes=True)
        return nnx.as_pure(fn(*map(rebox, trees), state, params))

    def update_fn(updates: Any, opt_state: Any, params: Any = None, **extra: Any) -> Any:
        if params is None:
            raise ValueError(
                "tk.nnx.for_optimizer: update needs params (nnx.Optimizer passes them)"
            )
        return on_tx_state(functools.partial(tx.update, **extra), opt_state, params, updates)

    refresh = getattr(tx.update, "refresh", None)  # tx is a tk.topkast: tk.refresh_sets
    if refresh is not None:
        update_fn.refresh = functools.partial(on_tx_state, refresh)
    return optax.GradientTransformationExtraArgs(jax.jit(tx.init), update_fn)


def optimizer_state(optimizer: Any, params: Any) -> optax.OptState:
    """The plain optax state of an ``nnx.Optimizer`` (for ``tk.get_masks``, ``tk.mask_stats``,
    ``tk.exploration_penalty``): without its ``nnx`` wrappers, with the pytree types of
    ``optimizer.tx.init(params)``."""
    return restore_state(optimizer.tx, params, optimizer.opt_state)


def _check_not_optimizer_state(opt_state: Any) -> None:
    """Raise if ``opt_state`` is an ``nnx.Optimizer``'s ``opt_state`` (``nnx.OptState``
    variables, pytree types rewritten): its masks are read through the optimizer itself."""
    nnx = _nnx()
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if any(isinstance(x, nnx.OptState) for x in leaves):
        raise ValueError(
            "opt_state is an nnx.Optimizer's opt_state (nnx.OptState variables; the optimizer "
            "rewrites the state's pytree types): pass the optimizer itself, "
            "tk.nnx.forward_params(params, optimizer) or tk.nnx.optimizer_state(optimizer, params)"
        )


def forward_params(params: Any, opt_state_or_optimizer: Any) -> Any:
    """``θ ⊙ A`` in the structure of ``params`` (the ``nnx.Param`` state from :func:`split`),
    with the masks from an optax state or from an ``nnx.Optimizer`` built on ``tk.topkast``."""
    nnx = _nnx()
    if not isinstance(opt_state_or_optimizer, nnx.Optimizer):
        _check_not_optimizer_state(opt_state_or_optimizer)
        return state_lib.forward_params(params, opt_state_or_optimizer)
    opt_state = optimizer_state(opt_state_or_optimizer, params)
    alpha = state_lib.forward_params(nnx.as_pure(params), opt_state)
    return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(alpha))


def sparse_model(graphdef: Any, params: Any, rest: Any, opt_state: Any) -> Any:
    """The module with ``θ ⊙ A`` as its parameters (what the sparse network computes);
    ``opt_state`` may be an optax state or an ``nnx.Optimizer``."""
    nnx = _nnx()
    return nnx.merge(graphdef, forward_params(params, opt_state), rest)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["state"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class AlphaGrads:
    """The gradient that :func:`value_and_grad` returns: ``∂L/∂α`` with ``α = θ ⊙ A``.

    ``state`` is an ``nnx.State`` shaped like ``nnx.state(model, nnx.Param)`` (what ``nnx.grad``
    returns).  The wrapper type is the proof, checked by :class:`Optimizer`'s ``update``, that the
    loss ran on ``θ ⊙ A`` and was differentiated with respect to ``α`` — not ``nnx.grad`` of the
    dense model.  It is a pytree: ``jax.tree.map`` (e.g. ``lax.pmean``) keeps the type.
    """

    state: Any


def _check_optimizer(optimizer: Any) -> None:
    """``optimizer`` is a :class:`Optimizer`, else a TypeError that says how to build one."""
    if not isinstance(optimizer, _optimizer_class()):
        raise TypeError(
            "optimizer must be a tk.nnx.Optimizer(model, tx) (the masks live in its state), got "
            f"{type(optimizer).__name__}. A plain nnx.Optimizer runs the model on the dense θ."
        )


def value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., tuple[Any, AlphaGrads]]:
    """``nnx.value_and_grad`` for Top-KAST: the loss of the sparse network ``θ ⊙ A`` and its
    gradient with respect to ``α = θ ⊙ A``.

    ``value_and_grad(loss_fn)(model, optimizer, *args, **kwargs)``:

    1. ``α = θ ⊙ A`` from ``model``'s ``nnx.Param`` state ``θ`` and the forward masks ``A`` in
       ``optimizer`` (a :class:`Optimizer`);
    2. ``value = loss_fn(m, *args, **kwargs)`` where ``m`` is the module with parameters ``α``
       and ``model``'s other state; layers that change state in the forward pass
       (``nnx.BatchNorm`` statistics in training mode, ``nnx.Dropout`` / ``nnx.Rngs`` counts)
       do so on ``m``, and that state is written back into ``model``;
    3. ``grads = ∂value/∂α`` — every weight of ``B ∖ A`` gets its gradient (``∂L/∂θ`` through
       the mask would be zero there and stop exploration).

    Then ``optimizer.update(model, grads)`` applies the Top-KAST update to ``θ``.  Works inside
    ``nnx.jit`` and with ``nnx.scan`` / ``nnx.vmap`` stacks inside ``loss_fn``.

    Args:
      loss_fn: ``loss_fn(module, *args, **kwargs)`` returning a scalar loss, or
        ``(loss, aux)`` with ``has_aux=True``.
      has_aux: as in ``jax.value_and_grad``.

    Returns:
      A function of ``(model, optimizer, *args, **kwargs)`` returning ``(value, grads)``
      (``((value, aux), grads)`` with ``has_aux``), ``grads`` an :class:`AlphaGrads`.

    Raises:
      TypeError: ``optimizer`` is not a :class:`Optimizer`.
    """
    nnx = _nnx()

    def loss_of_alpha(alpha: Any, rest: Any, graphdef: Any, args: Any, kwargs: Any) -> Any:
        out, new_rest = apply(graphdef, alpha, rest, loss_fn, *args, **kwargs)
        value, aux = out if has_aux else (out, None)
        return value, (aux, new_rest)

    def wrapped(model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> tuple[Any, AlphaGrads]:
        _check_optimizer(optimizer)
        graphdef, params, rest = split(model)
        alpha = forward_params(params, optimizer)
        (value, (aux, new_rest)), grads = jax.value_and_grad(loss_of_alpha, has_aux=True)(
            alpha, rest, graphdef, args, kwargs
        )
        nnx.update(model, new_rest)
        return ((value, aux) if has_aux else value), AlphaGrads(grads)

    return wrapped


@functools.cache
def _optimizer_class() -> type:
    """:class:`Optimizer`, defined on first use (so the module imports without Flax)."""
    nnx = _nnx()
    from topkast_jax.transform import refresh_sets

    class Optimizer(nnx.Optimizer):
        """``nnx.Optimizer`` for a Top-KAST transformation (``wrt=nnx.Param``).

        ``Optimizer(model, tx)`` with ``tx = tk.topkast(...)`` (possibly inside optax wrappers):
        the state's pytree types are kept (``tx`` is wrapped in :func:`for_optimizer`), and
        ``update(model, grads)`` accepts only the :class:`AlphaGrads` of
        :func:`value_and_grad` — gradients of the dense model (``nnx.grad``) raise, since they
        would train ``θ`` on a forward pass that never saw ``θ ⊙ A``::

            optimizer = tk.nnx.Optimizer(model, tx)

            @nnx.jit
            def train_step(model, optimizer, x, y):
                loss, grads = tk.nnx.value_and_grad(loss_fn)(model, optimizer, x, y)
                optimizer.update(model, grads)
                return loss
        """

        def __init__(self, model: Any, tx: optax.GradientTransformation) -> None:
            super().__init__(model, for_optimizer(tx, nnx.state(model, nnx.Param)), wrt=nnx.Param)
            # store the state as every update will (dataclass nodes as nnx.State): the jitted
            # step then sees one structure from the first call on and compiles once
            nnx.update(self.opt_state, nnx.state(nnx.as_pure(self.opt_state)))

        def update(self, model: Any, grads: Any, /, **kwargs: Any) -> Any:
            """The Top-KAST update of ``model``'s ``θ`` from ``grads = ∂L/∂α``.

            Raises:
              TypeError: ``grads`` are not the :class:`AlphaGrads` of :func:`value_and_grad`.
            """
            if not isinstance(grads, AlphaGrads):
                raise TypeError(
                    "grads must be the AlphaGrads of tk.nnx.value_and_grad(loss_fn)(model, "
                    f"optimizer, ...), got {type(grads).__name__}: gradients of the dense model "
                    "(nnx.grad) come from a forward pass on θ, not θ ⊙ A, and would train the "
                    "dense network."
                )
            return super().update(model, grads.state, **kwargs)

        def refresh(self, model: Any) -> None:
            """``A`` and ``B`` selected from the ``θ`` of ``model`` now
            (:func:`topkast_jax.refresh_sets`): for a loop whose updates pass
            ``refresh_masks=False`` (no selection in its step) and which calls this, jitted
            apart, after every ``refresh_every``-th update — the run the transformation would
            train by itself, bit for bit::

                refresh = nnx.jit(lambda model, optimizer: optimizer.refresh(model))
                ...
                loss = train_step(model, optimizer, x, y)  # update(..., refresh_masks=False)
                if (step + 1) % refresh_every == 0:
                    refresh(model, optimizer)

            Raises:
              ValueError: the optimizer's transformation is not a ``tk.topkast`` itself (the
                refresh of one inside ``optax.chain`` or another wrapper is not reachable).
            """
            params = nnx.as_pure(nnx.state(model, self.wrt))
            new_state = refresh_sets(self.tx)(nnx.as_pure(self.opt_state), params)
            nnx.update(self.opt_state, nnx.state(new_state))

    Optimizer.__module__ = __name__
    return Optimizer


def __getattr__(name: str) -> Any:
    """``tk.nnx.Optimizer`` (a subclass of ``nnx.Optimizer``, built when first used)."""
    if name == "Optimizer":
        return _optimizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
