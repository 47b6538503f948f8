"""Where a Top-KAST refresh's compile time goes, beside the dense step, measured in one run.

Issue 8 asks for a Top-KAST step that compiles in at most 1.5× the dense step's time.  On XLA's
CPU backend compile time grows with the kernels the program holds (each fusion is an LLVM
module of its own), though small ones cost little.  So this script compiles, for each of
``scripts/benchmark_step.py``'s models (clip + Adam, 0.8/0.5, ``refresh_every=100``, params and
state donated), the programs a refresh is made of and prints for each the CPU seconds of
``compile()`` (the least of ``--repeats`` fresh compiles, after one discarded warm-up), the
kernels of the compiled program and the ratio to the dense step's compile:

* ``dense step``, ``no-refresh step`` (``refresh_masks=False``), ``refresh step``
  (``refresh_masks=True``) and ``refresh program`` (``tk.refresh_sets(tx)`` alone);
* ``selection, cold`` and ``selection, guessed``: ``streaming.leaf_thresholds`` of every sparse
  leaf without and with the warm start's guesses (what the refresh selects with);
* ``packing``: the 2-bit codes of every sparse leaf from given thresholds;
* ``one scatter pass``: one loop over every sparse leaf in chunks of ``streaming.CHUNK``, picked
  by a ``lax.switch``, scatter-adding the high 16 bits of ``|θ|``'s keys into a histogram: the
  least an exact histogram selection compiles (it needs at least this pass, and two of them
  share this loop body).

Below the rows: the compile time the goal leaves for the refresh (1.5 × dense − no-refresh
step), what the refresh adds in the step (refresh − no-refresh step), and the floor
(one scatter pass + packing).  No timing is asserted anywhere; the figures go to BENCHMARKS.md.

Usage:
  .venv/bin/python scripts/benchmark_compile.py                  # both models, ~3 minutes
  .venv/bin/python scripts/benchmark_compile.py --models=mlp --width=512 --repeats=1
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark_step as bs  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import lax  # noqa: E402

import topkast_jax as tk  # noqa: E402
from topkast_jax import sparsify as sparsify_lib  # noqa: E402
from topkast_jax import streaming  # noqa: E402
from topkast_jax.plan import layer_densities  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "Fresh compiles per program; the least CPU time is printed.")

GOAL = 1.5
FORWARD, BACKWARD = 0.8, 0.5  # the sparsities of every row
#: XLA instructions that become kernels of their own in the compiled CPU program.
_KERNEL = re.compile(r"\s*(?:ROOT )?%\S+ = \S+ (fusion|scatter|sort|dot|custom-call|copy)\(")


@dataclasses.dataclass
class Compiled:
    """The least compile CPU time of a program and its kernel count."""

    seconds: float
    kernels: int


def kernel_count(compiled: Any) -> int:
    """Kernels of a compiled program: its fusions, scatters, sorts, dots, custom calls, copies."""
    return sum(1 for line in compiled.as_text().splitlines() if _KERNEL.match(line))


def compile_cost(make: Callable[[], Any], args: Sequence[Any], repeats: int) -> Compiled:
    """``make()`` (a new ``jax.jit`` each call, so no cache hit) compiled for ``args``: one
    warm-up compile discarded, then the least CPU seconds of ``repeats`` compiles."""
    make().lower(*args).compile()
    seconds, compiled = bs.least_compile(make, args, repeats)
    return Compiled(seconds, kernel_count(compiled))


def one_scatter_pass(xs: Sequence[jax.Array]) -> jax.Array:
    """int32 ``[len(xs) · 65536]``: per leaf, how many weights have each high 16 bits of their
    magnitude key — one ``fori_loop`` over chunks of ``CHUNK`` weights.  A compile-time floor,
    not a selection: a leaf's last chunk overlaps the one before and a leaf smaller than a chunk
    is repeated to fill it, so those counts are not exact."""
    chunk = streaming.CHUNK
    flat = [x.reshape(-1) for x in xs]
    table = jnp.asarray(
        [(i, j) for i, x in enumerate(flat) for j in range(max(1, -(-x.size // chunk)))],
        jnp.int32,
    )

    def take(x: jax.Array) -> Callable[[jax.Array], jax.Array]:
        size = min(chunk, x.size)
        return lambda j: jnp.resize(lax.dynamic_slice_in_dim(x, j * size, size), chunk)

    branches = [take(x) for x in flat]

    def body(t, hist):
        part = lax.switch(table[t, 0], branches, table[t, 1])
        digit = lax.bitcast_convert_type(jnp.abs(part), jnp.int32) >> 16
        return hist.at[table[t, 0] * 65536 + digit].add(1)

    return lax.fori_loop(0, table.shape[0], body, jnp.zeros(len(xs) * 65536, jnp.int32))


def programs(problem: bs.Problem) -> dict[str, tuple[Callable[[], Any], tuple]]:
    """Name → (a new jitted program, its arguments) for every row."""
    inner = bs.inner_optimizer()
    tx = tk.topkast(
        inner,
        forward_sparsity=FORWARD,
        backward_sparsity=BACKWARD,
        exploration_l2=1e-4,
        refresh_every=100,
    )
    state = jax.jit(tx.init)(problem.params)
    dense_state = jax.jit(inner.init)(problem.params)
    plan = layer_densities(
        problem.params,
        sparsify=sparsify_lib.default(),
        forward_sparsity=FORWARD,
        backward_sparsity=BACKWARD,
        distribution="uniform",
        layer_axis=None,
    )
    pairs = [(x, p) for x, p in zip(jax.tree.leaves(problem.params), plan, strict=True) if p.sparse]
    xs = [x for x, _ in pairs]
    k_a, k_b = [p.k_forward for _, p in pairs], [p.k_backward for _, p in pairs]
    thresholds = jax.jit(lambda xs: streaming.leaf_thresholds(xs, k_a, k_b))(xs)
    guess = streaming.leaf_keys(thresholds)
    step_args = (problem.params, state, problem.batch)

    return {
        "dense step": (
            bs.donated_jit(bs.dense_step(problem, inner)),
            (problem.params, dense_state, problem.batch),
        ),
        "no-refresh step": (bs.donated_jit(bs.topkast_step(problem, tx, False)), step_args),
        "refresh step": (bs.donated_jit(bs.topkast_step(problem, tx, True)), step_args),
        "refresh program": (bs.donated_jit(bs.refresh_program(tx)), step_args),
        "selection, cold": (
            lambda: jax.jit(lambda xs: streaming.leaf_thresholds(xs, k_a, k_b)),
            (xs,),
        ),
        "selection, guessed": (
            lambda: jax.jit(lambda xs, g: streaming.leaf_thresholds(xs, k_a, k_b, guess=g)),
            (xs, guess),
        ),
        "packing": (
            lambda: jax.jit(
                lambda xs, th: [
                    streaming.codes_from_thresholds(x, t) for x, t in zip(xs, th, strict=True)
                ]
            ),
            (xs, thresholds),
        ),
        "one scatter pass": (lambda: jax.jit(lambda xs: one_scatter_pass(xs)), (xs,)),
    }


def report(problem: bs.Problem, repeats: int) -> None:
    print(f"\n## {problem.name}")
    print(f"{'program':22s} {'compile CPU-s':>13s} {'/dense':>7s} {'kernels':>8s}")
    rows = {}
    for name, (make, args) in programs(problem).items():
        rows[name] = compile_cost(make, args, repeats)
        ratio = rows[name].seconds / rows["dense step"].seconds
        print(f"{name:22s} {rows[name].seconds:13.3f} {ratio:6.2f}x {rows[name].kernels:8d}")
    dense = rows["dense step"].seconds
    budget = GOAL * dense - rows["no-refresh step"].seconds
    added = rows["refresh step"].seconds - rows["no-refresh step"].seconds
    floor = rows["one scatter pass"].seconds + rows["packing"].seconds
    print(
        f"left for the refresh at {GOAL}x the dense step: {budget:.3f} s; the refresh adds "
        f"{added:.3f} s in the step; floor (one scatter pass + packing): {floor:.3f} s"
    )


def main(argv: Sequence[str]) -> None:
    del argv
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0]}")
    for name in bs.FLAGS.models:
        problem = bs.mlp_problem(bs.FLAGS.width) if name == "mlp" else bs.txl_problem()
        report(problem, FLAGS.repeats)


if __name__ == "__main__":
    app.run(main)
