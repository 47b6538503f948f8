"""Training semantics of ``topkast_jax.baselines`` against plain-numpy references (issue 5).

Toy problem: ``L(α) = ½‖α − target‖²`` summed over leaves, with ``α = tk.forward_params(θ, s)``,
so ``∂L/∂α = α − target`` is dense (nonzero outside the mask, as RigL needs).  The reference
below re-implements each rule in float32 numpy with SGD + momentum β and learning rate η:

    g = θ⊙M − target;  m ← (g⊙M) + β m, zeroed outside M;  θ' = θ − η m (only on M);
    at a scheduled step: M' = rule(M, θ', g);  θ ← θ' on M∩M', 0 elsewhere; m zeroed off M∩M'.

RigL (``skip_gradient``) replaces the step instead: at a scheduled call ``M' = rule(M, θ, g)``,
``θ ← θ`` on M∩M' and 0 elsewhere, ``m`` zeroed off M∩M' and not advanced, dense leaves unchanged.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import topkast_jax as tk
from topkast_jax import baselines

LR, BETA = 0.1, 0.9
SHAPES = {"b": (8,), "v": (5, 4, 3), "w": (6, 8)}  # jax.tree order: b, v, w
SPARSE = ("v", "w")


def make_params(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(SHAPES))
    params = {n: jax.random.normal(keys[i], s) for i, (n, s) in enumerate(SHAPES.items())}
    target = {n: jax.random.normal(keys[i + 3], s) for i, (n, s) in enumerate(SHAPES.items())}
    return params, target


def loss_fn(alpha, target):
    return sum(0.5 * jnp.sum((alpha[n] - target[n]) ** 2) for n in alpha)


def run(tx, num_steps, seed=0):
    """Train ``num_steps`` jitted steps; return the history of (masks, params, state) per step."""
    params, target = make_params(seed)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(tk.forward_params(params, state), target)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = [(jax.device_get(tk.get_masks(state).forward), jax.device_get(params), state)]
    for _ in range(num_steps):
        params, state = step(params, state)
        history.append((jax.device_get(tk.get_masks(state).forward), jax.device_get(params), state))
    return history


def top_k_among(score, k, valid):
    """numpy: the k valid entries of largest |score|, ties to the lower row-major index."""
    magnitude = np.where(valid.ravel(), np.abs(score.astype(np.float64)).ravel(), -1.0)
    mask = np.zeros(score.size, bool)
    mask[np.argsort(-magnitude, kind="stable")[:k]] = True
    return mask.reshape(score.shape)


def reference_run(masks0, num_steps, rule, seed=0, skip_gradient=False):
    """The float32 numpy run; ``rule(t, name, M, θ', g)`` returns M' or None (no update).

    ``skip_gradient`` (RigL): ``rule(c, name, M, θ, g)`` is asked before the ``c``-th update
    (``c`` from 0); when it returns masks, they replace that update's gradient step."""
    params, target = jax.device_get(make_params(seed))
    theta = {n: np.asarray(p, np.float32) for n, p in params.items()}
    target = {n: np.asarray(p, np.float32) for n, p in target.items()}
    masks = {n: np.asarray(masks0[n]) for n in SPARSE}
    momentum = {n: np.zeros_like(p) for n, p in theta.items()}
    history = [({n: m.copy() for n, m in masks.items()}, {n: p.copy() for n, p in theta.items()})]
    for t in range(1, num_steps + 1):
        if skip_gradient and mask_update_replaces_step(t - 1, rule, theta, target, masks, momentum):
            history.append(
                ({n: m.copy() for n, m in masks.items()}, {n: p.copy() for n, p in theta.items()})
            )
            continue
        for n in theta:
            mask = masks.get(n, np.ones(theta[n].shape, bool))
            grad = np.where(mask, theta[n], 0).astype(np.float32) - target[n]
            momentum[n] = np.where(
                mask, np.where(mask, grad, 0) + np.float32(BETA) * momentum[n], 0
            )
            new_theta = theta[n] + np.where(mask, -np.float32(LR) * momentum[n], 0)
            after_step = n in masks and not skip_gradient
            new_mask = rule(t, n, mask, new_theta, grad) if after_step else None
            if new_mask is not None:
                kept = mask & new_mask
                new_theta = np.where(kept, new_theta, 0).astype(np.float32)
                momentum[n] = np.where(kept, momentum[n], 0)
                masks[n] = new_mask
            elif n in masks:
                new_theta = np.where(mask, new_theta, 0).astype(np.float32)
            theta[n] = new_theta
        history.append(
            ({n: m.copy() for n, m in masks.items()}, {n: p.copy() for n, p in theta.items()})
        )
    return history


def mask_update_replaces_step(c, rule, theta, target, masks, momentum):
    """RigL's mask-update call ``c`` (in place): new masks from ``θ`` and ``g`` at ``θ``, kept
    weights unchanged, the others 0, momentum zeroed off M∩M'; False when not scheduled."""
    new = {}
    for n in masks:
        grad = np.where(masks[n], theta[n], 0).astype(np.float32) - target[n]
        new[n] = rule(c, n, masks[n], theta[n], grad)
    if all(m is None for m in new.values()):
        return False
    for n, new_mask in new.items():
        kept = masks[n] & new_mask
        theta[n] = np.where(kept, theta[n], 0).astype(np.float32)
        momentum[n] = np.where(kept, momentum[n], 0)
        masks[n] = new_mask
    return True


def assert_matches_reference(history, ref_history):
    for t, ((masks, params, _), (ref_masks, ref_params)) in enumerate(
        zip(history, ref_history, strict=True)
    ):
        for n in SPARSE:
            np.testing.assert_array_equal(masks[n], ref_masks[n], err_msg=f"mask {n} step {t}")
        for n in SHAPES:
            np.testing.assert_allclose(
                params[n], ref_params[n], rtol=1e-5, atol=1e-6, err_msg=f"{n} step {t}"
            )


def assert_zero_outside_masks(history):
    """From the first update on, every weight outside M is exactly 0 (and so never moves)."""
    for t, (masks, params, state) in enumerate(history[1:], start=1):
        for n in SPARSE:
            assert not np.any(params[n][~masks[n]]), f"{n} nonzero outside mask at step {t}"
        momentum = state.inner_state[0].trace
        for n in SPARSE:
            assert not np.any(np.asarray(momentum[n])[~masks[n]]), f"momentum {n} step {t}"


def counts(history):
    return [{n: int(m[n].sum()) for n in SPARSE} for m, _, _ in history]


SGD = optax.sgd(LR, momentum=BETA)


def test_static_sparse_keeps_its_random_mask_and_matches_reference():
    tx = baselines.static_sparse(SGD, sparsity=0.8, seed=3)
    history = run(tx, 6)
    masks0 = history[0][0]
    expected = {n: max(1, reference.round_half_up(0.2 * math.prod(SHAPES[n]))) for n in SPARSE}
    assert all(c == expected for c in counts(history))
    assert_matches_reference(history, reference_run(masks0, 6, lambda *a: None))
    assert_zero_outside_masks(history)
    other_seed = tk.get_masks(
        baselines.static_sparse(SGD, sparsity=0.8, seed=4).init(make_params()[0])
    ).forward
    assert any(np.any(np.asarray(other_seed[n]) != masks0[n]) for n in SPARSE)


def test_dense_is_the_inner_optimizer():
    history = run(baselines.dense(SGD), 3)
    params, target = make_params()
    state = SGD.init(params)
    for _ in range(3):
        updates, state = SGD.update(jax.grad(loss_fn)(params, target), state, params)
        params = optax.apply_updates(params, updates)
    assert all(m.all() for m in jax.tree.leaves(history[-1][0]))
    for n in SHAPES:
        np.testing.assert_allclose(history[-1][1][n], params[n], rtol=1e-6)


def pruning_counts(t, n, begin, end, freq, s_f, s_i=0.0):
    """Active weights of a leaf of n weights after t updates, from Zhu & Gupta's formula."""
    grid = [s for s in range(begin, end, freq)] + [end]
    done = [s for s in grid if s <= t]
    k = n
    for s in done:
        sparsity = (
            s_f if end == begin else s_f + (s_i - s_f) * (1 - (s - begin) / (end - begin)) ** 3
        )
        k = min(k, max(1, reference.round_half_up((1 - sparsity) * n)))
    return k


@pytest.mark.parametrize(("begin", "end", "freq"), [(2, 10, 2), (0, 7, 3)])
def test_magnitude_pruning_follows_cubic_schedule_and_reference(begin, end, freq):
    tx = baselines.magnitude_pruning(
        SGD, sparsity=0.9, begin_step=begin, end_step=end, frequency=freq
    )
    num_steps = end + 2
    history = run(tx, num_steps)
    for t, c in enumerate(counts(history)):
        for n in SPARSE:
            assert c[n] == pruning_counts(t, math.prod(SHAPES[n]), begin, end, freq, 0.9), (t, n)
    events = set(range(begin, end, freq)) | {end}

    def rule(t, name, mask, theta, grad):
        if t not in events:
            return None
        k = pruning_counts(t, math.prod(SHAPES[name]), begin, end, freq, 0.9)
        return top_k_among(theta, k, mask)

    masks0 = {
        n: top_k_among(
            np.asarray(make_params()[0][n]),
            pruning_counts(0, math.prod(SHAPES[n]), begin, end, freq, 0.9),
            np.ones(SHAPES[n], bool),
        )
        for n in SPARSE
    }
    assert_matches_reference(history, reference_run(masks0, num_steps, rule))
    assert_zero_outside_masks(history)
    for (m_before, _, _), (m_after, _, _) in zip(history, history[1:], strict=False):  # nested
        for n in SPARSE:
            assert not np.any(m_after[n] & ~m_before[n])


def rigl_drop(t, k, alpha, end):
    """RigL's ``int(n_ones · f_t)``, ``f_t`` its cosine decay over ``end`` steps."""
    fraction = alpha / 2 * (1 + math.cos(t * math.pi / end)) if t <= end else 0.0
    return int(fraction * k)


def run_drop_and_grow(make, sparsity, num_steps, **kwargs):
    """Runs SET/RigL, checks |M| = round(density · n) per leaf at every step; (history, k)."""
    history = run(make(SGD, sparsity=sparsity, **kwargs), num_steps)
    k = {n: reference.round_half_up((1 - sparsity) * math.prod(SHAPES[n])) for n in SPARSE}
    assert all(c == k for c in counts(history))
    return history, k


def test_rigl_matches_reference_with_cosine_drop_fraction():
    update_every, end, alpha = 2, 9, 0.5
    history, k = run_drop_and_grow(
        baselines.rigl,
        0.7,
        11,
        end_step=end,
        update_every=update_every,
        drop_fraction=alpha,
        seed=1,
    )
    masks0 = history[0][0]

    def rule(c, name, mask, theta, grad):  # calls 0, 2, 4, 6, 8 replace their gradient step
        if c % update_every or c > end:
            return None
        drop = rigl_drop(c, k[name], alpha, end)
        kept = top_k_among(theta, k[name] - drop, mask)
        return kept | top_k_among(grad, drop, ~kept)

    assert_matches_reference(history, reference_run(masks0, 11, rule, skip_gradient=True))
    assert_zero_outside_masks(history)
    changes = [float(tk.mask_stats(s)["mask_change"]) for _, _, s in history]
    assert changes[1] > 0 and changes[3] > 0  # refreshed at calls 0 and 2
    assert changes[-1] == changes[9]  # nothing after the last update (call 8)
    traces = [s.inner_state[0].trace for _, _, s in history]
    for before, after in ((0, 1), (2, 3)):  # a mask-update call moves no dense weight, no trace
        np.testing.assert_array_equal(history[after][1]["b"], history[before][1]["b"])
        np.testing.assert_array_equal(traces[after]["b"], traces[before]["b"])
    assert not np.any(history[1][1]["b"] == history[2][1]["b"])  # call 1 is a gradient step


def test_set_drops_smallest_and_regrows_at_random():
    update_every, end, alpha = 3, 10, 0.4
    history, k = run_drop_and_grow(
        baselines.set_,
        0.75,
        10,
        end_step=end,
        update_every=update_every,
        drop_fraction=alpha,
        seed=2,
    )
    masks0 = history[0][0]
    jax_masks = [m for m, _, _ in history]
    grew_outside_old = []

    def rule(t, name, mask, theta, grad):  # after the steps of calls 0, 3, 6, 9: t = 1, 4, 7, 10
        if (t - 1) % update_every or t - 1 > end:
            return None
        new = jax_masks[t][name]
        drop = int(alpha * k[name])
        kept = top_k_among(theta, k[name] - drop, mask)
        assert np.all(new[kept]), "SET must keep the k - d largest active weights"
        assert int((new & ~kept).sum()) == drop
        grew_outside_old.append(int((new & ~mask).sum()))
        return new

    assert_matches_reference(history, reference_run(masks0, 10, rule))
    assert_zero_outside_masks(history)
    assert sum(grew_outside_old) > 0  # random regrowth reaches weights never active


def test_grown_weights_start_with_zero_adam_state():
    tx = baselines.rigl(
        optax.adam(0.05), sparsity=0.7, end_step=20, update_every=2, drop_fraction=0.5, seed=5
    )
    history = run(tx, 4)
    (m1, _, _), (m2, p2, s2) = history[2], history[3]  # the mask update of call 2
    # Calls 0 and 2 replace their gradient step: Adam's count (its bias correction, any optax
    # schedule inside it) counts gradient steps only, as RigL's global_step.
    assert [int(s.inner_state[0].count) for _, _, s in history] == [0, 0, 1, 1, 2]
    mu, nu = s2.inner_state[0].mu, s2.inner_state[0].nu
    for n in SPARSE:
        grown = m2[n] & ~m1[n]
        assert grown.any()
        assert not np.any(np.asarray(mu[n])[grown]) and not np.any(np.asarray(nu[n])[grown])
        assert not np.any(p2[n][grown])
        assert not np.any(np.asarray(mu[n])[~m2[n]]) and not np.any(np.asarray(nu[n])[~m2[n]])
        assert np.any(np.asarray(nu[n])[m2[n] & m1[n]])  # kept weights keep their moments


def test_erk_counts_and_helpers_inside_optax_wrappers():
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        baselines.rigl(
            optax.adam(0.05), sparsity=0.8, end_step=6, update_every=2, distribution="erk"
        ),
    )
    tx = optax.MultiSteps(tx, every_k_schedule=1)
    history = run(tx, 3)
    shapes = [SHAPES[n] for n in SPARSE]
    densities = reference.erk_densities(shapes, 0.2)
    want = {
        n: max(1, reference.round_half_up(d * math.prod(SHAPES[n])))
        for n, d in zip(SPARSE, densities, strict=True)
    }
    assert all(c == want for c in counts(history))
    masks, params, state = history[-1]
    assert masks["b"] is None
    stats = tk.mask_stats(state)
    total = sum(want.values()) / sum(math.prod(SHAPES[n]) for n in SPARSE)
    assert float(stats["forward_density"]) == pytest.approx(total)
    assert float(stats["backward_density"]) == pytest.approx(total)
    assert float(tk.exploration_penalty(params, state)) == 0.0
    alpha = tk.forward_params(params, state)
    for n in SPARSE:
        np.testing.assert_array_equal(np.asarray(alpha[n]), np.where(masks[n], params[n], 0))


def test_orbax_restore_continues_identically(tmp_path):
    import orbax.checkpoint as ocp

    tx = baselines.set_(SGD, sparsity=0.75, end_step=10, update_every=2, seed=2)
    params, target = make_params()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(tk.forward_params(params, state), target)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
        ckpt.wait_until_finished()
        abstract = jax.eval_shape(lambda: {"params": params, "opt_state": state})
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    assert isinstance(tk.find_sparse_state(restored["opt_state"]), baselines.BaselineState)
    a, b = (params, state), (restored["params"], restored["opt_state"])
    for _ in range(3):  # crosses the mask update after call 2 (random regrowth included)
        a, b = step(*a), step(*b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
