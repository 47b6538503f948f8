"""Per-layer parameter / density table for ``--dry_run`` (no weights materialised).

Works on the output of ``jax.eval_shape(model.init, ...)`` through ``tk.layer_densities``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

#: Decimal places of the densities written to ``dry_run.json`` (the exact sizes are the counts).
DENSITY_DIGITS = 6


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders numbers by value: ``layer_2/w`` before ``layer_10/w``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)
    )


def layer_rows(
    abstract_params: Any,
    *,
    sparsify: Any,
    forward_sparsity: float,
    backward_sparsity: float,
    distribution: str = "uniform",
    layer_axis: Any = "auto",
) -> list[dict[str, Any]]:
    """One dict per parameter leaf, in natural order of the names (``layer_2`` before
    ``layer_10``): name, shape, params, sparse, forward/backward density (rounded to
    :data:`DENSITY_DIGITS` places; of each slice for a stacked leaf), the exact mask sizes
    ``forward_nonzero`` = |A|, ``backward_nonzero`` = |B|, and ``layers`` — the slices a
    scan-stacked leaf is selected in (1 for a whole leaf; see ``tk.topkast``'s ``layer_axis``)."""
    import topkast_jax as tk

    leaves = tk.layer_densities(
        abstract_params,
        sparsify=sparsify,
        forward_sparsity=forward_sparsity,
        backward_sparsity=backward_sparsity,
        distribution=distribution,
        layer_axis=layer_axis,
    )
    rows = [
        {
            "name": leaf.path,
            "shape": list(leaf.shape),
            "params": int(leaf.size),
            "sparse": bool(leaf.sparse),
            "forward_density": round(float(leaf.forward), DENSITY_DIGITS),
            "backward_density": round(float(leaf.backward), DENSITY_DIGITS),
            "forward_nonzero": int(leaf.k_forward),
            "backward_nonzero": int(leaf.k_backward),
            "layers": int(leaf.layers),
        }
        for leaf in leaves
    ]
    return sorted(rows, key=lambda r: natural_key(r["name"]))


def with_device_bytes(
    rows: list[dict[str, Any]], per_leaf: dict[str, int]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``rows`` with each leaf's always-sparse ``device_bytes`` (``tk.AlwaysSparse.
    device_bytes_per_leaf``) and the totals ``{"device_state_bytes": ...}``."""
    out = [dict(r, device_bytes=int(per_leaf[r["name"]])) for r in rows]
    return out, {"device_state_bytes": int(sum(per_leaf.values()))}


def sparsify_rule(sparsify: Any) -> str:
    """The line of the table that says which leaves are sparse (``tk.sparsify.describe``)."""
    import topkast_jax as tk

    return tk.sparsify.describe(sparsify)


def plan_rows(abstract_params: Any, sparsity: Any, sparsify: Any) -> list[dict[str, Any]]:
    """:func:`layer_rows` of the sparsity config ``sparsity`` (method, sparsities,
    distribution) on the leaves ``sparsify`` selects."""
    from experiments.common.sparsity import planned_densities

    forward, backward = planned_densities(sparsity)
    return layer_rows(
        abstract_params,
        sparsify=sparsify,
        forward_sparsity=forward,
        backward_sparsity=backward,
        distribution=sparsity.get("distribution", "uniform"),
    )


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``total_params``, ``sparse_params``, ``forward_nonzero``, ``backward_nonzero`` and the
    overall densities ``forward_density = forward_nonzero / total_params`` (same for backward),
    rounded to :data:`DENSITY_DIGITS` places.
    """
    total = sum(r["params"] for r in rows)
    sparse = sum(r["params"] for r in rows if r["sparse"])
    fwd = sum(r["forward_nonzero"] for r in rows)
    bwd = sum(r["backward_nonzero"] for r in rows)
    return {
        "total_params": total,
        "sparse_params": sparse,
        "forward_nonzero": fwd,
        "backward_nonzero": bwd,
        "forward_density": round(fwd / total, DENSITY_DIGITS) if total else 1.0,
        "backward_density": round(bwd / total, DENSITY_DIGITS) if total else 1.0,
    }


def format_table(
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    method: str | None = None,
    rule: str | None = None,
) -> str:
    """A fixed-width text table of ``rows`` followed by the ``summary`` totals (and the
    sparse-training ``method`` and the ``sparsify`` rule, ``tk.sparsify.describe``, when given).
    A ``layers`` column appears when a leaf is selected per stacked layer."""
    name_w = max([len("name")] + [len(r["name"]) for r in rows])
    device = bool(rows) and all("device_bytes" in r for r in rows)  # always-sparse mode
    stacked = any(r.get("layers", 1) > 1 for r in rows)
    header = f"{'name':<{name_w}}  {'shape':<20}  {'params':>13}  {'fwd':>6}  {'bwd':>6}"
    header += f"  {'layers':>6}" if stacked else ""
    header += f"  {'device bytes':>13}" if device else ""
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"]) or "scalar"
        lines.append(
            f"{r['name']:<{name_w}}  {shape:<20}  {r['params']:>13,}  "
            f"{r['forward_density']:>6.3f}  {r['backward_density']:>6.3f}"
            + (f"  {r.get('layers', 1):>6}" if stacked else "")
            + (f"  {r['device_bytes']:>13,}" if device else "")
        )
    lines.append("-" * len(header))
    lines.append(
        f"total params {summary['total_params']:,} | sparse params {summary['sparse_params']:,} | "
        f"forward nonzero {summary['forward_nonzero']:,} | "
        f"backward nonzero {summary['backward_nonzero']:,}"
    )
    lines.append(
        f"forward density {summary['forward_density']:.3f} | "
        f"backward density {summary['backward_density']:.3f}"
    )
    if device:
        lines.append(
            f"always-sparse device state {sum(r['device_bytes'] for r in rows):,} bytes "
            "(values, indices, A-flags and optimizer state on B; dense leaves in full)"
        )
    if rule is not None:
        lines.append(f"sparse leaves: {rule}")
    if method is not None:
        lines.append(f"method {method}")
    return "\n".join(lines)


def write_dry_run(
    workdir: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``<workdir>/dry_run.json`` (totals + ``layers`` + ``extra``) and return its dict."""
    record = dict(totals(rows))
    record.update(extra or {})
    record["layers"] = rows
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "dry_run.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record
