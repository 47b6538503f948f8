"""``config.optim.name``: Adam (the default, the paper's) or SGD with heavy-ball momentum."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.language_model import train


def _updates(tx: optax.GradientTransformation, grads: list[np.ndarray]) -> list[np.ndarray]:
    params = jnp.zeros(3)
    state = tx.init(params)
    out = []
    for g in grads:
        u, state = tx.update(jnp.asarray(g), state, params)
        out.append(np.asarray(u))
    return out


GRADS = [np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, -1.0]), np.array([2.0, 0.0, 1.0])]


def test_sgd_is_heavy_ball_momentum():
    o = ml_collections.ConfigDict({"name": "sgd", "momentum": 0.5})
    got = _updates(train.base_optimizer(o, 0.1), GRADS)
    trace = np.zeros(3)
    for g, u in zip(GRADS, got, strict=True):
        trace = g + 0.5 * trace
        np.testing.assert_allclose(u, -0.1 * trace, rtol=1e-6)


def test_adam_is_the_default():
    o = ml_collections.ConfigDict({"b1": 0.8})
    got = _updates(train.base_optimizer(o, 0.1), GRADS)
    want = _updates(optax.adam(0.1, b1=0.8), GRADS)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
