"""The QC outputs of a split: the plots and the files written from a :class:`QCResult`.

:func:`write_reports` writes what the ``qc`` stage declares: the JSON report, the cell table with
every cell's metrics and fate, the per-library TSV and two PNGs (metric distributions before and
after QC, and doublet scores with the per-library thresholds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rosmap_geneformer import io
from rosmap_geneformer.counts import write_cells
from rosmap_geneformer.data.doublets import SCORE_BINS
from rosmap_geneformer.data.qc import QCResult

# --------------------------------------------------------------------------------------------
# Plots


def _plain_log_ticks(axis: Any, subs: tuple[float, ...] = (1.0, 2.0, 5.0)) -> None:
    # Log axes labelled 1, 2, 5, 10, 20, ... rather than 2x10^1.
    import matplotlib.ticker as mticker

    axis.set_major_locator(mticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(mticker.NullFormatter())


def plot_qc_distributions(result: QCResult) -> Any:
    """Histograms of ``n_genes``, ``total_counts`` and ``pct_counts_mt`` before and after QC."""
    from matplotlib.figure import Figure

    cells, s = result.cells, result.settings
    kept = cells["kept"].to_numpy()
    panels = [
        ("n_genes", "genes detected per cell", s.min_genes, "min_genes", True),
        ("total_counts", "total counts per cell", s.min_counts, "min_counts", True),
        ("pct_counts_mt", "% counts on MT- genes", s.max_pct_mito, "max_pct_mito", False),
    ]
    # A bare Figure, not pyplot: no global backend or figure registry is touched.
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    for ax, (column, label, cut, name, log) in zip(axes, panels, strict=True):
        values = cells[column].to_numpy(dtype=np.float64)
        if log:
            lo = max(1.0, np.nanmin(values) if values.size else 1.0)
            hi = max(lo * 10, np.nanmax(values) if values.size else 10.0)
            bins = np.geomspace(lo, hi, 60)
            values = np.clip(values, lo, None)
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis, subs=(1.0, 3.0))
        else:
            bins = np.linspace(
                0.0, max(100.0 if values.size == 0 else np.nanmax(values), cut) * 1.02 + 1e-9, 60
            )
        ax.hist(values, bins=bins, color="0.6", alpha=0.8, label=f"before ({values.size:,} cells)")
        ax.hist(
            values[kept],
            bins=bins,
            color="tab:blue",
            alpha=0.7,
            label=f"after ({int(kept.sum()):,} cells)",
        )
        ax.axvline(cut, color="tab:red", linestyle="--", linewidth=1.5, label=f"{name} = {cut:g}")
        ax.set_xlabel(label)
        ax.set_ylabel("cells (log scale)")
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.set_title(f"{column}: {int(cells[f'fail_{name}'].sum()):,} cells fail {name}")
        ax.legend(fontsize=8)
    split = result.report.get("split") or ""
    fig.suptitle(
        f"QC {split}: {result.report['cells_in']:,} -> {result.report['cells_out']:,} cells "
        f"({result.report['removed_by_filters']:,} by filters, "
        f"{result.report['doublets_predicted']:,} doublets)"
    )
    fig.tight_layout()
    return fig


def plot_doublet_scores(result: QCResult) -> Any:
    """Doublet scores pooled over libraries (observed and simulated) and per-library thresholds."""
    from matplotlib.figure import Figure

    cells, libs = result.cells, result.libraries
    scored = cells["doublet_score"].notna().to_numpy()
    scores = cells.loc[scored, "doublet_score"].to_numpy()
    called = cells.loc[scored, "predicted_doublet"].to_numpy(dtype=bool)
    thresholds = libs["doublet_threshold"].dropna().to_numpy(dtype=np.float64)
    # A bare Figure, not pyplot: no global backend or figure registry is touched.
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    ax = axes[0]
    ax.hist(
        [scores[~called], scores[called]],
        bins=SCORE_BINS,
        stacked=True,
        color=["tab:blue", "tab:red"],
        label=[f"singlets ({int((~called).sum()):,})", f"called doublets ({int(called.sum()):,})"],
    )
    ax.set_title("observed cells (all scrubbed libraries)")
    ax.set_xlabel("Scrublet doublet score")
    ax.set_ylabel("cells")
    ax = axes[1]
    centres = (SCORE_BINS[:-1] + SCORE_BINS[1:]) / 2
    ax.bar(
        centres,
        result.sim_hist,
        width=np.diff(SCORE_BINS),
        color="tab:orange",
        alpha=0.8,
        label="simulated doublets",
    )
    ax.set_title("simulated doublets (all scrubbed libraries)")
    ax.set_xlabel("Scrublet doublet score")
    ax.set_ylabel("simulated doublets")
    # Zoom on the occupied range: small libraries never score near 1.
    occupied = SCORE_BINS[1:][result.sim_hist > 0]
    top = max([*occupied, *scores, *thresholds, 0.05])
    xmax = min(1.0, 1.1 * float(top))
    for axis in axes[:2]:
        if scores.size:
            axis.set_yscale("log")
            _plain_log_ticks(axis.yaxis)
        if thresholds.size:
            axis.axvspan(
                thresholds.min(),
                thresholds.max(),
                color="tab:red",
                alpha=0.12,
                label="range of library thresholds",
            )
            axis.axvline(
                float(np.median(thresholds)),
                color="tab:red",
                linestyle="--",
                label=f"median threshold {np.median(thresholds):.3f}",
            )
        axis.set_xlim(0, xmax)
        axis.legend(fontsize=8)
    ax = axes[2]
    scrubbed = libs[libs["doublet_threshold"].notna()]
    if len(scrubbed):
        for rule, group in scrubbed.groupby("scrublet", sort=True):
            ax.scatter(
                group["cells_in"] - group["removed_by_filters"],
                group["doublet_threshold"],
                s=18,
                label=f"{rule} ({len(group)})",
            )
        ax.legend(fontsize=8, title="threshold rule", title_fontsize=8)
    else:
        ax.text(
            0.5,
            0.5,
            "Scrublet did not run\n(disabled or all libraries too small)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_title("threshold per library")
    ax.set_xlabel("cells scored (after filters)")
    ax.set_ylabel("doublet-score threshold")
    split = result.report.get("split") or ""
    fig.suptitle(
        f"Scrublet {split}: {result.report['doublets_predicted']:,} doublets in "
        f"{result.report['cells_scrubbed']:,} scored cells, {result.report['libraries_scrubbed']} "
        f"libraries scored, {result.report['libraries_scrublet_skipped']} skipped"
    )
    fig.tight_layout()
    return fig


def write_reports(
    result: QCResult, *, report: str | Path, plots: str | Path, cells: str | Path
) -> None:
    """Write the JSON report, the per-library TSV, the two PNGs and the cell table.

    The cell table (Parquet) lists every input cell with its metrics, the filters it failed, its
    doublet score and call, and whether it was kept, so no removal goes unrecorded; the stages
    after QC read the kept cells from it.
    """
    plots = Path(plots)
    io.write_json(result.report, report)
    write_cells(result.cells, cells)
    io.write_tsv(result.libraries, plots / "libraries.tsv")
    io.save_figure(plot_qc_distributions(result), plots / "qc_distributions.png")
    io.save_figure(plot_doublet_scores(result), plots / "doublet_scores.png")
