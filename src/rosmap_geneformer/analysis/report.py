"""One self-contained HTML page that summarises a pipeline run.

Every number on the page is read from a stage output (JSON, TSV or dvclive files) and every figure
is a PNG written by a stage or drawn here from dvclive's curves; images are embedded as base64, so
the page can be mailed or archived on its own. The page lists every file it read.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rosmap_geneformer.analysis.headline import mean_sd, warning_messages, with_ci
from rosmap_geneformer.params import SPLITS

logger = logging.getLogger(__name__)

SECTIONS = (
    ("funnel", "Data funnel"),
    ("genes", "Gene mapping"),
    ("splits", "Patient-level splits"),
    ("qc", "Quality control"),
    ("training", "Training curves"),
    ("metrics", "Test metrics: fine-tuned Geneformer against the baseline"),
    ("donor", "AD per donor: every method on the same donor folds"),
    ("confusion", "Confusion matrices and patient predictions"),
    ("embeddings", "Embeddings"),
    ("tuning", "Hyperparameter search (val split)"),
    ("perturbation", "In silico perturbation"),
    ("network", "Gene regulatory network"),
    ("files", "Files read"),
)


@dataclass
class ReportBuilder:
    """Collects sections from the stage outputs below ``root`` and remembers what it read.

    Parameters
    ----------
    paths
        ``params.yaml: paths`` (reports, dvclive, ...), relative to ``root``.
    tasks
        Task names (``params.yaml: tasks``).
    root
        The project root.
    """

    paths: Mapping[str, str]
    tasks: Sequence[str]
    root: Path = Path()
    files_read: list[str] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)

    # -- reading ---------------------------------------------------------------------------
    def _path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def _note(self, path: Path) -> None:
        relative = path.relative_to(self.root).as_posix() if path.is_absolute() else path.as_posix()
        if relative not in self.files_read:
            self.files_read.append(relative)

    def json(self, path: Path) -> dict[str, Any] | None:
        """A JSON file's content, or ``None`` when the stage has not run."""
        if not path.is_file():
            return None
        self._note(path)
        return json.loads(path.read_text())

    def tsv(self, path: Path) -> pd.DataFrame | None:
        """A TSV file's content, or ``None`` when the stage has not run."""
        if not path.is_file():
            return None
        self._note(path)
        return pd.read_csv(path, sep="\t")

    def image(self, path: Path, *, alt: str) -> str:
        """An ``<img>`` with the PNG embedded, or a note that it is missing."""
        if not path.is_file():
            return f'<p class="missing">Not available: {html.escape(path.as_posix())}</p>'
        self._note(path)
        return _img(path.read_bytes(), alt=alt)

    # -- sections --------------------------------------------------------------------------
    def build(self) -> str:
        """Collect every section and render the page."""
        reports = Path(self.paths["reports"])
        self.sections["funnel"] = self._funnel(reports)
        self.sections["genes"] = self._genes(reports)
        self.sections["splits"] = self._splits(reports)
        self.sections["qc"] = self._qc(reports)
        self.sections["training"] = self._training(Path(self.paths["dvclive"]))
        self.sections["metrics"] = self._metrics(reports)
        self.sections["donor"] = self._donor(reports)
        self.sections["confusion"] = self._confusion(reports)
        self.sections["embeddings"] = self._embeddings(reports)
        self.sections["tuning"] = self._tuning(reports)
        self.sections["perturbation"] = self._perturbation(reports)
        self.sections["network"] = self._network(reports)
        self.sections["files"] = _list(self.files_read)
        return render_page(self.sections)

    def _funnel(self, reports: Path) -> str:
        mapping = self.json(self._path(str(reports), "genes", "mapping.json")) or {}
        split = self.json(self._path(str(reports), "split.json")) or {}
        rows: list[dict[str, Any]] = []
        if mapping:
            rows.append(
                {
                    "stage": "raw counts",
                    "genes": mapping.get("genes_total"),
                    "total": mapping.get("cells"),
                }
            )
            rows.append(
                {
                    "stage": "convert_genes",
                    "genes": mapping.get("genes_output"),
                    "total": mapping.get("cells"),
                }
            )
        if split:
            row = {"stage": "split", "genes": mapping.get("genes_output")}
            row |= {s: split.get(s, {}).get("n_cells") for s in SPLITS}
            rows.append(row)
        for stage, folder, key in (
            ("qc", "qc", "cells_out"),
            ("annotate", "annotate", "cells_out"),
        ):
            row = {"stage": stage}
            for s in SPLITS:
                content = self.json(self._path(str(reports), folder, f"{s}.json"))
                row[s] = None if content is None else content.get(key)
            rows.append(row)
        sample = self.json(self._path(str(reports), "sample.json")) or {}
        rows.append({"stage": "sample", **{s: sample.get(s, {}).get("cells_out") for s in SPLITS}})
        row = {"stage": "tokenize"}
        for s in SPLITS:
            content = self.json(self._path(str(reports), "tokenize", f"{s}.json"))
            row[s] = None if content is None else content["cells"]["tokenized"]
            if content is not None:
                row["genes"] = content["genes"]["genes_in_vocabulary"]
        rows.append(row)
        frame = pd.DataFrame(rows, columns=["stage", "genes", *SPLITS, "total"])
        per_split = frame[list(SPLITS)].apply(pd.to_numeric, errors="coerce")
        frame["total"] = frame["total"].where(
            frame["total"].notna(), per_split.sum(axis=1, min_count=1)
        )
        return "<p>Cells (and genes) left after each stage.</p>" + _table(frame)

    def _genes(self, reports: Path) -> str:
        mapping = self.json(self._path(str(reports), "genes", "mapping.json"))
        if mapping is None:
            return _missing("convert_genes")
        flat = {k: v for k, v in mapping.items() if not isinstance(v, dict)}
        flat |= {f"matched by {k}": v for k, v in mapping.get("match_kind", {}).items()}
        body = _key_values(flat)
        lost = self.tsv(self._path(str(reports), "genes", "lost_genes.tsv"))
        if lost is not None and len(lost):
            body += f"<p>{len(lost)} symbols lost; the costliest:</p>" + _table(lost.head(10))
        return body

    def _splits(self, reports: Path) -> str:
        split = self.json(self._path(str(reports), "split.json"))
        if split is None:
            return _missing("split")
        rows = []
        for s in SPLITS:
            part = split.get(s, {})
            rows.append(
                {
                    "split": s,
                    "patients": part.get("n_patients"),
                    **{
                        f"patients {k}": v
                        for k, v in part.get("patients_per_ad_status", {}).items()
                    },
                    "cells": part.get("n_cells"),
                    **{f"cells {k}": v for k, v in part.get("cells_per_ad_status", {}).items()},
                }
            )
        balance = split.get("balance_pvalues", {})
        note = ", ".join(f"{k}: p = {v:.3g}" for k, v in balance.items())
        return (
            _warnings(split)
            + _table(pd.DataFrame(rows))
            + (f"<p>Covariate balance across splits: {note}.</p>" if note else "")
        )

    def _qc(self, reports: Path) -> str:
        rows, images = [], []
        keys = (
            "cells_in",
            "removed_by_filters",
            "doublets_predicted",
            "cells_out",
            "libraries_scrublet_skipped",
        )
        for s in SPLITS:
            content = self.json(self._path(str(reports), "qc", f"{s}.json"))
            if content is not None:
                rows.append({"split": s, **{k: content.get(k) for k in keys}})
            for name in ("qc_distributions.png", "doublet_scores.png"):
                images.append(
                    self.image(self._path(str(reports), "qc", s, name), alt=f"QC {s} {name}")
                )
        if not rows:
            return _missing("qc")
        return _table(pd.DataFrame(rows)) + "".join(images)

    def _training(self, dvclive: Path) -> str:
        parts = []
        for name in ["base_model", *(f"train/{t}" for t in self.tasks)]:
            metrics_dir = self._path(str(dvclive), *name.split("/"), "plots", "metrics")
            curves = {}
            for tsv in sorted(metrics_dir.rglob("*.tsv")) if metrics_dir.is_dir() else []:
                key = tsv.relative_to(metrics_dir).with_suffix("").as_posix()
                if key.startswith("eval/") or key in ("loss", "train/loss"):
                    curves[key] = self.tsv(tsv)
            if curves:
                parts.append(
                    f"<h3>{html.escape(name)}</h3>"
                    + _img(_plot_curves(curves, title=name), alt=f"{name} curves")
                )
        return "".join(parts) or _missing("base_model / train")

    def _metrics(self, reports: Path) -> str:
        rows = []
        for task in self.tasks:
            tuned = self.json(self._path(str(reports), "eval", task, "metrics.json"))
            base = self.json(self._path(str(reports), "baseline", task, "metrics.json"))
            for level in ("cell", "patient"):
                names = _metric_names((tuned or {}).get(level, {})) or _metric_names(
                    (base or {}).get(level, {})
                )
                for metric in names:
                    rows.append(
                        {
                            "task": task,
                            "level": level,
                            "metric": metric,
                            "fine-tuned": with_ci((tuned or {}).get(level, {}), metric),
                            "baseline (logistic regression)": with_ci(
                                (base or {}).get(level, {}), metric
                            ),
                        }
                    )
        if not rows:
            return _missing("evaluate")
        return (
            "<p>Test split only; 95% percentile bootstrap intervals over patients in brackets.</p>"
            + _table(pd.DataFrame(rows))
        )

    def _donor(self, reports: Path) -> str:
        parts = []
        for task in self.tasks:
            folder = self._path(str(reports), "donor", task)
            metrics = self.json(folder / "summary.json")
            if metrics is None:
                continue
            donors = metrics.get("donors", {})
            parts.append(f"<h3>{html.escape(task)}</h3>")
            parts.append(
                f"<p>{donors.get('cv')} donors in cross-validation ({donors.get('cv_positive')} "
                f"positive), {donors.get('test')} held-out test donors "
                f"({donors.get('test_positive')} positive). CV: mean ± sd of the fold AUROCs; "
                "pooled: all out-of-fold scores (averaged over repeats) with a bootstrap interval "
                "over donors. Test: the method refitted on every CV donor, 95% bootstrap "
                "intervals over donors; accuracy at a threshold chosen on training donors. "
                "Δ: paired bootstrap against pseudobulk.</p>"
            )
            parts.append(_table(donor_table(metrics)))
            attention = self.tsv(folder / "attention.tsv")
            if attention is not None and not attention.empty:
                parts.append(
                    "<p>Gated-attention MIL on the test donors: each cell type's share of the "
                    "attention against its share of the cells (enrichment > 1: read more than "
                    "its numbers).</p>"
                )
                parts.append(_table(attention))
            for name in ("roc.png", "donor_scores.png", "attention.png"):
                if (folder / name).is_file():
                    parts.append(self.image(folder / name, alt=f"{task} donor {name}"))
        return "".join(parts) or _missing("donor")

    def _confusion(self, reports: Path) -> str:
        parts = []
        for task in self.tasks:
            for source in ("eval", "baseline"):
                folder = self._path(str(reports), source, task)
                for name in ("confusion_matrix.png", "patient_predictions.png"):
                    if (folder / name).is_file():
                        parts.append(f"<h3>{html.escape(f'{task} ({source})')}</h3>")
                        parts.append(self.image(folder / name, alt=f"{task} {source} {name}"))
        return "".join(parts) or _missing("evaluate")

    def _embeddings(self, reports: Path) -> str:
        folder = self._path(str(reports), "embed")
        metrics = self.json(folder / "metrics.json")
        if metrics is None:
            return _missing("embed")
        body = "<p>Silhouette scores (cosine) of the test-cell embeddings, per label.</p>"
        body += _scalars_and_methods(metrics, row_name="model")
        for png in sorted(folder.glob("*.png")):
            body += self.image(png, alt=png.stem)
        return body

    def _perturbation(self, reports: Path) -> str:
        folder = self._path(str(reports), "perturb")
        if not folder.is_dir():
            return _missing("perturb")
        body = ""
        summary = self.json(folder / "summary.json")
        if summary is not None:
            body += _key_values(_flatten(summary))
        for tsv in sorted(folder.glob("*.tsv")):
            table = self.tsv(tsv)
            if table is not None:
                body += f"<p>{html.escape(tsv.name)}: top 15 of {len(table)} rows</p>" + _table(
                    table.head(15)
                )
        for png in sorted(folder.glob("*.png")):
            body += self.image(png, alt=png.stem)
        return body or _missing("perturb")

    def _network(self, reports: Path) -> str:
        folder = self._path(str(reports), "grn")
        metrics = self.json(folder / "metrics.json")
        if metrics is None:
            return _missing("grn")
        summary = self.json(folder / "summary.json") or {}
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
        body = _warnings(summary) + _key_values(scalars)
        table = self.tsv(folder / "methods.tsv")
        if table is not None:
            body += (
                "<p>Each method ranks the same candidate edges; 95% intervals from a bootstrap "
                "over regulators. EPR: precision among the top K edges (K = true edges) over "
                "the positive rate; 1 is random.</p>" + _table(_with_intervals(table))
            )
        evaluation = summary.get("evaluation") or {}
        cases = evaluation.get("cases")
        if isinstance(cases, dict) and cases:
            recovered = {case: row["recovered"] for case, row in cases.items()}
            body += (
                "<p>Planted edges and decoys ranked within their regulator's top K (K = its "
                "true edges); for decoys (indirect) lower is better.</p>"
                + _table(pd.DataFrame(recovered).T.reset_index(names="case"))
            )
        for key in ("truth", "tf_list"):
            if isinstance(evaluation.get(key), dict):
                body += f"<p>{key}</p>" + _key_values(_flatten(evaluation[key]))
        return body + "".join(self.image(png, alt=png.stem) for png in sorted(folder.glob("*.png")))

    def _tuning(self, reports: Path) -> str:
        folder = self._path(str(reports), "tune")
        metrics = self.json(folder / "metrics.json")
        if metrics is None:
            return _missing("tune")
        body = _key_values(_flatten(metrics))
        best = folder / "best_params.yaml"
        if best.is_file():
            self._note(best)
            body += f"<pre>{html.escape(best.read_text())}</pre>"
        trials = self.tsv(folder / "trials.tsv")
        if trials is not None:
            body += _table(trials.drop(columns=["error"], errors="ignore"))
        for png in sorted(folder.glob("*.png")):
            body += self.image(png, alt=png.stem)
        return body


# -- rendering helpers ---------------------------------------------------------------------


def _img(png: bytes, *, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _warnings(content: Mapping[str, Any]) -> str:
    messages = warning_messages(content)
    if not messages:
        return ""
    items = "".join(f"<li>{html.escape(m)}</li>" for m in messages)
    return f'<ul class="warning">{items}</ul>'


def _missing(stage: str) -> str:
    return f'<p class="missing">Not available yet: run the <code>{html.escape(stage)}</code> stage.</p>'


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_format(v)}</td>" for v in row) + "</tr>"
        for row in frame.astype(object).itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """``metric``, ``metric_low`` and ``metric_high`` columns merged into ``value [low, high]``."""
    out = table.copy()
    for column in [c for c in table.columns if f"{c}_low" in table.columns]:
        out[column] = [
            f"{_format(v)} [{_format(lo)}, {_format(hi)}]"
            for v, lo, hi in zip(
                table[column], table[f"{column}_low"], table[f"{column}_high"], strict=True
            )
        ]
        out = out.drop(columns=[f"{column}_low", f"{column}_high"])
    return out


def _key_values(values: Mapping[str, Any]) -> str:
    return _table(pd.DataFrame({"quantity": list(values), "value": list(values.values())}))


def _list(items: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li><code>{html.escape(i)}</code></li>" for i in items) + "</ul>"


def _scalars_and_methods(metrics: Mapping[str, Any], *, row_name: str = "method") -> str:
    """Scalars as key-value rows, then a table with one row per nested mapping."""
    methods = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    scalars = {k: v for k, v in metrics.items() if k not in methods}
    body = _key_values(_flatten(scalars)) if scalars else ""
    if methods:
        body += _table(pd.DataFrame(methods).T.reset_index(names=row_name))
    return body


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}.")
        elif not isinstance(value, list):
            flat[name] = value
    return flat


def _metric_names(level: Mapping[str, Any]) -> list[str]:
    return [
        k
        for k, v in level.items()
        if isinstance(v, (int, float))
        and not k.endswith(("_ci_low", "_ci_high"))
        and not k.startswith("n_")
    ]


def _difference(entry: Mapping[str, Any], prefix: str) -> str | None:
    value = entry.get(f"{prefix}_difference")
    if value is None:
        return None
    low, high = entry.get(f"{prefix}_ci_low"), entry.get(f"{prefix}_ci_high")
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}] p={entry.get(f'{prefix}_p_value'):.3g}"


def donor_table(metrics: Mapping[str, Any], *, reference: str = "pseudobulk") -> pd.DataFrame:
    """One row per donor method of ``reports/donor/<task>/summary.json``: CV and test AUROC with
    intervals, the threshold, accuracy there, and the paired difference with ``reference``."""
    rows = []
    for name, entry in metrics.get("methods", {}).items():
        rows.append(
            {
                "method": name,
                "CV AUROC (mean ± sd)": mean_sd(entry),
                "CV pooled AUROC": with_ci(entry, "cv_pooled_auroc"),
                "test AUROC": with_ci(entry, "test_auroc"),
                "threshold": entry.get("threshold"),
                "test accuracy": with_ci(entry, "test_accuracy"),
                "test balanced accuracy": with_ci(entry, "test_balanced_accuracy"),
                f"CV Δ vs {reference}": _difference(entry, f"cv_vs_{reference}"),
                f"test Δ vs {reference}": _difference(entry, f"test_vs_{reference}"),
            }
        )
    return pd.DataFrame(rows)


def _plot_curves(curves: Mapping[str, pd.DataFrame | None], *, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in curves.items() if v is not None and len(v)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        frame = curves[name]
        value = frame.columns[-1]
        ax.plot(frame["step"], frame[value], marker="o", markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("dvclive step")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 75rem; color: #222; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; margin: 0.5rem 0; display: block; }
.missing { color: #a33; font-style: italic; }
.warning { color: #8a5300; background: #fff6e0; padding: 0.4rem 0.4rem 0.4rem 1.6rem; }
"""

# Marks the page once loaded: how many images failed to decode (a browser test reads it).
CHECK_SCRIPT = """
window.addEventListener("load", () => {
  const broken = [...document.images].filter((img) => !img.complete || img.naturalWidth === 0);
  document.body.setAttribute("data-broken-images", String(broken.length));
  document.body.setAttribute("data-images", String(document.images.length));
});
"""


def render_page(sections: Mapping[str, str]) -> str:
    """The HTML page, one ``<section id=...>`` per entry of :data:`SECTIONS`."""
    nav = "".join(f'<a href="#{key}">{html.escape(title)}</a>' for key, title in SECTIONS)
    body = "".join(
        f'<section id="{key}"><h2>{html.escape(title)}</h2>{sections.get(key, _missing(key))}</section>'
        for key, title in SECTIONS
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>rosmap-geneformer report</title>"
        f"<style>{CSS}</style><script>{CHECK_SCRIPT}</script></head>"
        f"<body><h1>rosmap-geneformer report</h1><nav>{nav}</nav>{body}</body></html>\n"
    )
