"""Always-sparse Top-KAST beside the masked and dense steps: device memory and refresh cost.

The model is ``scripts/benchmark_step.py``'s 4 × Dense(4096) MLP (67M weights, all kernels
sparse, batch 32) with ``optax.chain(clip_by_global_norm, adam)``.  For each forward/backward
sparsity it prints, from XLA's compiled memory analysis (deterministic, no run needed):

* dense optax step and masked ``tk.topkast`` step (``refresh_every=100``, its ``lax.cond``
  holding the refresh): persistent MiB (params + optimizer state) and peak MiB (argument + temp
  of the donated step);
* ``tk.AlwaysSparse`` device step, for any ``loss_fn``: persistent MiB on
  the device (``device_bytes_per_leaf``, equal to ``device_bytes`` of a real state), its ratio to
  the floor ``Σ k_B × (4 value + 4 index + 8 Adam) + k_B/8 (A-flag bits) + dense leaves``, peak
  MiB and the peak's ratio to the dense step;
* the same for the MLP written in Flax Linen with
  ``topkast_jax.always_sparse_linen.layerwise(nn.Dense)`` and ``lazy_alpha=True`` (each layer's
  dense ``α`` built inside that layer and rebuilt in its backward pass);

and then, on real weights, the wall time of one dense optax step, one always-sparse step and one
refresh (device → host, exact host selection of every leaf, host → device), interleaved, medians,
the refresh also in ms per million weights.

``--budget_mib`` adds the device-budget demonstration: the byte cap is enforced on XLA's compiled
figures (the dense step's peak exceeds it, the always-sparse step's peak and state fit), then the
always-sparse model trains ``--train_steps`` steps and prints its loss.

Usage::

  .venv/bin/python scripts/benchmark_always_sparse.py                 # ~3 min on 2 CPU cores
  .venv/bin/python scripts/benchmark_always_sparse.py --budget_mib=700 --train_steps=10
  .venv/bin/python scripts/benchmark_always_sparse.py --width=512 --timed_steps=1   # quick check
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark_step as bench  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import topkast_jax as tk  # noqa: E402

FLAGS = flags.FLAGS
# --width and --sparsities are benchmark_step.py's flags (same model, same sparsity pairs).
flags.DEFINE_integer("timed_steps", 3, "Timed always-sparse steps and refreshes (0: none).")
flags.DEFINE_integer("budget_mib", 0, "Device budget for the demonstration (0: skip it).")
flags.DEFINE_integer("train_steps", 10, "Steps trained within the budget.")

MiB = 2**20


def compiled_peak(compiled: Any) -> float:
    """Argument + temp MiB of a compiled (donated) step."""
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / MiB


def floor_mib(sparse: tk.AlwaysSparse, params: Any) -> float:
    """``Σ k_B (4 + 4 + inner bytes per weight) + k_B/8`` plus dense leaves and their state."""
    per_leaf = sparse.device_bytes_per_leaf(params)
    flags_bytes = sum(leaf.k_backward for leaf in sparse.plan(params) if leaf.sparse)
    return (sum(per_leaf.values()) - flags_bytes + flags_bytes / 8) / MiB


def always_sparse_peak(sparse: tk.AlwaysSparse, loss: Any, params: Any, batch: Any) -> float:
    """Peak MiB of the donated always-sparse device step, lowered on abstract state."""
    abstract = sparse.abstract_state(params)
    step = sparse.make_device_step(loss, abstract)
    return compiled_peak(step.lower(abstract.device, batch).compile())


def linen_mlp(problem: bench.Problem) -> tuple[Any, Any]:
    """The same MLP in Flax Linen with ``always_sparse_linen.layerwise(nn.Dense)`` layers:
    ``(loss(params, batch), abstract params)``."""
    import flax.linen as nn

    from topkast_jax import always_sparse_linen

    dense = always_sparse_linen.layerwise(nn.Dense)
    x_BxW, _ = problem.batch
    width, layers = x_BxW.shape[-1], len(problem.params)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, h_BxW):
            for i in range(layers):
                h_BxW = dense(width)(h_BxW)
                h_BxW = nn.relu(h_BxW) if i < layers - 1 else h_BxW
            return h_BxW

    def loss(params, batch):
        h_BxW, y_BxW = batch
        return jnp.mean((MLP().apply({"params": params}, h_BxW) - y_BxW) ** 2)

    params = jax.eval_shape(MLP().init, jax.random.PRNGKey(0), x_BxW)["params"]
    return loss, params


def memory_rows(problem: bench.Problem, fs: float, bs: float) -> list[str]:
    """The memory table rows of one sparsity pair."""
    inner = bench.inner_optimizer()
    dense = bench.measure(
        bench.dense_step(problem, inner), problem.params, inner.init(problem.params), problem.batch
    )
    tx = tk.topkast(inner, forward_sparsity=fs, backward_sparsity=bs, refresh_every=100)
    masked = bench.measure(
        bench.topkast_step(problem, tx),
        problem.params,
        jax.eval_shape(tx.init, problem.params),
        problem.batch,
    )
    rows = [
        f"{'dense optax step':38s} {dense.persistent:10.1f} {'':>8s} {dense.peak:9.1f} {1:8.2f}",
        f"{'masked tk.topkast (refresh 100)':38s} {masked.persistent:10.1f} {'':>8s} "
        f"{masked.peak:9.1f} {masked.peak / dense.peak:8.2f}",
    ]
    linen_loss, linen_params = linen_mlp(problem)
    cases = [
        ("always-sparse, any loss_fn", problem.loss, problem.params, False),
        ("always-sparse, Linen layerwise alpha", linen_loss, linen_params, True),
    ]
    for label, loss, params, lazy in cases:
        sparse = tk.AlwaysSparse(inner, forward_sparsity=fs, backward_sparsity=bs, lazy_alpha=lazy)
        persistent = sum(sparse.device_bytes_per_leaf(params).values()) / MiB
        floor = floor_mib(sparse, params)
        peak = always_sparse_peak(sparse, loss, params, problem.batch)
        rows.append(
            f"{label:38s} {persistent:10.1f} {persistent / floor:8.3f} {peak:9.1f} "
            f"{peak / dense.peak:8.2f}"
        )
    return rows


def timing_rows(problem: bench.Problem, fs: float, bs: float, repeats: int) -> list[str]:
    """Wall time of one always-sparse step and of one refresh, on real weights."""
    inner = bench.inner_optimizer()
    sparse = tk.AlwaysSparse(inner, forward_sparsity=fs, backward_sparsity=bs, refresh_every=10**9)
    params = jax.tree.map(np.asarray, problem.params)
    start = time.perf_counter()
    state = sparse.init(params)
    init_s = time.perf_counter() - start
    assert sparse.device_bytes(state) == sum(sparse.device_bytes_per_leaf(params).values())
    step = sparse.make_step(problem.loss)
    state, loss = step(state, problem.batch)  # compile
    loss.block_until_ready()
    dense = jax.jit(bench.dense_step(problem, inner), donate_argnums=(0, 1))
    dense_state = (bench.fresh(problem.params), inner.init(problem.params))
    dense_state = dense(*dense_state, problem.batch)[:2]  # compile
    step_s, refresh_s, dense_s = [], [], []
    for _ in range(repeats):  # interleaved, so load changes hit all three alike
        start = time.perf_counter()
        *dense_state, loss = dense(*dense_state, problem.batch)
        loss.block_until_ready()
        dense_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        state, loss = step(state, problem.batch)
        loss.block_until_ready()
        step_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        state = sparse.refresh(state)
        jax.block_until_ready(state.device)
        refresh_s.append(time.perf_counter() - start)
    dense_ms = 1e3 * statistics.median(dense_s)
    millions = sum(leaf.size for leaf in sparse.plan(params) if leaf.sparse) / 1e6
    step_ms, refresh_ms = 1e3 * statistics.median(step_s), 1e3 * statistics.median(refresh_s)
    return [
        f"init (host selection + upload) {init_s * 1e3:9.0f} ms",
        f"one dense optax step           {dense_ms:9.0f} ms   (median of {repeats})",
        f"one always-sparse step         {step_ms:9.0f} ms   = {step_ms / dense_ms:.2f} x dense",
        f"one refresh                    {refresh_ms:9.0f} ms = {refresh_ms / millions:.2f} ms "
        f"per million weights ({millions:.1f} M sparse weights); refresh / step = "
        f"{refresh_ms / step_ms:.2f}, so refresh_every=N adds {100 * refresh_ms / step_ms:.0f}%/N",
    ]


def budget_demo(problem: bench.Problem, budget_mib: int, steps: int) -> list[str]:
    """Dense + Adam does not fit ``budget_mib``; the always-sparse model trains within it."""
    inner = bench.inner_optimizer()
    dense = bench.measure(
        bench.dense_step(problem, inner),
        problem.params,
        jax.eval_shape(inner.init, problem.params),
        problem.batch,
    )
    sparse = tk.AlwaysSparse(
        inner, forward_sparsity=0.9, backward_sparsity=0.8, exploration_l2=1e-4, refresh_every=5
    )
    peak = always_sparse_peak(sparse, problem.loss, problem.params, problem.batch)
    lines = [
        f"budget {budget_mib} MiB: dense step peak {dense.peak:.0f} MiB "
        f"(params + Adam {dense.persistent:.0f} MiB) -> does not fit",
        f"always-sparse 0.9/0.8 step peak {peak:.0f} MiB -> fits",
    ]
    if dense.peak <= budget_mib or peak > budget_mib:
        raise SystemExit(
            f"budget {budget_mib} MiB does not separate the two modes:\n" + "\n".join(lines)
        )
    state = sparse.init(jax.tree.map(np.asarray, problem.params))
    if sparse.device_bytes(state) > budget_mib * MiB:
        raise SystemExit("the always-sparse state exceeds the budget")
    step = sparse.make_step(problem.loss)
    losses = []
    for _ in range(steps):
        state, loss = step(state, problem.batch)
        losses.append(float(loss))
    lines.append(
        f"trained {steps} steps within the budget (state {sparse.device_bytes(state) / MiB:.0f} "
        f"MiB on the device): loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )
    return lines


def main(argv: list[str]) -> None:
    del argv
    problem = bench.mlp_problem(FLAGS.width)
    print(f"{problem.name}: {jax.default_backend()} backend, jax {jax.__version__}")
    for pair in FLAGS.sparsities:
        fs, bs = (float(x) for x in pair.split("/"))
        print(f"\nforward/backward sparsity {fs}/{bs}")
        print(f"{'step':38s} {'persist MiB':>10s} {'/floor':>8s} {'peak MiB':>9s} {'/dense':>8s}")
        for row in memory_rows(problem, fs, bs):
            print(row)
        if FLAGS.timed_steps:
            for row in timing_rows(problem, fs, bs, FLAGS.timed_steps):
                print(row)
    if FLAGS.budget_mib:
        print()
        for line in budget_demo(problem, FLAGS.budget_mib, FLAGS.train_steps):
            print(line)


if __name__ == "__main__":
    app.run(main)
