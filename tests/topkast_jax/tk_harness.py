"""Shared pieces of the Top-KAST core tests: tiny problems and a jitted training loop.

The loss is a per-leaf least-squares problem ``L(α) = Σ_l ½‖X_l vec(α_l) − y_l‖²`` whose gradient
``X_lᵀ(X_l vec(α_l) − y_l)`` is easy to write in numpy for the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import reference

import topkast_jax as tk

SHAPES = {"b": (5,), "w1": (6, 5), "w2": (4, 3, 2)}  # "b" is dense under sparsify.kernels()


def make_params(seed: int = 0, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, Any]:
    """Random float32 params (leaves in sorted-key order, like ``jax.tree.leaves``)."""
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in sorted(shapes.items())}


@dataclasses.dataclass
class Problem:
    """Least squares per leaf: ``xs[l]`` is ``m × n_l``, ``ys[l]`` is ``m``."""

    xs: list[np.ndarray]
    ys: list[np.ndarray]

    def loss(self, alpha: Any) -> jax.Array:
        total = jnp.zeros((), jnp.float32)
        for a, x, y in zip(jax.tree.leaves(alpha), self.xs, self.ys, strict=True):
            r = jnp.asarray(x, jnp.float32) @ a.ravel() - jnp.asarray(y, jnp.float32)
            total += 0.5 * jnp.sum(r * r)
        return total

    def grad_np(self, alpha: list[np.ndarray], t: int = 0) -> list[np.ndarray]:
        del t
        out = []
        for a, x, y in zip(alpha, self.xs, self.ys, strict=True):
            x64 = np.asarray(x, np.float64)
            g = x64.T @ (x64 @ np.asarray(a, np.float64).ravel() - y)
            out.append(g.reshape(np.shape(a)))
        return out


def make_problem(params: Any, seed: int = 1, rows: int = 8) -> Problem:
    """Random ``X_l`` (scaled so SGD at lr 0.05 is stable) and targets ``y_l``."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for p in jax.tree.leaves(params):
        n = int(np.size(p))
        xs.append(rng.normal(size=(rows, n)) / np.sqrt(n + rows))
        ys.append(rng.normal(size=rows) * 2.0)
    return Problem(xs, ys)


def leaf_configs(params: Any, tx_kwargs: dict[str, Any]) -> list[reference.LeafConfig]:
    """Reference leaf configs for uniform densities and ``sparsify.kernels()``-like selection."""
    d = 1.0 - tx_kwargs.get("forward_sparsity", 0.0)
    db = 1.0 - tx_kwargs.get("backward_sparsity", 0.0)
    return [
        reference.LeafConfig(sparse=np.ndim(p) >= 2, forward_density=d, backward_density=db)
        for p in jax.tree.leaves(params)
    ]


def np_leaves(tree: Any) -> list[np.ndarray | None]:
    """Leaves as numpy arrays, ``None`` kept (masks hold ``None`` on dense leaves)."""
    return [None if x is None else np.asarray(x) for x in jax.tree.leaves(tree, is_leaf=_is_none)]


def _is_none(x: Any) -> bool:
    return x is None


@dataclasses.dataclass
class Snapshot:
    """What the tests look at after each step (numpy)."""

    params: list[np.ndarray]
    forward: list[np.ndarray | None]
    backward: list[np.ndarray | None]
    penalty: float
    state: Any


def train(
    tx: optax.GradientTransformation, params: Any, loss_fn: Any, num_steps: int
) -> list[Snapshot]:
    """Runs ``num_steps`` jitted Top-KAST steps; snapshot 0 is the initial state."""

    @jax.jit
    def step(params, opt_state):
        alpha = tk.forward_params(params, opt_state)
        grads = jax.grad(loss_fn)(alpha)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def snap(params, opt_state):
        masks = tk.get_masks(opt_state)
        return Snapshot(
            params=[np.asarray(p) for p in jax.tree.leaves(params)],
            forward=np_leaves(masks.forward),
            backward=np_leaves(masks.backward),
            penalty=float(tk.exploration_penalty(params, opt_state)),
            state=opt_state,
        )

    opt_state = jax.jit(tx.init)(params)
    out = [snap(params, opt_state)]
    for _ in range(num_steps):
        params, opt_state = step(params, opt_state)
        out.append(snap(params, opt_state))
    return out


def init(tx: optax.GradientTransformation, params: Any) -> Any:
    """``tx.init`` under jit (much cheaper than running the selection op by op)."""
    return jax.jit(tx.init)(params)


def assert_matches_reference(got, want, cfgs, tx_kwargs, stop=None):
    """Params, masks and penalty of every step equal the reference."""
    lam = tx_kwargs.get("exploration_l2", 0.0)
    for t, (snap, (ref_params, ref_state)) in enumerate(zip(got, want, strict=True)):
        ref_backward = reference.effective_backward(ref_state, stop)
        for i, cfg in enumerate(cfgs):
            np.testing.assert_allclose(
                snap.params[i], ref_params[i], rtol=2e-5, atol=2e-5, err_msg=f"step {t} leaf {i}"
            )
            if cfg.sparse:
                np.testing.assert_array_equal(snap.forward[i], ref_state.a[i], f"A step {t}")
                np.testing.assert_array_equal(snap.backward[i], ref_backward[i], f"B step {t}")
            else:
                assert snap.forward[i] is None and snap.backward[i] is None
        want_pen = reference.total_penalty(ref_params, ref_state, cfgs, lam, stop)
        np.testing.assert_allclose(snap.penalty, want_pen, rtol=1e-5, atol=1e-7)


LR = 0.05
LAM = 0.05
TRAJECTORY_STEPS = 12
TRAJECTORIES = {
    "sgd_refresh1": dict(momentum=0.0, refresh_every=1, fs=0.8, bs=0.5),
    "momentum_refresh1": dict(momentum=0.9, refresh_every=1, fs=0.8, bs=0.5),
    "momentum_refresh3": dict(momentum=0.9, refresh_every=3, fs=0.7, bs=0.4),
    "momentum_backward_dense": dict(momentum=0.9, refresh_every=1, fs=0.6, bs=0.0),
    "momentum_b_equals_a": dict(momentum=0.9, refresh_every=2, fs=0.75, bs=0.75),
}


@functools.cache
def trajectory(name: str):
    """``(got, want, cfgs, tx_kwargs)`` of one named run, library and reference (cached)."""
    case = TRAJECTORIES[name]
    params = make_params(seed=0)
    problem = make_problem(params, seed=1)
    tx_kwargs = dict(
        forward_sparsity=case["fs"],
        backward_sparsity=case["bs"],
        exploration_l2=LAM,
        refresh_every=case["refresh_every"],
    )
    inner = optax.sgd(LR, momentum=case["momentum"] or None)
    got = train(
        tk.topkast(inner, track_reservoir=True, **tx_kwargs), params, problem.loss, TRAJECTORY_STEPS
    )
    cfgs = leaf_configs(params, tx_kwargs)
    want = reference.run(
        [np.asarray(p) for p in jax.tree.leaves(params)],
        cfgs,
        problem.grad_np,
        TRAJECTORY_STEPS,
        learning_rate=LR,
        momentum=case["momentum"],
        exploration_l2=LAM,
        refresh_every=case["refresh_every"],
    )
    return got, want, cfgs, tx_kwargs
