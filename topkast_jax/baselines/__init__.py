"""Baselines of the Top-KAST paper in the same optax interface: static, pruning, SET, RigL.

Each wraps an inner optimizer, keeps its mask ``M`` in a
:class:`~topkast_jax.baselines.BaselineState` (``masks = Masks(forward=M, backward=M)``), and works
with :func:`topkast_jax.forward_params`, :func:`topkast_jax.get_masks`,
:func:`topkast_jax.mask_stats` and :func:`topkast_jax.exploration_penalty` (always 0 here)::

    tx = baselines.rigl(optax.adam(1e-3), sparsity=0.9, end_step=7500)
    opt_state = tx.init(params)
    alpha = tk.forward_params(params, opt_state)                # θ ⊙ M
    grads = jax.grad(loss_fn)(alpha, batch)                     # dense gradient w.r.t. α
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)               # zero outside M

* :func:`static_sparse` — random mask at init, fixed.
* :func:`magnitude_pruning` — Zhu & Gupta (2018) gradual pruning, dense before ``begin_step``.
* :func:`set_` — Mocanu et al. (2018): drop by magnitude, regrow at random.
* :func:`rigl` — Evci et al. (2020): drop by magnitude, regrow by dense-gradient magnitude.
* :func:`dense` — all-True masks (same as the inner optimizer).
"""

from topkast_jax.baselines import schedules
from topkast_jax.baselines.dynamic import rigl, set_
from topkast_jax.baselines.pruning import magnitude_pruning
from topkast_jax.baselines.state import BaselineState
from topkast_jax.baselines.static import dense, static_sparse

__all__ = [
    "BaselineState",
    "dense",
    "magnitude_pruning",
    "rigl",
    "schedules",
    "set_",
    "static_sparse",
]
