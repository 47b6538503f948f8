"""The selection of a refresh with and without the warm start, side by side in one run.

For each model of ``scripts/benchmark_step.py`` (the 4 × Dense(4096) MLP, the 6-layer
Transformer-XL) it trains a few Top-KAST steps (forward/backward sparsity 0.8/0.5,
``optax.chain(clip_by_global_norm(1.0), adam(1e-4))``, refresh every step) and takes the params
of the last three: the thresholds' keys of the first two make the history
(:mod:`topkast_jax.warm_start`), from which the selection of the third guesses.  It then times
``streaming.leaf_thresholds`` of the third params cold (no guesses) and warm (the guesses),
alternated (A B A B …), checks that both give the same thresholds, and prints:

* how far the keys moved in the last step and how far the guesses missed (units of the last
  place of float32, median and max over every slice and set), and the share of slices whose
  two keys both lie within ``WINDOW_HALF`` of their guesses (those skip the key's digit passes);
* the median and min–max of the per-pair ratios warm / cold, and the medians in ms.

Usage:
  .venv/bin/python scripts/benchmark_warm_start.py --pairs=9      # both models, ~3 min on 2 cores
  .venv/bin/python scripts/benchmark_warm_start.py --models=txl --pairs=15
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark_step  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import topkast_jax as tk  # noqa: E402
from topkast_jax import distributions, streaming, warm_start  # noqa: E402

FLAGS = flags.FLAGS
# --models (mlp, txl) and --pairs (timed pairs per model) are benchmark_step's flags.
flags.DEFINE_integer("steps", 3, "Training steps before the three params are taken (at least 0).")


def kernels(params) -> list[jax.Array]:
    """The sparse leaves of the default ``sparsify`` (Flax ``kernel`` / ``embedding``)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    chosen = jax.tree.leaves(tk.sparsify.default()(params))
    return [x for (_, x), sparse in zip(flat, chosen, strict=True) if sparse]


def trained_params(problem: benchmark_step.Problem, steps: int) -> list:
    """The params after ``steps``, ``steps + 1`` and ``steps + 2`` Top-KAST steps."""
    tx = tk.topkast(
        benchmark_step.inner_optimizer(),
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        exploration_l2=1e-4,
    )
    step = jax.jit(benchmark_step.topkast_step(problem, tx))
    params, state = problem.params, tx.init(problem.params)
    taken = [params]
    for _ in range(steps + 2):
        params, state, _ = step(params, state, problem.batch)
        taken = [*taken[-2:], params]
    return taken


def ulps(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, np.int64) - np.asarray(b, np.int64)).ravel()


def run(name: str) -> None:
    problem = benchmark_step.mlp_problem(4096) if name == "mlp" else benchmark_step.txl_problem()
    first, second, third = (kernels(p) for p in trained_params(problem, FLAGS.steps))
    k_a, k_b = zip(*(distributions.mask_counts(0.2, 0.5, x.size) for x in third), strict=True)
    select = jax.jit(lambda xs, g: streaming.leaf_thresholds(xs, list(k_a), list(k_b), None, g))
    older, latest = (streaming.leaf_keys(select(xs, None)) for xs in (first, second))
    guess = warm_start.guess(warm_start.push(warm_start.start(older), latest))
    cold = streaming.leaf_keys(select(third, None))
    for c, w in zip(select(third, None), select(third, guess), strict=True):
        assert np.array_equal(c.key, w.key) and np.array_equal(c.cut, w.cut), "thresholds differ"
    moved, missed = ulps(cold, latest), ulps(cold, guess)
    held = np.mean(np.all(missed.reshape(-1, 2) <= streaming.WINDOW_HALF, axis=1))

    def timed(args) -> float:
        start = time.perf_counter()
        jax.block_until_ready(select(third, args))
        return time.perf_counter() - start

    times = {"cold": [], "warm": []}
    for _ in range(FLAGS.pairs):
        times["cold"].append(timed(None))
        times["warm"].append(timed(guess))
    ratios = [w / c for w, c in zip(times["warm"], times["cold"], strict=True)]
    print(f"## {problem.name}: {len(third)} sparse leaves, {sum(x.size for x in third):,} weights")
    print(
        f"keys moved in the last step: median {np.median(moved):,.0f}, max {moved.max():,} ulps; "
        f"guesses missed by: median {np.median(missed):,.0f}, max {missed.max():,} ulps"
    )
    print(f"slices whose two keys lie within {streaming.WINDOW_HALF:,} of the guesses: {held:.0%}")
    print(
        f"warm / cold selection: {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}–{max(ratios):.3f}); cold {1e3 * statistics.median(times['cold']):.1f}"
        f" ms, warm {1e3 * statistics.median(times['warm']):.1f} ms (medians of {FLAGS.pairs})"
    )


def main(argv) -> None:
    del argv
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    for name in FLAGS.models:
        run(name)


if __name__ == "__main__":
    app.run(main)
