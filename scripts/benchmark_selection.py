r"""Side-by-side timing of the exact top-k mask methods of ``topkast_jax.selection``.

Two workloads, every method timed in the same run on the same inputs:

1. one 3x3x512x512 float32 kernel (2,359,296 weights) at keep fractions 0.1 and 0.5;
2. the masks of every ResNet-50 v1 kernel at once (53 convolutions + the 2048x1000 classifier,
   25,502,912 weights), computed by one jitted function, at keep fraction D + M = 0.5 (the backward
   mask B) and D = 0.2 (the forward mask A); every kernel keeps
   :math:`k = \max(1, \lfloor \text{keep}\cdot n + 0.5 \rfloor)` of its :math:`n` weights;
3. the whole ``jax.jit(tx.init)`` of ``tk.topkast`` on those kernels (both masks, packed) beside a
   jitted stable argsort of the same two masks.

Each jitted function is called once to compile (the "compile s" column, which includes that first
run), then timed ``--repeats`` times with ``block_until_ready``; the table shows the median.  Slow
methods stop after ``--budget_s`` seconds of timed calls (at least two calls, or one call when that
call alone exceeds the budget: argsort and ``lax.top_k`` on all of ResNet-50); the "n" column says
how many were timed.  Beside the methods the table shows ``np.partition`` on the host (threshold
only, no mask) and two memory-read floors for the same bytes: a jitted one-pass
``sum(|x| > c)`` (measured), and ``bytes / bandwidth`` with the bandwidth of a plain jitted
``jnp.sum`` over a 256 MiB array that does not fit in cache.  All methods must return identical
masks (asserted), and the single-tensor masks must equal ``np.argsort(-|x|, kind="stable")[:k]``.

The "sort/this" column divides medians timed one method after the other, minutes apart on a
machine whose load moves.  With both ``streaming`` and ``sort`` among the methods each table
also prints the *paired* ratio, the measure of the "≥ 40× an argsort" goal: ``--pairs`` times,
three streaming calls and then one sort call, the sort's time over the median of those three;
the median of the pairs with their min–max (``tx.init`` against the argsort of both masks alike).

Usage::

  python scripts/benchmark_selection.py                      # full run, ~3-4 min on 2 CPU cores
  python scripts/benchmark_selection.py --quick              # smoke run, keep 0.5 only
  python scripts/benchmark_selection.py --methods=histogram,bisect --repeats=20
  python scripts/benchmark_selection.py --methods=streaming,sort --repeats=7 --pairs=5
      # the goal's paired ratios, 5 pairs per case (the ResNet-50 sort takes ~5 s a call)

On a GPU or TPU host the same command measures that backend (``JAX_PLATFORMS=cuda`` or ``tpu``
picks it explicitly).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import topkast_jax as tk
from topkast_jax import codes, selection, streaming

Shape = tuple[int, ...]

SINGLE_SHAPE: Shape = (3, 3, 512, 512)
SINGLE_KEEPS = (0.1, 0.5)
RESNET_KEEPS = (0.5, 0.2)
DEFAULT_METHODS = ("streaming", "histogram", "histogram-rows", "bisect", "top_k", "sort")
BANDWIDTH_PROBE_ELEMENTS = 1 << 26  # 256 MiB of float32: far larger than any cache.


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock timings of one jitted call.

    Attributes:
      compile_s: seconds of the first call (trace + compile + one run).
      samples_ms: milliseconds of each later call.
    """

    compile_s: float
    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results table."""

    name: str
    timing: Timing


def resnet50_kernel_shapes(num_classes: int = 1000) -> list[tuple[str, Shape]]:
    """Kernel shapes of ResNet-50 v1 (HWIO convolutions, then the dense classifier).

    Stem 7x7x3x64; four stages of [3, 4, 6, 3] bottlenecks of widths 64/128/256/512 and expansion 4
    (1x1 reduce, 3x3, 1x1 expand), with a 1x1 projection shortcut on the first block of each stage;
    then a 2048 x ``num_classes`` dense kernel.  53 convolutions + 1 dense = 54 kernels.

    Args:
      num_classes: output classes of the classifier.

    Returns:
      ``(name, shape)`` pairs in network order.
    """
    shapes: list[tuple[str, Shape]] = [("stem", (7, 7, 3, 64))]
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        out_ch = 4 * width
        for block in range(blocks):
            prefix = f"stage{stage + 1}/block{block + 1}"
            shapes.append((f"{prefix}/conv1", (1, 1, in_ch, width)))
            shapes.append((f"{prefix}/conv2", (3, 3, width, width)))
            shapes.append((f"{prefix}/conv3", (1, 1, width, out_ch)))
            if block == 0:
                shapes.append((f"{prefix}/proj", (1, 1, in_ch, out_ch)))
            in_ch = out_ch
    shapes.append(("fc", (in_ch, num_classes)))
    return shapes


def keep_count(n: int, keep: float) -> int:
    """Entries kept out of ``n`` at density ``keep``: ``max(1, floor(keep * n + 0.5))``."""
    return max(1, int(np.floor(keep * n + 0.5)))


def he_normal_kernels(shapes: Sequence[Shape], seed: int) -> list[np.ndarray]:
    """Random float32 kernels with He-normal scale ``sqrt(2 / fan_in)`` (fan_in = all but last)."""
    rng = np.random.default_rng(seed)
    kernels = []
    for shape in shapes:
        fan_in = int(np.prod(shape[:-1]))
        kernels.append((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))
    return kernels


def seconds_of(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn`` (which must block until its result is ready)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_call(
    fn: Callable[[], object], repeats: int, budget_s: float, min_repeats: int = 2
) -> tuple[Timing, object]:
    """Times ``fn`` (which must block until its result is ready): one warm-up, then repeats.

    Stops early once ``budget_s`` seconds of timed calls have passed and at least
    ``min_repeats`` calls were timed, or after a single call that alone took over ``budget_s``.

    Returns:
      the timings and the result of the warm-up call.
    """
    start = time.perf_counter()
    result = fn()
    compile_s = time.perf_counter() - start
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repeats:
        elapsed = seconds_of(fn)
        samples.append(elapsed * 1e3)
        spent += elapsed
        if elapsed > budget_s or (spent > budget_s and len(samples) >= min_repeats):
            break
    return Timing(compile_s=compile_s, samples_ms=tuple(samples)), result


#: ``fast`` calls per pair of :func:`paired` (their median is the pair's denominator).
FAST_CALLS_PER_PAIR = 3


@dataclasses.dataclass(frozen=True)
class Paired:
    """``slow / fast`` wall-time ratios measured in alternation (both already compiled): per
    pair, one ``slow`` call over the median of the ``fast`` calls made just before it, so both
    sides of a ratio see the same load on a shared machine."""

    ratios: tuple[float, ...]

    def describe(self) -> str:
        r = self.ratios
        return f"{statistics.median(r):.1f}x (min-max {min(r):.1f}-{max(r):.1f}x, {len(r)} pairs)"


def paired(fast: Callable[[], object], slow: Callable[[], object], pairs: int) -> Paired:
    """:class:`Paired` ratios of ``pairs`` pairs, each ``FAST_CALLS_PER_PAIR`` calls of ``fast``
    then one of ``slow`` (the functions must block until their results are ready)."""
    ratios = []
    for _ in range(pairs):
        fast_s = [seconds_of(fast) for _ in range(FAST_CALLS_PER_PAIR)]
        ratios.append(seconds_of(slow) / statistics.median(fast_s))
    return Paired(tuple(ratios))


#: Benchmark-only variant: the histogram method through ``selection.top_k_masks``, which stacks
#: kernels of equal size as rows of one selection — the path ``tk.topkast`` takes at each refresh.
BATCHED = "histogram-rows"
#: The path ``tk.topkast`` takes (``topkast_jax.streaming``): chunked passes, equal shapes together.
STREAMING = "streaming"
EXTRA_METHODS = (BATCHED, STREAMING)


def masks_fn(ks: Sequence[int], method: str) -> Callable:
    """Jitted ``kernels -> masks`` computing the top-``ks[i]`` magnitude mask of every kernel."""

    def all_masks(kernels):
        return [
            selection.top_k_magnitude_mask(x, k, method=method)
            for x, k in zip(kernels, ks, strict=True)
        ]

    def all_masks_batched(kernels):
        keys = [selection.magnitude_keys(x) for x in kernels]
        flat = selection.top_k_masks(keys, list(ks), method="histogram")
        return [m.reshape(x.shape) for m, x in zip(flat, kernels, strict=True)]

    def all_masks_streaming(kernels):
        thresholds = streaming.leaf_thresholds(kernels, list(ks), list(ks))
        return [
            codes.forward_of(streaming.codes_from_thresholds(x, t))
            for x, t in zip(kernels, thresholds, strict=True)
        ]

    special = {BATCHED: all_masks_batched, STREAMING: all_masks_streaming}
    return jax.jit(special.get(method, all_masks))


def one_pass_read_fn() -> Callable:
    """Jitted ``kernels -> count`` reading every weight once: ``sum_i #(|x_i| > 0.01)``."""

    def count(kernels):
        return sum(jnp.sum(jnp.abs(x) > 0.01, dtype=jnp.int32) for x in kernels)

    return jax.jit(count)


def blocking(fn: Callable, *args) -> Callable[[], object]:
    """``() -> fn(*args)`` that waits for the device result."""
    return lambda: jax.block_until_ready(fn(*args))


def partition_thresholds(kernels: Sequence[np.ndarray], ks: Sequence[int]) -> list[np.float32]:
    """Host ``np.partition``: the k-th largest ``|x|`` of every kernel (no mask built)."""
    out = []
    for x, k in zip(kernels, ks, strict=True):
        flat = np.abs(x).ravel()
        out.append(np.partition(flat, flat.size - k)[flat.size - k])
    return out


def measure_bandwidth_gbs(repeats: int) -> float:
    """GB/s of a jitted plain ``jnp.sum`` over a 256 MiB float32 array (median of ``repeats``).

    A plain sum is the cheapest full read XLA emits, so ``bytes / this`` is a memory floor; the
    measured one-pass ``sum(|x| > c)`` floor adds the cost of a compare per element.
    """
    x = jnp.asarray(np.random.default_rng(0).standard_normal(BANDWIDTH_PROBE_ELEMENTS, np.float32))
    timing, _ = time_call(blocking(jax.jit(jnp.sum), x), max(repeats, 3), budget_s=2.0)
    return x.nbytes / (timing.median_ms * 1e-3) / 1e9


def reference_mask(x: np.ndarray, k: int) -> np.ndarray:
    """``np.argsort(-|x|, kind="stable")[:k]`` as a bool mask shaped like ``x``."""
    mask = np.zeros(x.size, bool)
    mask[np.argsort(-np.abs(x).ravel(), kind="stable")[:k]] = True
    return mask.reshape(x.shape)


def check_masks(
    name: str,
    masks: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    kernels: Sequence[np.ndarray],
    ks: Sequence[int],
) -> None:
    """Asserts ``masks == reference`` leaf by leaf and that each keeps the k largest ``|x|``."""
    for i, (mask, ref, x, k) in enumerate(zip(masks, reference, kernels, ks, strict=True)):
        assert mask.shape == x.shape and mask.dtype == bool, f"{name}: bad mask {i}"
        assert int(mask.sum()) == k, f"{name}: kernel {i} keeps {int(mask.sum())}, want {k}"
        assert np.array_equal(mask, ref), f"{name}: kernel {i} differs from the reference mask"


def run_case(
    title: str,
    kernels_host: Sequence[np.ndarray],
    keep: float,
    methods: Sequence[str],
    args: argparse.Namespace,
    bandwidth_gbs: float,
    exact_reference: bool,
) -> None:
    """Times every method on one set of kernels at one keep fraction and prints the table."""
    ks = [keep_count(x.size, keep) for x in kernels_host]
    kernels = [jnp.asarray(x) for x in kernels_host]
    num_weights = sum(x.size for x in kernels_host)
    num_bytes = sum(x.nbytes for x in kernels_host)
    slow_budget = args.budget_s
    rows: list[Row] = []
    reference: list[np.ndarray] | None = None
    if exact_reference:
        reference = [reference_mask(x, k) for x, k in zip(kernels_host, ks, strict=True)]
    calls: dict[str, Callable[[], object]] = {}
    for method in methods:
        calls[method] = blocking(masks_fn(ks, method), kernels)
        timing, out = time_call(calls[method], args.repeats, slow_budget)
        rows.append(Row(method, timing))
        masks = [np.asarray(m) for m in out]
        if reference is None:
            reference = masks
        check_masks(method, masks, reference, kernels_host, ks)
    thresholds = partition_thresholds(kernels_host, ks)
    if reference is not None:
        for t, x, m in zip(thresholds, kernels_host, reference, strict=True):
            assert t == np.abs(x)[m].min(), "np.partition threshold differs from the masks"
    partition, _ = time_call(
        lambda: partition_thresholds(kernels_host, ks), args.repeats, slow_budget
    )
    floor, _ = time_call(blocking(one_pass_read_fn(), kernels), max(args.repeats, 10), slow_budget)
    bandwidth_floor_ms = num_bytes / (bandwidth_gbs * 1e9) * 1e3
    pair = None
    if STREAMING in calls and "sort" in calls and args.pairs:
        pair = paired(calls[STREAMING], calls["sort"], args.pairs)
    print_table(
        f"{title}: {num_weights:,} weights ({num_bytes / 2**20:.1f} MiB), keep {keep}, "
        f"k = {sum(ks):,}",
        rows,
        partition,
        floor,
        bandwidth_floor_ms,
    )
    if pair is not None:
        print(f"{'sort/streaming, paired':<26} {pair.describe()}")


def print_table(
    title: str, rows: Sequence[Row], partition: Timing, floor: Timing, bandwidth_floor_ms: float
) -> None:
    """Prints method, median ms, ratio to argsort ("sort") and to the one-pass floor."""
    sort_ms = next((r.timing.median_ms for r in rows if r.name == "sort"), None)
    floor_ms = floor.median_ms
    print(f"\n{title}")
    header = (
        f"{'method':<26}{'median ms':>11}{'min ms':>10}{'n':>4}{'compile s':>11}"
        f"{'sort/this':>11}{'this/floor':>12}"
    )
    print(header)
    print("-" * len(header))

    def line(name: str, timing: Timing, compile_s: str) -> None:
        ratio = f"{sort_ms / timing.median_ms:.1f}x" if sort_ms else "-"
        print(
            f"{name:<26}{timing.median_ms:>11.2f}{timing.min_ms:>10.2f}{len(timing.samples_ms):>4}"
            f"{compile_s:>11}{ratio:>11}{timing.median_ms / floor_ms:>11.1f}x"
        )

    for row in rows:
        line(row.name, row.timing, f"{row.timing.compile_s:.2f}")
    line("np.partition (host, t)", partition, "-")
    line("floor: one-pass read", floor, "-")
    print(f"{'floor: bytes/bandwidth':<26}{bandwidth_floor_ms:>11.2f}")


def run_init_case(kernels_host: Sequence[np.ndarray], args: argparse.Namespace) -> None:
    """Times the whole ``tx.init`` of Top-KAST (``A`` at D = 0.2 and ``B`` at D + M = 0.5 of every
    kernel, packed) against a jitted stable argsort of the same two masks, and checks that the
    masks are identical."""
    params = {f"k{i:02d}": jnp.asarray(x) for i, x in enumerate(kernels_host)}
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
    plan = tk.layer_densities(
        params, sparsify=tk.sparsify.kernels(), forward_sparsity=0.8, backward_sparsity=0.5
    )
    k_a, k_b = [leaf.k_forward for leaf in plan], [leaf.k_backward for leaf in plan]
    init = jax.jit(tx.init)

    def argsort_masks(leaves):
        return [
            selection.top_k_magnitude_mask(x, k, method="sort")
            for ks in (k_a, k_b)
            for x, k in zip(leaves, ks, strict=True)
        ]

    leaves = jax.tree.leaves(params)
    init_call, sort_call = blocking(init, params), blocking(jax.jit(argsort_masks), leaves)
    init_timing, state = time_call(init_call, args.repeats, args.budget_s)
    sort_timing, sorted_masks = time_call(sort_call, args.repeats, args.budget_s)
    masks = tk.get_masks(state)
    got = [*jax.tree.leaves(masks.forward), *jax.tree.leaves(masks.backward)]
    for i, (a, b) in enumerate(zip(got, sorted_masks, strict=True)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"tx.init mask {i} differs"
    print(
        "\ntx.init of tk.topkast on all ResNet-50 kernels (A at D=0.2 and B at D+M=0.5, packed), "
        "beside a jitted stable argsort of the same masks (identical masks checked)"
    )
    header = (
        f"{'call':<26}{'median ms':>11}{'min ms':>10}{'n':>4}{'compile s':>11}{'sort/this':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, timing in (("tx.init", init_timing), ("argsort A and B", sort_timing)):
        print(
            f"{name:<26}{timing.median_ms:>11.2f}{timing.min_ms:>10.2f}{len(timing.samples_ms):>4}"
            f"{timing.compile_s:>11.2f}{sort_timing.median_ms / timing.median_ms:>10.1f}x"
        )
    if args.pairs:
        pair = paired(init_call, sort_call, args.pairs)
        print(f"{'argsort/tx.init, paired':<26} {pair.describe()}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per method (median)")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {(*selection.METHODS, *EXTRA_METHODS)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: keep 0.5 only, 3 repeats, 1 s budgets, 1 pair",
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=3.0,
        help="stop timing a method after this many seconds of calls (see the module docstring)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kernels")
    parser.add_argument(
        "--pairs",
        type=int,
        default=3,
        help="alternated streaming/sort pairs for the paired ratio (0: none; needs both methods)",
    )
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in args.methods:
        if method not in (*selection.METHODS, *EXTRA_METHODS):
            known = (*selection.METHODS, *EXTRA_METHODS)
            parser.error(f"--methods: unknown method {method!r}; choose from {known}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.pairs < 0:
        parser.error("--pairs must be >= 0")
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.budget_s = min(args.budget_s, 1.0)
        args.pairs = min(args.pairs, 1)
    return args


def print_machine() -> None:
    """Prints backend, device, JAX version, CPU model and load, so tables can be compared."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {jax.devices()[0]}")
    print(f"host: {os.cpu_count()} CPUs, {cpu}, load average {os.getloadavg()[0]:.2f}")
    with open(selection.__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    print(f"topkast_jax/selection.py sha256 {digest}")


def main() -> None:
    start = time.perf_counter()
    args = parse_args()
    print_machine()
    single_keeps = (0.5,) if args.quick else SINGLE_KEEPS
    resnet_keeps = (0.5,) if args.quick else RESNET_KEEPS
    bandwidth = measure_bandwidth_gbs(args.repeats)
    print(f"read bandwidth (jitted jnp.sum of 256 MiB): {bandwidth:.1f} GB/s")

    single = he_normal_kernels([SINGLE_SHAPE], args.seed)
    shape_str = "x".join(map(str, SINGLE_SHAPE))
    for keep in single_keeps:
        run_case(f"one {shape_str} kernel", single, keep, args.methods, args, bandwidth, True)

    named_shapes = resnet50_kernel_shapes()
    shapes = [shape for _, shape in named_shapes]
    print(
        f"\nResNet-50 v1: {len(shapes)} kernels ({len(shapes) - 1} conv + 1 dense), "
        f"{sum(int(np.prod(s)) for s in shapes):,} weights"
    )
    resnet = he_normal_kernels(shapes, args.seed + 1)
    for keep in resnet_keeps:
        run_case("all ResNet-50 kernels", resnet, keep, args.methods, args, bandwidth, False)
    run_init_case(resnet, args)
    print(
        "\nmasks checked (methods agree; single kernel = numpy argsort); "
        f"total {time.perf_counter() - start:.0f} s, "
        f"load average now {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
