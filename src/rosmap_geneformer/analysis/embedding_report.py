"""Cell embeddings of several models side by side: one AnnData, UMAPs and silhouette scores.

The embeddings themselves come from :mod:`rosmap_geneformer.analysis.embeddings` (Geneformer's
convention: mean over gene positions of one layer, special tokens excluded). Here they are
collected in one :class:`~anndata.AnnData` (``obsm["X_<model>"]``), laid out with UMAP and
scored with silhouette widths per label, so the base and fine-tuned models can be compared on
the same cells:

- ``cell_type`` should separate in every model (a base model that does not separate cell types
  has learnt little);
- ``ad_status`` should separate more after fine-tuning on the disease task;
- ``patient_id`` measures donor effects (high = cells cluster by donor, a warning sign for a
  donor-level label).

A reference embedding without any model, PCA of the highly variable genes of the same cells
(:func:`hvg_pca_embedding`), is reported beside them: Kedzierska et al. (Genome Biology 2025)
found that zero-shot foundation-model embeddings are often beaten by it.

Neighbours are exact (brute-force k-NN, scikit-learn), UMAP and any subsample are seeded, so the
same embeddings give the same coordinates and scores.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)

LABELS = ("cell_type", "ad_status", "patient_id")
# Beyond this many categories a legend is unreadable: the panel title gives the count instead.
_MAX_LEGEND = 30
_PALETTE_SMALL = "tab10"
_PALETTE_MEDIUM = "tab20"
# AD status keeps the colours of the evaluation plots.
_FIXED_COLOURS = {"control": "tab:blue", "AD": "tab:red"}


def embedding_key(model: str) -> str:
    """``obsm`` key of a model's embedding (``X_<model>``)."""
    return f"X_{model}"


def umap_key(model: str) -> str:
    """``obsm`` key of a model's UMAP coordinates (``X_umap_<model>``)."""
    return f"X_umap_{model}"


def build_anndata(obs: pd.DataFrame, embeddings: Mapping[str, np.ndarray]) -> ad.AnnData:
    """One AnnData holding every model's embedding of the same cells.

    Parameters
    ----------
    obs
        One row per cell, indexed by cell id (labels such as ``patient_id``, ``cell_type``,
        ``ad_status``); string columns become categoricals.
    embeddings
        ``{model: cells x hidden}``, rows in ``obs`` order.

    Returns
    -------
    An AnnData without ``X`` (0 genes); ``obsm["X_<model>"]`` float32 per model.
    """
    if not obs.index.is_unique:
        dups = obs.index[obs.index.duplicated()].unique()[:5].tolist()
        msg = f"obs: duplicate cell ids, e.g. {dups}; embeddings need one row per cell."
        raise InputError(msg)
    frame = obs.copy()
    frame.index = frame.index.astype(str)
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = pd.Categorical(frame[column].astype(str))
    adata = ad.AnnData(obs=frame)
    for model, values in embeddings.items():
        array = np.asarray(values, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] != len(frame):
            msg = (
                f"embedding {model!r}: expected shape (n_cells={len(frame)}, hidden), got "
                f"{array.shape}; pass one row per cell, in obs order."
            )
            raise InputError(msg)
        if not np.all(np.isfinite(array)):
            msg = f"embedding {model!r}: contains NaN or infinite values."
            raise InputError(msg)
        adata.obsm[embedding_key(model)] = array
    return adata


def hvg_pca_embedding(
    counts: Any,
    *,
    n_top_genes: int = 2000,
    n_components: int = 50,
    target_sum: float = 1.0e4,
    seed: int = 0,
) -> np.ndarray:
    """The standard scanpy embedding of raw counts: PCA of scaled log1p CP10k of the HVGs.

    Unsupervised and fitted on the cells given (no labels are used), as for any embedding. Uses
    the baseline's feature code (:class:`rosmap_geneformer.analysis.baselines.FeatureMap`).

    Parameters
    ----------
    counts
        Raw counts, cells x genes.
    n_top_genes
        Highly variable genes (Seurat's method).
    n_components
        PCA components.
    target_sum
        Counts per cell after normalisation.
    seed
        Seeds PCA.

    Returns
    -------
    Cells x components, float32.
    """
    from rosmap_geneformer.analysis.baselines import FeatureMap, log_normalize

    log_counts = log_normalize(counts, target_sum=target_sum)
    features = FeatureMap.fit(
        log_counts, n_top_genes=n_top_genes, n_components=n_components, seed=seed
    )
    return features.transform(log_counts).astype(np.float32)


def subsample(n_cells: int, max_cells: int | None, *, seed: int) -> np.ndarray:
    """Sorted positions of a seeded subsample of at most ``max_cells`` cells (all when fewer)."""
    if max_cells is None or n_cells <= max_cells:
        return np.arange(n_cells)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_cells, size=max_cells, replace=False))


def silhouette_scores(
    embedding: np.ndarray,
    obs: pd.DataFrame,
    *,
    labels: Sequence[str] = LABELS,
    metric: str = "cosine",
    max_cells: int | None = 10000,
    seed: int = 0,
) -> dict[str, float | None]:
    """Mean silhouette width of the cells grouped by each label.

    Parameters
    ----------
    embedding
        Cells x dimensions.
    obs
        Labels of the cells (same row order).
    labels
        Columns of ``obs`` to score.
    metric
        Distance (scikit-learn name); ``cosine`` by default, as embeddings are compared by angle.
    max_cells
        Score a seeded subsample of this many cells (the cost grows with the square of the cell
        count); the same cells for every label. ``None``: all cells.
    seed
        Seeds the subsample.

    Returns
    -------
    ``{label: score}`` in [-1, 1]; ``None`` (logged) when the label has fewer than two groups or
    as many groups as cells among the scored cells.
    """
    from sklearn.metrics import silhouette_score

    rows = subsample(len(obs), max_cells, seed=seed)
    values = np.asarray(embedding, dtype=np.float64)[rows]
    scores: dict[str, float | None] = {}
    for label in labels:
        if label not in obs.columns:
            msg = f"obs lacks column {label!r} (has {list(obs.columns)}); cannot score it."
            raise InputError(msg)
        groups = obs[label].astype(str).to_numpy()[rows]
        n_groups = len(np.unique(groups))
        if not 2 <= n_groups < len(groups):
            logger.warning(
                "silhouette for %s is undefined (%d groups among %d cells); reporting null",
                label,
                n_groups,
                len(groups),
            )
            scores[label] = None
            continue
        scores[label] = float(silhouette_score(values, groups, metric=metric))
    return scores


def compute_umap(
    embedding: np.ndarray,
    *,
    n_neighbors: int = 15,
    metric: str = "cosine",
    min_dist: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """2-D UMAP coordinates (float32) of an embedding, from exact k-nearest neighbours.

    scanpy's ``neighbors`` with the scikit-learn brute-force transformer (exact, no pynndescent
    compilation or approximation), then ``tl.umap`` seeded with ``seed``.
    """
    import scanpy as sc

    values = np.asarray(embedding, dtype=np.float32)
    if len(values) < 3:
        msg = f"UMAP needs at least 3 cells, got {len(values)}."
        raise InputError(msg)
    work = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(values))]))
    work.obsm["X_emb"] = values
    sc.pp.neighbors(
        work,
        n_neighbors=min(n_neighbors, len(values) - 1),
        use_rep="X_emb",
        metric=metric,
        transformer="sklearn",
        random_state=seed,
    )
    sc.tl.umap(work, min_dist=min_dist, random_state=seed)
    return np.asarray(work.obsm["X_umap"], dtype=np.float32)


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps[_PALETTE_SMALL](i) for i in range(n)]
    if n <= 20:
        return [colormaps[_PALETTE_MEDIUM](i) for i in range(n)]
    # Many donors: evenly spaced hues; individual donors are not meant to be told apart.
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


def plot_umaps(
    coordinates: np.ndarray,
    obs: pd.DataFrame,
    *,
    title: str,
    labels: Sequence[str] = LABELS,
    silhouettes: Mapping[str, float | None] | None = None,
    seed: int = 0,
) -> Any:
    """One row of UMAP panels, one per label, each coloured by its categories.

    Parameters
    ----------
    coordinates
        Cells x 2.
    obs
        Labels of the cells.
    title
        Figure title (the model).
    labels
        Columns of ``obs``, one panel each.
    silhouettes
        Scores to print in the panel titles.
    seed
        Seeds the drawing order (cells are drawn shuffled, so no category hides the others).
    """
    from matplotlib.figure import Figure

    xy = np.asarray(coordinates, dtype=np.float64)
    n = len(xy)
    order = np.random.default_rng(seed).permutation(n)
    size = float(np.clip(20000.0 / max(n, 1), 0.5, 20.0))
    fig = Figure(figsize=(6.2 * len(labels), 5.4))
    axes = np.atleast_1d(fig.subplots(1, len(labels)))
    for ax, label in zip(axes, labels, strict=True):
        values = obs[label].astype(str).to_numpy()
        categories = sorted(set(values))
        if set(categories) <= set(_FIXED_COLOURS):
            palette = {c: _FIXED_COLOURS[c] for c in categories}
        else:
            palette = dict(zip(categories, _colours(len(categories)), strict=True))
        colours = [palette[v] for v in values[order]]
        ax.scatter(xy[order, 0], xy[order, 1], c=colours, s=size, linewidths=0, rasterized=True)
        heading = f"{label} ({len(categories)})"
        if silhouettes is not None and silhouettes.get(label) is not None:
            heading += f"\nsilhouette {silhouettes[label]:.3f}"
        ax.set_title(heading, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.set_aspect("equal", adjustable="datalim")
        if len(categories) <= _MAX_LEGEND:
            handles = [
                ax.scatter([], [], color=palette[c], s=30, label=f"{c} ({(values == c).sum():,})")
                for c in categories
            ]
            ax.legend(
                handles=handles,
                loc="upper left",
                bbox_to_anchor=(1.0, 1.0),
                fontsize=8,
                frameon=False,
                ncols=1 if len(categories) <= 15 else 2,
            )
    fig.suptitle(f"{title}: {n:,} cells", fontsize=13)
    fig.tight_layout()
    return fig


def embedding_report(
    adata: ad.AnnData,
    *,
    models: Sequence[str],
    labels: Sequence[str] = LABELS,
    n_neighbors: int = 15,
    metric: str = "cosine",
    silhouette_max_cells: int | None = 10000,
    seed: int = 0,
) -> tuple[dict[str, dict[str, float | None]], dict[str, Any]]:
    """UMAP coordinates (added to ``adata.obsm``), silhouettes and figures for each model.

    Parameters
    ----------
    adata
        From :func:`build_anndata`.
    models
        Models to report, each with ``obsm["X_<model>"]``.
    labels
        ``obs`` columns to score and colour by.
    n_neighbors, metric
        k-NN graph of the UMAP; ``metric`` is also the silhouette distance.
    silhouette_max_cells
        See :func:`silhouette_scores`.
    seed
        Seeds UMAP, the silhouette subsample and the drawing order.

    Returns
    -------
    ``{model: {label: silhouette}}`` and ``{model: matplotlib Figure}``.
    """
    scores: dict[str, dict[str, float | None]] = {}
    figures: dict[str, Any] = {}
    for model in models:
        key = embedding_key(model)
        if key not in adata.obsm:
            msg = f"no embedding for model {model!r} (obsm has {sorted(adata.obsm)})."
            raise InputError(msg)
        values = adata.obsm[key]
        scores[model] = silhouette_scores(
            values,
            adata.obs,
            labels=labels,
            metric=metric,
            max_cells=silhouette_max_cells,
            seed=seed,
        )
        adata.obsm[umap_key(model)] = compute_umap(
            values, n_neighbors=n_neighbors, metric=metric, seed=seed
        )
        figures[model] = plot_umaps(
            adata.obsm[umap_key(model)],
            adata.obs,
            title=model,
            labels=labels,
            silhouettes=scores[model],
            seed=seed,
        )
        logger.info("%s: silhouette %s", model, scores[model])
    return scores, figures
