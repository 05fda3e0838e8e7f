"""No silent loss: every stage that drops cells, genes or donors counts them here.

A :class:`LossLimit` (``params.yaml: losses.<kind>``) holds two fractions: above ``warn`` the stage
logs a WARNING, above ``stop`` it refuses to go on. :func:`check_loss` applies one and returns the
entry the stage writes into its JSON report, so that every drop is counted there whatever its size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)


class Limit(Protocol):
    """Anything with ``warn`` and ``stop`` fractions (``params_schema.LossLimit`` or :class:`LossLimit`)."""

    warn: float
    stop: float


@dataclass(frozen=True)
class LossLimit:
    """Fractions lost above which a stage warns (``warn``) and stops (``stop``)."""

    warn: float
    stop: float

    def __post_init__(self) -> None:
        if not 0 <= self.warn <= self.stop <= 1:
            msg = f"loss limits must satisfy 0 <= warn <= stop <= 1, got warn={self.warn}, stop={self.stop}."
            raise InputError(msg)


def check_loss(
    lost: int,
    total: int,
    *,
    what: str,
    key: str,
    limit: Limit,
    source: str,
    hint: str = "",
) -> dict[str, Any]:
    """Count a drop, warn above ``limit.warn`` and stop above ``limit.stop``.

    Parameters
    ----------
    lost, total
        How many were dropped, of how many.
    what
        What was dropped, plural (``"cells without a cell annotation"``).
    key
        The ``losses`` key of the limit (named in the messages).
    limit
        The limit.
    source
        The file or stage the drop happened in (named in the messages).
    hint
        What probably went wrong and how to fix it, added to the warning and the refusal.

    Returns
    -------
    ``{"lost", "total", "fraction", "warn_above", "stop_above", "status"}`` for the stage's report;
    ``status`` is ``"ok"`` or ``"warning"``.

    Raises
    ------
    InputError
        When more than ``limit.stop`` of ``total`` was lost.
    """
    fraction = lost / total if total else 0.0
    entry = {
        "lost": int(lost),
        "total": int(total),
        "fraction": round(fraction, 6),
        "warn_above": limit.warn,
        "stop_above": limit.stop,
        "status": "ok",
    }
    told = f"{source}: {lost:,} of {total:,} {what} ({fraction:.1%})"
    advice = f" {hint.rstrip('.')}." if hint else ""
    if fraction > limit.stop:
        msg = (
            f"{told} were dropped, more than losses.{key}.stop = {limit.stop:g}.{advice} If the "
            f"loss is expected, raise losses.{key}.stop in params.yaml."
        )
        raise InputError(msg)
    if fraction > limit.warn:
        entry["status"] = "warning"
        logger.warning(
            "%s were dropped, more than losses.%s.warn = %g.%s", told, key, limit.warn, advice
        )
    elif lost:
        logger.info("%s were dropped", told)
    return entry
