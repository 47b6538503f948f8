"""Running an exported sparse layer (issue 12): BCOO through ``sparse.sparsify`` vs densify on load.

One Flax Linen ``nn.Dense(F)`` layer (default F = 4096: a 4096 × 4096 float32 kernel, 16.8M
weights, and a bias) on a batch of B = 32, CPU.  Its kernel is made sparse by Top-KAST's own
selection (``tk.topkast(...).init``: ``A`` = the top ``(1 − s)·F²`` weights by magnitude) at
forward sparsity s = 80/90/95%, exported with ``tk.export.sparse_params`` and run three ways,
each one jitted call of ``model.apply`` (bias add included):

* ``dense``: the dense ``θ ⊙ A`` kernel — what densify-on-load (``tk.export.densify``) runs
  after its one-off cost, which is timed separately (``densify ms``: host scatter of the values
  into zeros and the copy to the device);
* ``bcoo``: ``jax.experimental.sparse.sparsify(model.apply)`` with the kernel as a ``BCOO``
  (``tk.export.to_bcoo``), ``nse = k``;
* ``todense``: the ``BCOO`` densified inside the jitted call (``bcoo.todense()`` each call, the
  cost of keeping only the compact form on the device).

The three calls are timed in rounds (each round runs them once, in turn, after a warm-up
call each); the figure is each call's time divided by the dense call's of the same round:
median and min–max over the rounds, so machine load cancels to first order.  Also printed:
bytes on disk of the export (bitmap and index layouts) and of the dense ``θ ⊙ A`` written the
same way through orbax (which compresses: its zeros cost little), and the dense kernel's bytes.

Usage::

  .venv/bin/python scripts/benchmark_export.py                  # F = 4096, 15 rounds
  .venv/bin/python scripts/benchmark_export.py --features=256 --rounds=3   # quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import sparse  # noqa: E402

import topkast_jax as tk  # noqa: E402

MiB = 2**20
CALLS = ("dense", "bcoo", "todense")


def exported_layer(features: int, sparsity: float, seed: int = 0) -> tuple[nn.Dense, Any, Any]:
    """``(model, variables, exported)``: a Dense(features) layer's variables and its export at
    ``sparsity`` (Top-KAST's forward set of its kernel at init; the bias stays dense)."""
    model = nn.Dense(features)
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, features)))
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=sparsity, backward_sparsity=sparsity / 2)
    params = variables["params"]
    return model, variables, tk.export.sparse_params(params, tx.init(params))


def calls(model: nn.Dense, exported: Any) -> dict[str, tuple[Any, Any]]:
    """``{name: (jitted fn, its params)}`` for the three ways of running the export."""
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    bcoo = tk.export.to_bcoo(exported)

    def todense(p, x):
        return apply(dict(p, kernel=p["kernel"].todense()), x)

    return {
        "dense": (jax.jit(apply), tk.export.densify(exported)),
        "bcoo": (jax.jit(sparse.sparsify(apply)), bcoo),
        "todense": (jax.jit(todense), bcoo),
    }


def _seconds(fn: Any, params: Any, x: jax.Array) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    return time.perf_counter() - start


def time_rounds(fns: dict[str, tuple[Any, Any]], x: jax.Array, rounds: int) -> dict[str, list]:
    """Seconds of each call per round (the calls alternate within a round; one warm-up each)."""
    for fn, params in fns.values():
        jax.block_until_ready(fn(params, x))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, params) in fns.items():
            times[name].append(_seconds(fn, params, x))
    return times


def densify_seconds(exported: Any, repeats: int = 3) -> float:
    """Median seconds of ``tk.export.densify`` (host scatter + device copy), the one-off cost of
    densify-on-load."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(tk.export.densify(exported))
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def disk_sizes(exported: Any) -> dict[str, int]:
    """Bytes on disk of the export (bitmap, as given), of its index layout and of the dense
    ``θ ⊙ A`` through ``tk.export.save`` (orbax)."""
    kernel = exported["kernel"]
    index = dict(
        exported, kernel=tk.export.IndexLeaf(kernel.values, kernel.flat_indices(), kernel.shape)
    )
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in (
            ("bitmap", exported),
            ("indices", index),
            ("dense", jax.device_get(tk.export.densify(exported))),
        ):
            path = os.path.join(tmp, name)
            tk.export.save(path, tree)
            out[name] = tk.export.disk_bytes(path)
    return out


def ratio_text(values: list[float]) -> str:
    """``median (min–max)``."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def measure(features: int, batch: int, sparsity: float, rounds: int) -> dict[str, Any]:
    """One row: per-call ratios to dense, dense ms, densify ms, bytes."""
    model, variables, exported = exported_layer(features, sparsity)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, features))
    fns = calls(model, exported)
    want = fns["dense"][0](fns["dense"][1], x)
    for name in ("bcoo", "todense"):  # the three compute the same layer
        np.testing.assert_allclose(fns[name][0](fns[name][1], x), want, rtol=1e-4, atol=1e-4)
    times = time_rounds(fns, x, rounds)
    ratios = {
        name: [t / d for t, d in zip(times[name], times["dense"], strict=True)]
        for name in ("bcoo", "todense")
    }
    return {
        "sparsity": sparsity,
        "dense_ms": 1e3 * statistics.median(times["dense"]),
        "ratios": ratios,
        "densify_ms": 1e3 * densify_seconds(exported),
        "disk": disk_sizes(exported),
        "dense_kernel_bytes": features * features * 4,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sparsities", default="0.8,0.9,0.95")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    print(
        f"Dense({args.features}) on batch {args.batch}, {jax.devices()[0].platform} "
        f"({os.cpu_count()} cores), {args.rounds} rounds; jax {jax.__version__}"
    )
    print(
        "| forward sparsity | dense ms | bcoo / dense | todense / dense | densify on load ms | "
        "export MiB (bitmap) | export MiB (indices) | dense θ⊙A MiB (orbax) | dense kernel MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s in (float(v) for v in args.sparsities.split(",")):
        r = measure(args.features, args.batch, s, args.rounds)
        d = r["disk"]
        print(
            f"| {s:.0%} | {r['dense_ms']:.2f} | {ratio_text(r['ratios']['bcoo'])} | "
            f"{ratio_text(r['ratios']['todense'])} | {r['densify_ms']:.1f} | "
            f"{d['bitmap'] / MiB:.2f} | {d['indices'] / MiB:.2f} | {d['dense'] / MiB:.2f} | "
            f"{r['dense_kernel_bytes'] / MiB:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
