"""How much RigL's drop-score noise changes the dropped set, against ``tk.baselines`` (issue 13).

RigL (google-research/rigl, ``rigl/sparse_optimizers_base.py``, ``generic_mask_update`` and
``_get_update_op``) ranks the drop by ``|θ ⊙ M| + N(0, σ_n²)``, ``σ_n = 1e-5``, over every entry
of the leaf and keeps the ``n_ones − n_prune`` largest; ``topkast_jax.baselines`` keeps the
``k − d`` largest ``|θ|`` among ``M`` exactly, ties to the lower index (jaxpruner's rule).  For a
leaf of normal weights (std ``σ``), a uniformly random mask of density ``D`` and drop fraction
``f``, this prints how many kept weights differ between the two (mean over seeds), and how many
inactive entries RigL's noisy ranking keeps::

  python scripts/rigl_drop_noise.py [--shape 3,3,256,256] [--density 0.2] [--fraction 0.3]
      [--sigmas 0.0295,0.01,0.003] [--seeds 5]
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from topkast_jax.baselines.select import top_k_magnitude_traced

RIGL_NOISE_STD = 1e-5  # generic_mask_update(..., noise_std=1e-5)


def rigl_kept(theta: np.ndarray, mask: np.ndarray, n_keep: int, noise: np.ndarray) -> np.ndarray:
    """RigL's kept set: the ``n_keep`` largest ``|θ ⊙ M| + noise`` over every entry (float32,
    ties to the lower index, as TF's ``top_k``)."""
    score = np.abs(np.where(mask, theta, 0)).astype(np.float32) + noise.astype(np.float32)
    kept = np.zeros(theta.size, bool)
    kept[np.argsort(-score, kind="stable")[:n_keep]] = True
    return kept


def library_kept(theta: np.ndarray, mask: np.ndarray, n_keep: int) -> np.ndarray:
    """``tk.baselines``' kept set (the drop of SET and RigL): the ``n_keep`` largest ``|θ|``
    among ``M``."""
    kept = jax.jit(top_k_magnitude_traced)(jnp.asarray(theta), jnp.int32(n_keep), jnp.asarray(mask))
    return np.asarray(kept)


def measure(
    size: int,
    density: float,
    fraction: float,
    sigma: float,
    seeds: int,
    noise_std: float = RIGL_NOISE_STD,
) -> dict[str, float]:
    """``k``, ``d = int(k f)``, and the means over ``seeds`` of the kept weights that differ and
    of the inactive entries RigL keeps."""
    k = round(density * size)
    d = int(k * fraction)
    differ, inactive = [], []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        theta = rng.normal(0.0, sigma, size).astype(np.float32)
        mask = np.zeros(size, bool)
        mask[rng.choice(size, k, replace=False)] = True
        rigl = rigl_kept(theta, mask, k - d, rng.normal(0.0, noise_std, size))
        ours = library_kept(theta, mask, k - d)
        differ.append(int(np.sum(rigl & ~ours)))
        inactive.append(int(np.sum(rigl & ~mask)))
    return {"k": k, "d": d, "differ": float(np.mean(differ)), "inactive": float(np.mean(inactive))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="3,3,256,256")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--sigmas", default="0.0295,0.01,0.003")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    size = math.prod(int(s) for s in args.shape.split(","))
    print(f"leaf {args.shape} ({size:,} weights), density {args.density}, f {args.fraction}")
    print("| σ | k | d | kept weights that differ | of d | inactive kept by RigL |")
    print("|---|---|---|---|---|---|")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        m = measure(size, args.density, args.fraction, sigma, args.seeds)
        print(
            f"| {sigma} | {m['k']:,} | {m['d']:,} | {m['differ']:.1f} | "
            f"{m['differ'] / m['d']:.1e} | {m['inactive']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
