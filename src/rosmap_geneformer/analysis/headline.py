"""The headline results of a pipeline run as plain text (``rosmap-geneformer summary``), and the
number formats the HTML report shares with it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def warning_messages(content: Mapping[str, Any]) -> list[str]:
    """The messages of a stage report's ``warnings`` (entries with a ``message``, or strings)."""
    out = []
    for entry in content.get("warnings") or []:
        message = entry.get("message") if isinstance(entry, Mapping) else entry
        if message:
            out.append(str(message))
    return out


def with_ci(level: Mapping[str, Any], metric: str) -> str | None:
    """``metric`` of ``level`` as ``0.123 [0.100, 0.150]`` (its ``_ci_low``/``_ci_high``), or
    ``None`` when absent."""
    value = level.get(metric)
    if value is None:
        return None
    low, high = level.get(f"{metric}_ci_low"), level.get(f"{metric}_ci_high")
    text = f"{value:.3f}"
    return f"{text} [{low:.3f}, {high:.3f}]" if low is not None and high is not None else text


def mean_sd(entry: Mapping[str, Any]) -> str | None:
    """A donor method's cross-validated AUROC as ``mean ± sd``; ``None`` when not cross-validated."""
    mean, sd = entry.get("cv_auroc"), entry.get("cv_auroc_sd")
    if mean is None:
        return None
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


HEADLINE_METRICS = (("cell", "macro_f1"), ("cell", "accuracy"), ("patient", "auroc"))


def headline(reports: str | Path, tasks: Sequence[str]) -> str:
    """The few numbers a demo run is judged by, as plain text for the terminal.

    First the warnings of ``reports/split.json`` (too few donors of a class in val or test)
    and of ``reports/grn/summary.json`` (regulators absent from the data, a truth network
    without them); then the test metrics of each task (fine-tuned model and baseline, with 95%
    intervals), every donor-level method (CV and test AUROC), the tuning study, the top perturbed
    genes and the network scores; ``dvc metrics show`` lists the rest.
    """
    reports = Path(reports)
    lines = []
    for name, path in (
        ("split", reports / "split.json"),
        ("grn", reports / "grn" / "summary.json"),
    ):
        lines.extend(f"WARNING ({name}): {m}" for m in warning_messages(_read_json(path)))
    lines.append("test set (95% bootstrap interval over patients):")
    for task in tasks:
        for source in ("eval", "baseline"):
            metrics = _read_json(reports / source / task / "metrics.json")
            label = "fine-tuned" if source == "eval" else "baseline"
            parts = [
                f"{level} {name} {with_ci(metrics[level], name)}"
                for level, name in HEADLINE_METRICS
                if name in metrics.get(level, {})
            ]
            lines.append(f"  {task:<10} {label:<10} " + ("; ".join(parts) or "not run yet"))
    for task in tasks:
        donor = _read_json(reports / "donor" / task / "summary.json")
        if donor.get("methods"):
            counts = donor.get("donors", {})
            lines.append(
                f"donor-level {task} ({counts.get('cv')} CV donors, {counts.get('test')} test "
                "donors): CV AUROC mean ± sd | test AUROC [95% interval]"
            )
            for name, entry in donor["methods"].items():
                lines.append(
                    f"  {name:<26} {mean_sd(entry) or 'not cross-validated':<20} | "
                    f"{with_ci(entry, 'test_auroc')}"
                )
    tune = _read_json(reports / "tune" / "metrics.json")
    if tune.get("best"):
        baseline = (tune.get("baseline") or {}).get("value")
        shown = "-" if baseline is None else f"{baseline:.3f}"
        lines.append(
            f"tune ({tune['task']}, {tune['metric']}): best {tune['best']['value']:.3f} "
            f"(trial {tune['best']['trial']}) vs defaults {shown}; {tune['trials']}"
        )
    perturb = _read_json(reports / "perturb" / "summary.json")
    for kind, run in sorted((perturb.get("runs") or {}).items()):
        lines.append(f"perturb {kind}: top genes {', '.join(run.get('top_genes', [])[:8])}")
    network = _read_json(reports / "grn" / "metrics.json").get("all") or {}
    if network:
        lines.append(
            "grn EPR (all edges; 1 = random): "
            + ", ".join(f"{m} {v['epr']:.2f}" for m, v in network.items())
        )
    return "\n".join(lines)
