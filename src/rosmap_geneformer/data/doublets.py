"""Scrublet doublet detection for one library: the runs, their parts and the score threshold.

ROSMAP's released processing ran Scrublet per library (expected doublet rate 0.045, 20 principal
components) and removed predicted doublets. :func:`run_scrublet` scores one library's cells with
:func:`scanpy.pp.scrublet` on a copy of their raw counts and calls doublets; a large library is
scored in seeded random parts (:func:`scrublet_parts`) so that memory stays bounded.
:mod:`rosmap_geneformer.data.qc` calls these for every library.

Doublet threshold
-----------------
``sc.pp.scrublet(threshold=None)`` needs scikit-image (``threshold_minimum``), which the lock
file does not carry, so it would fail. Scrublet's own rule is also fragile on small libraries
(100-200 cells, as in the demo): the doublet scores take few distinct values and the minimum
between the two modes of the simulated-score histogram sometimes lands inside the singlet mode,
calling up to 90 % of a library (measured on synthetic libraries). The threshold here is
therefore chosen by :func:`choose_doublet_threshold`:

- a fixed ``threshold`` when one is given;
- otherwise Scrublet's rule, ported: the minimum between the two modes of the 256-bin histogram
  of the simulated doublets' scores (:func:`threshold_minimum`); Otsu's threshold on the same
  scores when the histogram has no two modes;
- capped from below by the ``1 - max_doublet_fraction`` quantile of the library's observed
  scores (default ``max_doublet_fraction = 2 * expected_doublet_rate``), so one library can never
  lose more than that fraction of its cells to a misplaced threshold. Which rule set each
  library's threshold is in the report.

Nearest neighbours use exact search (``use_approx_neighbors=False``, scikit-learn brute force):
scanpy otherwise switches to pynndescent above 8,192 points (observed + simulated, i.e. libraries
above ~2,700 cells), whose numba compilation takes ~45 s on 2 cores; exact search takes ~2 s for a
5,000-cell library and ~14 s for 20,000 cells, with identical scores.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
from scipy import ndimage, sparse

from rosmap_geneformer.errors import InputError

#: Fixed bins of the doublet-score histograms kept for the plot (scores lie in [0, 1]).
SCORE_BINS = np.linspace(0.0, 1.0, 401)


# --------------------------------------------------------------------------------------------
# Doublet threshold


def _local_maxima(hist: np.ndarray) -> list[int]:
    # Plateau-aware, as in skimage.filters.threshold_minimum.
    maxima: list[int] = []
    rising = True
    for i in range(hist.shape[0] - 1):
        if rising:
            if hist[i + 1] < hist[i]:
                rising = False
                maxima.append(i)
        elif hist[i + 1] > hist[i]:
            rising = True
    return maxima


def _histogram(values: np.ndarray, nbins: int) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(values, bins=nbins, range=(values.min(), values.max()))
    return counts, (edges[:-1] + edges[1:]) / 2


def threshold_minimum(
    values: np.ndarray, *, nbins: int = 256, max_iter: int = 10_000
) -> float | None:
    """Scrublet's automatic threshold: the minimum between the two modes of a histogram.

    A port of :func:`skimage.filters.threshold_minimum` (which ``sc.pp.scrublet`` calls and the
    lock file lacks): the histogram is smoothed with a width-3 running mean until it has at most
    two local maxima; the threshold is the bin centre of the lowest point between them.

    Returns
    -------
    The threshold, or ``None`` when the histogram does not have two modes.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or values.min() == values.max():
        return None
    counts, centres = _histogram(values, nbins)
    smooth = counts.astype(np.float32)
    maxima: list[int] = []
    for _ in range(max_iter):
        smooth = ndimage.uniform_filter1d(smooth, 3)
        maxima = _local_maxima(smooth)
        if len(maxima) < 3:
            break
    if len(maxima) != 2:
        return None
    lowest = int(np.argmin(smooth[maxima[0] : maxima[1] + 1]))
    return float(centres[maxima[0] + lowest])


def threshold_otsu(values: np.ndarray, *, nbins: int = 256) -> float | None:
    """Otsu's threshold (maximal between-class variance) of a 256-bin histogram, or ``None``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or values.min() == values.max():
        return None
    counts, centres = _histogram(values, nbins)
    counts = counts.astype(np.float64)
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    m1 = np.divide(np.cumsum(counts * centres), w1, out=np.zeros_like(w1), where=w1 > 0)
    tail = np.cumsum((counts * centres)[::-1])[::-1]
    m2 = np.divide(tail, w2, out=np.zeros_like(w2), where=w2 > 0)
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def choose_doublet_threshold(
    sim_scores: np.ndarray,
    obs_scores: np.ndarray,
    *,
    max_fraction: float,
    threshold: float | None = None,
) -> tuple[float, str]:
    """Doublet-score threshold of one library and the rule that set it.

    Parameters
    ----------
    sim_scores
        Scores of Scrublet's simulated doublets.
    obs_scores
        Scores of the library's cells.
    max_fraction
        Largest fraction of cells an automatic threshold may call doublets.
    threshold
        A fixed threshold, returned as is.

    Returns
    -------
    ``(threshold, rule)``; cells with a score strictly above the threshold are doublets. ``rule``
    is ``fixed``, ``minimum`` (Scrublet's rule), ``otsu`` (no two modes) or ``none`` (no spread
    in the scores: nothing called), with ``+capped`` when the cap raised it.
    """
    if threshold is not None:
        return float(threshold), "fixed"
    auto = threshold_minimum(sim_scores)
    rule = "minimum"
    if auto is None:
        auto, rule = threshold_otsu(sim_scores), "otsu"
    if auto is None:
        # Scores never exceed 1, so nothing is called.
        return 1.0, "none"
    obs_scores = np.asarray(obs_scores, dtype=np.float64)
    obs_scores = obs_scores[np.isfinite(obs_scores)]
    if obs_scores.size:
        cap = float(np.quantile(obs_scores, 1.0 - max_fraction))
        if cap > auto:
            return cap, f"{rule}+capped"
    return float(auto), rule


# --------------------------------------------------------------------------------------------
# Scrublet


@dataclass(kw_only=True)
class ScrubletResult:
    """Scrublet's output for one library."""

    scores: np.ndarray
    predicted: np.ndarray
    threshold: float
    rule: str
    sim_scores: np.ndarray


def run_scrublet(
    counts: Any,
    *,
    expected_doublet_rate: float,
    n_prin_comps: int,
    random_state: int,
    threshold: float | None = None,
    max_doublet_fraction: float | None = None,
    library: str = "",
) -> ScrubletResult:
    """Score the cells of one library with :func:`scanpy.pp.scrublet` and call doublets.

    Parameters
    ----------
    counts
        Raw counts of the library, cells x genes; copied, never modified.
    expected_doublet_rate
        Scrublet's ``expected_doublet_rate``.
    n_prin_comps
        Scrublet's ``n_prin_comps``.
    random_state
        Scrublet's ``random_state`` (doublet simulation and PCA).
    threshold
        Fixed threshold; ``None`` uses :func:`choose_doublet_threshold`.
    max_doublet_fraction
        Cap for the automatic threshold; ``None`` means ``2 * expected_doublet_rate``.
    library
        Library name, for error messages.
    """
    import scanpy as sc

    work = ad.AnnData(X=sparse.csr_matrix(counts, dtype=np.float32, copy=True))
    try:
        # threshold=0.0 only stops scanpy from needing scikit-image; the call is made below.
        sc.pp.scrublet(
            work,
            expected_doublet_rate=expected_doublet_rate,
            n_prin_comps=n_prin_comps,
            random_state=random_state,
            use_approx_neighbors=False,
            threshold=0.0,
            verbose=False,
        )
    except ValueError as err:
        msg = (
            f"Scrublet failed on library {library!r} ({work.n_obs} cells x {work.n_vars} genes): "
            f"{err}. Lower qc.scrublet.n_prin_comps or raise qc.scrublet.min_cells_per_library."
        )
        raise InputError(msg) from err
    # scanpy drops cells with < 3 genes before scoring; those get NaN and are never called.
    scores = work.obs["doublet_score"].to_numpy(dtype=np.float64)
    sim = np.asarray(work.uns["scrublet"]["doublet_scores_sim"], dtype=np.float64)
    cap = 2.0 * expected_doublet_rate if max_doublet_fraction is None else max_doublet_fraction
    thr, rule = choose_doublet_threshold(
        sim, scores, max_fraction=min(cap, 1.0), threshold=threshold
    )
    predicted = np.nan_to_num(scores, nan=-np.inf) > thr
    return ScrubletResult(
        scores=scores, predicted=predicted, threshold=thr, rule=rule, sim_scores=sim
    )


def scrublet_parts(
    cells: np.ndarray, max_cells: int | None, *, seed: int, library: str
) -> list[np.ndarray]:
    """``cells`` in one part, or in seeded random parts of at most ``max_cells`` (each sorted).

    The parts depend on the seed and the library name only, not on the order libraries run in.
    """
    if max_cells is None or len(cells) <= max_cells:
        return [cells]
    n_parts = -(-len(cells) // max_cells)
    rng = np.random.default_rng([seed, zlib.crc32(library.encode())])
    shuffled = rng.permutation(cells)
    return [np.sort(shuffled[i::n_parts]) for i in range(n_parts)]
