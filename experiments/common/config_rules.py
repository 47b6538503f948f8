"""Declarative config checks: one table of field -> rule per experiment, checked before anything
is built or compiled.

A :class:`Rule` names one dotted field, says in words what values are allowed and holds the
predicate; a :class:`Relation` does the same for a condition over several fields.
:func:`check_rules` runs a table and raises a ``ValueError`` naming the first bad field, its
value and the allowed range, e.g.::

  config.eval_max_windows=-1 is not allowed: it must be an integer >= 0 (0: every window)

:data:`SHARED_RULES` holds the fields every experiment has; each experiment's table is
``SHARED_RULES + (its own rules)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Rule:
    """``config.<field>`` must satisfy ``ok``; ``allowed`` says what in words.

    ``optional``: an absent field passes (the code reads it with a default).
    """

    field: str
    allowed: str
    ok: Callable[[Any], bool]
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Relation:
    """``ok(*values of fields)`` must hold; checked only when every field is present."""

    fields: tuple[str, ...]
    allowed: str
    ok: Callable[..., bool]


def lookup(config: Any, dotted: str) -> Any:
    """``config.a.b`` for ``"a.b"``, or the sentinel ``_MISSING`` if any part is absent."""
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            return _MISSING
    return node


def is_int(value: Any) -> bool:
    """A Python/NumPy integer that is not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite int or float (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return math.isfinite(float(value))


def int_at_least(
    field: str, minimum: int, note: str = "", optional: bool = False, allow_none: bool = False
) -> Rule:
    """An integer ``>= minimum`` (or None when ``allow_none``)."""
    allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
    return Rule(
        field,
        allowed + (f" ({note})" if note else ""),
        lambda v: (allow_none and v is None) or (is_int(v) and v >= minimum),
        optional,
    )


def real_in(
    field: str,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = True,
    optional: bool = False,
) -> Rule:
    """A finite number in the interval ``low..high`` (ends open or closed as given)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def ok(v: Any) -> bool:
        if not is_real(v):
            return False
        v = float(v)
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    return Rule(field, f"a finite number in {interval}", ok, optional)


def one_of(field: str, choices: Sequence[Any], optional: bool = False) -> Rule:
    """One of ``choices``."""
    return Rule(field, f"one of {tuple(choices)}", lambda v: v in tuple(choices), optional)


def boolean(field: str, optional: bool = True) -> Rule:
    """True or False."""
    return Rule(field, "True or False", lambda v: isinstance(v, bool), optional)


def nonempty_string(field: str, optional: bool = False) -> Rule:
    """A non-empty string."""
    return Rule(field, "a non-empty string", lambda v: isinstance(v, str) and bool(v), optional)


def structure_string(value: Any) -> bool:
    """None, or an ``"n:m"`` / ``"n:m/n_B:m"`` string ``tk.NM.parse`` accepts."""
    if value is None:
        return True
    import topkast_jax as tk

    try:
        tk.NM.parse(value)
    except ValueError:
        return False
    return True


def _structure_rules() -> tuple[Rule | Relation, ...]:
    """``sparsity.structure`` (N:M Top-KAST) and the settings it cannot be combined with."""
    unset = "config.sparsity.structure=None"
    relations = (
        ("sparsity.method", "config.sparsity.method='topkast'", lambda v: v == "topkast"),
        ("sparsity.always_sparse", "config.sparsity.always_sparse=False", lambda v: not v),
        ("sparsity.global_topk", "config.sparsity.global_topk=False", lambda v: not v),
        (
            "sparsity.distribution",
            "config.sparsity.distribution='uniform'",
            lambda v: v == "uniform",
        ),
        (
            "sparsity.backward_selection",
            "config.sparsity.backward_selection='magnitude'",
            lambda v: v == "magnitude",
        ),
    )
    return (
        Rule(
            "sparsity.structure",
            "None or 'n:m' / 'n:m/n_B:m' with 1 <= n <= n_B <= m <= 32 (N:M Top-KAST)",
            structure_string,
            optional=True,
        ),
        *(
            Relation(
                ("sparsity.structure", field),
                f"{unset} or {needed} (N:M Top-KAST)",
                lambda structure, v, ok=ok: structure is None or ok(v),
            )
            for field, needed, ok in relations
        ),
    )


def _shared_rules() -> tuple[Rule | Relation, ...]:
    from experiments.common.sparsity import KNOWN_METHODS

    return (
        int_at_least("batch_size", 1),
        int_at_least("num_train_steps", 1),
        int_at_least("checkpoint_every_steps", 1),
        int_at_least("eval_every_steps", 0, "0: evaluate only at the end"),
        int_at_least("log_every_steps", 1),
        int_at_least("seed", 0),
        one_of("sparsity.method", KNOWN_METHODS),
        real_in("sparsity.forward", 0.0, 1.0),
        real_in("sparsity.backward", 0.0, 1.0),
        Relation(
            ("sparsity.backward", "sparsity.forward"),
            "config.sparsity.backward <= config.sparsity.forward "
            "(the backward set B contains the forward set A)",
            lambda bwd, fwd: bwd <= fwd,
        ),
        int_at_least("sparsity.refresh_every", 1),
        real_in("sparsity.exploration_l2", 0.0),
        one_of("sparsity.distribution", ("uniform", "erk"), optional=True),
        one_of("sparsity.backward_selection", ("magnitude", "random"), optional=True),
        int_at_least("sparsity.stop_exploration_step", 0, optional=True, allow_none=True),
        boolean("sparsity.global_topk"),
        boolean("sparsity.track_reservoir"),
        *_structure_rules(),
        Rule("data.path", "a string or None", lambda v: v is None or isinstance(v, str)),
    )


SHARED_RULES: tuple[Rule | Relation, ...] = _shared_rules()


def _shown(value: Any) -> str:
    return "(missing)" if value is _MISSING else repr(value)


def check_rules(config: Any, rules: Sequence[Rule | Relation]) -> None:
    """Check ``config`` against ``rules`` in order.

    Raises:
      ValueError: at the first violated rule, naming ``config.<field>``, its value and the
        allowed values (a required field that is absent is reported as missing).
    """
    for rule in rules:
        if isinstance(rule, Relation):
            values = [lookup(config, f) for f in rule.fields]
            if _MISSING in values or rule.ok(*values):
                continue
            shown = ", ".join(f"config.{f}={v!r}" for f, v in zip(rule.fields, values, strict=True))
            raise ValueError(f"{shown} is not allowed: it must satisfy {rule.allowed}")
        value = lookup(config, rule.field)
        if value is _MISSING and rule.optional:
            continue
        if value is _MISSING or not rule.ok(value):
            raise ValueError(
                f"config.{rule.field}={_shown(value)} is not allowed: it must be {rule.allowed}"
            )


def rule_fields(rules: Sequence[Rule | Relation]) -> list[str]:
    """The field of every :class:`Rule` in ``rules`` (relations excluded), in order."""
    return [r.field for r in rules if isinstance(r, Rule)]
