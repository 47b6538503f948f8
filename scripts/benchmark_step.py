"""Cost of one Top-KAST training step beside the dense step it replaces, measured in one run.

For each model (a 4 × Dense(4096) MLP with 67M weights at batch 32, and a 6-layer Transformer-XL
with d_model 512 at sequence 128, batch 8), with ``optax.chain(clip_by_global_norm, adam)`` and
the params and optimizer state donated, it compiles the README's step

    alpha = tk.forward_params(params, opt_state)
    grads = jax.grad(loss)(alpha, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

and the dense optax step, and prints from XLA's compiled analysis (deterministic):

* peak MiB: argument + temp bytes of the donated step (``memory_analysis()``);
* persistent MiB: params + optimizer state between steps;
* GiB accessed: ``cost_analysis()["bytes accessed"]``.  XLA counts the body of a ``while`` loop
  once; the streaming selection runs in such loops, so the column "+loops" adds, for every
  refresh, the bytes the selection really reads: one pass per histogram plus the tie pass when it
  runs, i.e. ``2 × 4 bytes`` per sparse weight (an upper bound: ties rarely straddle);
* compile s: CPU seconds this process spends in ``compile()`` (XLA's compiler threads
  included; unlike wall time it does not grow with other jobs on a shared machine, though it
  still varies by up to 2× under load), after one discarded warm-up compile of the dense step
  (backend start-up, GPU autotuning); with ``--compile_repeats=N`` the least of N compiles;
* wall-time ratio Top-KAST / dense: the two compiled steps run alternately (A B A B ...), the
  median of the per-pair ratios with min–max.

Configurations: forward/backward sparsity 0.8/0.5 and 0.9/0.8, ``refresh_every`` 1 and 100.
At 100 the step is shown three ways: ``cond`` (``tx.update`` decides with ``lax.cond``, the
default), ``no-refresh`` (``refresh_masks=False``: what 99 of 100 steps cost when the loop
compiles the two cases apart) and ``refresh`` (``refresh_masks=True``); "amortised" is
``(99 · no-refresh + refresh) / 100`` of the wall-time ratios.  A fourth row, ``program``, is
``tk.refresh_sets(tx)`` compiled alone (params and state donated): its peak, bytes and compile
time, and as wall ratio the no-refresh step followed by the program against one dense step.
Below them: the CPU seconds a loop at refresh 100 compiles — two steps, or the no-refresh step
and the program — and the amortised wall ratio either way.

Usage:
  .venv/bin/python scripts/benchmark_step.py                 # both models, ~5 minutes on 2 cores
  .venv/bin/python scripts/benchmark_step.py --models=mlp --pairs=3
  .venv/bin/python scripts/benchmark_step.py --width=512     # a small MLP (quick check)
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import topkast_jax as tk  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "txl"], "Which models: mlp, txl.")
flags.DEFINE_integer("width", 4096, "MLP width (4 layers of width × width).")
flags.DEFINE_integer("pairs", 5, "Timed A/B pairs per configuration (0: no wall time).")
flags.DEFINE_list("sparsities", ["0.8/0.5", "0.9/0.8"], "forward/backward sparsity pairs.")
flags.DEFINE_integer(
    "compile_repeats", 1, "Compile each step this many times (freshly traced); the least CPU time."
)

MiB = 2**20
GiB = 2**30


@dataclasses.dataclass
class Problem:
    """A model's params, one batch and ``loss(params, batch) -> scalar``."""

    name: str
    params: Any
    batch: Any
    loss: Callable[[Any, Any], jax.Array]


def mlp_problem(width: int, layers: int = 4, batch: int = 32) -> Problem:
    """``layers`` × Dense(width) with ReLU, squared error; all kernels sparse."""
    keys = jax.random.split(jax.random.PRNGKey(0), layers + 1)
    params = {
        f"layer_{i}": {
            "kernel": jax.random.normal(keys[i], (width, width)) / width**0.5,
            "bias": jnp.zeros(width),
        }
        for i in range(layers)
    }
    x_BxW = jax.random.normal(keys[-1], (batch, width))

    def loss(params, batch_):
        h_BxW, y_BxW = batch_
        for i in range(layers):
            h_BxW = h_BxW @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"]
            if i < layers - 1:
                h_BxW = jax.nn.relu(h_BxW)
        return jnp.mean((h_BxW - y_BxW) ** 2)

    return Problem(f"MLP 4x{width}", params, (x_BxW, x_BxW), loss)


def txl_problem(layers: int = 6, d_model: int = 512, seq: int = 128, batch: int = 8) -> Problem:
    """The experiments' Transformer-XL (byte vocabulary, memory = sequence length)."""
    from experiments.language_model.models import TransformerXL

    model = TransformerXL(
        vocab_size=256, num_layers=layers, d_model=d_model, num_heads=8, d_ff=4 * d_model
    )
    tokens_BxT = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0, 256)
    mems = jnp.zeros((layers, batch, seq, d_model))
    params = model.init(jax.random.PRNGKey(0), tokens_BxT, tokens_BxT, mems)["params"]

    def loss(params, batch_):
        inputs_BxT, mems_ = batch_
        nll_BxT, _ = model.apply({"params": params}, inputs_BxT, inputs_BxT, mems_)
        return nll_BxT.mean()

    return Problem(f"Transformer-XL {layers}L d{d_model}", params, (tokens_BxT, mems), loss)


def inner_optimizer() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4))


def dense_step(problem: Problem, tx: optax.GradientTransformation):
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(problem.loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def topkast_step(problem: Problem, tx: optax.GradientTransformation, refresh_masks=None):
    def step(params, opt_state, batch):
        alpha = tk.forward_params(params, opt_state)
        loss, grads = jax.value_and_grad(problem.loss)(alpha, batch)
        updates, opt_state = tx.update(grads, opt_state, params, refresh_masks=refresh_masks)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def refresh_program(tx: optax.GradientTransformation):
    """``tk.refresh_sets(tx)`` with a step's signature: the state refreshed from the params
    (donated like a step's, returned unchanged) and a zero loss."""
    refresh = tk.refresh_sets(tx)

    def program(params, opt_state, batch):
        del batch
        return params, refresh(opt_state, params), jnp.zeros(())

    return program


@dataclasses.dataclass
class Then:
    """Two compiled programs run one after the other, called like one compiled step."""

    first: Any
    second: Any

    def __call__(self, params, opt_state, batch):
        params, opt_state, loss = self.first(params, opt_state, batch)
        params, opt_state, _ = self.second(params, opt_state, batch)
        return params, opt_state, loss


@dataclasses.dataclass
class Measured:
    compiled: Any
    peak: float
    persistent: float
    accessed: float
    compile_s: float


def nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def donated_jit(step) -> Callable[[], Any]:
    """A maker of ``jax.jit(step)`` with params and state donated, a new function each call
    (so that a second compile is not a cache hit)."""
    return lambda: jax.jit(functools.partial(step), donate_argnums=(0, 1))


def least_compile(make: Callable[[], Any], args: Sequence[Any], repeats: int) -> tuple[float, Any]:
    """``(seconds, compiled)``: the least CPU seconds of ``repeats`` compiles of
    ``make().lower(*args)`` (``make`` returns a new ``jax.jit`` each call) and the last
    compiled program."""
    seconds, compiled = float("inf"), None
    for _ in range(max(1, repeats)):
        lowered = make().lower(*args)
        start = time.process_time()  # CPU seconds of this process: robust to other jobs' load
        compiled = lowered.compile()
        seconds = min(seconds, time.process_time() - start)
    return seconds, compiled


def measure(step, params, opt_state, batch) -> Measured:
    """Compile the donated step and read XLA's memory and cost analysis."""
    compile_s, compiled = least_compile(
        donated_jit(step), (params, opt_state, batch), FLAGS.compile_repeats
    )
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Measured(
        compiled=compiled,
        peak=(memory.argument_size_in_bytes + memory.temp_size_in_bytes) / MiB,
        persistent=(nbytes(params) + nbytes(opt_state)) / MiB,
        accessed=cost["bytes accessed"] / GiB,
        compile_s=compile_s,
    )


def wall_ratios(dense: Measured, other: Measured, problem: Problem, states, pairs: int):
    """Per-pair wall-time ratios ``other / dense`` of alternating calls (after one warm-up)."""
    (dp, ds), (op, os_) = states

    def timed(compiled, params, state):
        start = time.perf_counter()
        params, state, loss = compiled(params, state, problem.batch)
        jax.block_until_ready((params, state, loss))
        return time.perf_counter() - start, params, state

    _, dp, ds = timed(dense.compiled, dp, ds)
    _, op, os_ = timed(other.compiled, op, os_)
    ratios = []
    for _ in range(pairs):
        t_dense, dp, ds = timed(dense.compiled, dp, ds)
        t_other, op, os_ = timed(other.compiled, op, os_)
        ratios.append(t_other / t_dense)
    return ratios


def fresh(tree):
    """A copy of ``tree`` (donation consumes the buffers a step is called with)."""
    return jax.tree.map(jnp.copy, tree)


def selection_bytes(plan: list[tk.LeafDensity]) -> float:
    """GiB the streaming selection reads per refresh beyond XLA's once-counted loop bodies."""
    return sum(2 * 4 * leaf.size for leaf in plan if leaf.sparse) / GiB


def row(label: str, m: Measured, dense: Measured, extra_gib: float, ratios) -> str:
    if ratios:
        wall = f"{statistics.median(ratios):6.3f} ({min(ratios):.3f}–{max(ratios):.3f})"
    else:
        wall = "     -"
    return (
        f"{label:26s} {m.peak:9.1f} {m.peak / dense.peak:6.3f}x {m.persistent:9.1f} "
        f"{m.persistent - dense.persistent:+8.2f} {m.accessed:7.2f} "
        f"{m.accessed / dense.accessed:6.3f}x "
        f"{(m.accessed + extra_gib) / dense.accessed:6.3f}x {m.compile_s:6.2f} "
        f"{m.compile_s / dense.compile_s:5.2f}x  {wall}"
    )


def print_split(measured: dict[str, Measured], dense: Measured, wall: dict[str, float]) -> None:
    """At refresh 100, what a loop compiles and runs: two steps (``refresh_masks`` False and
    True), or the no-refresh step and ``tk.refresh_sets``' program after every 100th."""
    two_steps = measured["no-refresh"].compile_s + measured["refresh"].compile_s
    with_program = measured["no-refresh"].compile_s + measured["program"].compile_s
    print(
        f"{'':26s} compiled by a loop: two steps {two_steps:.2f} s "
        f"({two_steps / dense.compile_s:.2f}x), step + program {with_program:.2f} s "
        f"({with_program / dense.compile_s:.2f}x)"
    )
    if {"no-refresh", "refresh", "program"} <= wall.keys():
        in_step = (99 * wall["no-refresh"] + wall["refresh"]) / 100
        split = (99 * wall["no-refresh"] + wall["program"]) / 100
        print(
            f"{'':26s} amortised wall ratio at refresh 100: {in_step:.3f} "
            f"(in-step refresh), {split:.3f} (program)"
        )


def run_problem(problem: Problem, pairs: int) -> None:
    print(f"\n## {problem.name}: {nbytes(problem.params) / MiB:.1f} MiB of params", flush=True)
    inner = inner_optimizer()
    dense_state = inner.init(problem.params)
    # A first compile pays the backend's start-up (and GPU autotuning of the model's matmuls)
    # once; it is discarded so the dense step's compile time is its own.
    measure(dense_step(problem, inner), problem.params, dense_state, problem.batch)
    dense = measure(dense_step(problem, inner), problem.params, dense_state, problem.batch)
    header = (
        f"{'step':26s} {'peak MiB':>9s} {'/dense':>7s} {'persist':>9s} {'+MiB':>8s} "
        f"{'GiB acc':>7s} {'/dense':>7s} {'+loops':>7s} {'comp s':>6s} {'/dense':>6s}  "
        "wall ratio median (min–max)"
    )
    print(header)
    print("-" * len(header))
    print(row("dense optax", dense, dense, 0.0, []), flush=True)
    for pair in FLAGS.sparsities:
        fs, bs = (float(v) for v in pair.split("/"))
        plan = tk.layer_densities(
            problem.params, sparsify=tk.sparsify.kernels(), forward_sparsity=fs,
            backward_sparsity=bs,
        )  # fmt: skip
        extra = selection_bytes(plan)
        for refresh_every in (1, 100):
            tx = tk.topkast(
                inner, forward_sparsity=fs, backward_sparsity=bs, exploration_l2=1e-4,
                refresh_every=refresh_every,
            )  # fmt: skip
            state = jax.jit(tx.init)(problem.params)
            variants = [("cond", None, extra)] if refresh_every == 1 else [
                ("cond", None, extra), ("no-refresh", False, 0.0), ("refresh", True, extra),
                ("program", "program", extra),
            ]  # fmt: skip
            wall: dict[str, float] = {}
            measured: dict[str, Measured] = {}
            for name, refresh_masks, extra_gib in variants:
                if refresh_masks == "program":
                    step = refresh_program(tx)
                else:
                    step = topkast_step(problem, tx, refresh_masks)
                m = measured[name] = measure(step, problem.params, state, problem.batch)
                ratios = []
                if pairs:
                    states = ((fresh(problem.params), fresh(dense_state)),
                              (fresh(problem.params), fresh(state)))  # fmt: skip
                    timed = m
                    if name == "program":  # the step it follows, then the program
                        timed = dataclasses.replace(
                            m, compiled=Then(measured["no-refresh"].compiled, m.compiled)
                        )
                    ratios = wall_ratios(dense, timed, problem, states, pairs)
                    wall[name] = statistics.median(ratios)
                label = f"{fs}/{bs} r{refresh_every} {name if refresh_every > 1 else ''}"
                print(row(label, m, dense, extra_gib, ratios), flush=True)
            if refresh_every > 1:
                print_split(measured, dense, wall)


def main(argv):
    del argv
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    builders = {"mlp": functools.partial(mlp_problem, FLAGS.width), "txl": txl_problem}
    for name in FLAGS.models:
        run_problem(builders[name](), FLAGS.pairs)


if __name__ == "__main__":
    app.run(main)
