"""Scoring pipeline outputs against the demo data's planted truth (``data/raw/demo/truth/``).

The pipeline never reads the truth; tests, benchmarks and the report do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score

from rosmap_geneformer.analysis.perturbation.encodings import PERTURB_TYPES
from rosmap_geneformer.data.gene_map import map_symbols
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.io import read_table


def qc_against_truth(cells: pd.DataFrame, truth_cells: pd.DataFrame) -> dict[str, Any]:
    """How well QC removed the injected low-quality cells and doublets.

    Parameters
    ----------
    cells
        The per-cell QC tables of all splits (index = cell name; columns ``kept``,
        ``predicted_doublet``, ``doublet_score``).
    truth_cells
        ``truth/cells.tsv`` (columns ``cell``, ``is_doublet``, ``is_low_quality``).
    """
    truth = truth_cells.set_index("cell").reindex(cells.index)
    if truth["is_doublet"].isna().any():
        msg = "QC tables name cells that truth/cells.tsv does not know; are they from this demo?"
        raise InputError(msg)
    is_doublet = truth["is_doublet"].astype(bool)
    low_quality = truth["is_low_quality"].astype(bool)
    kept = cells["kept"].astype(bool)
    called = cells["predicted_doublet"].astype(bool)
    scored = cells["doublet_score"].notna()
    true_calls = int((called & is_doublet).sum())
    return {
        "low_quality_injected": int(low_quality.sum()),
        "low_quality_removed_fraction": float((~kept[low_quality]).mean()),
        "normal_cells_removed_by_filters": int(
            (~kept & ~called & ~low_quality & ~is_doublet).sum()
        ),
        "doublets_injected": int(is_doublet.sum()),
        "doublets_scored": int((is_doublet & scored).sum()),
        "doublets_called": int(called.sum()),
        "scrublet_recall": true_calls / max(int(is_doublet.sum()), 1),
        "scrublet_recall_scored_libraries": true_calls / max(int((is_doublet & scored).sum()), 1),
        "scrublet_precision": true_calls / max(int(called.sum()), 1),
        "doublets_removed_fraction": float((~kept[is_doublet]).mean()),
    }


def mapping_against_truth(truth_genes: pd.DataFrame, gene_map: pd.DataFrame) -> dict[str, Any]:
    """Fraction of the generator's mappable genes that map to their true Ensembl id.

    Parameters
    ----------
    truth_genes
        ``truth/genes.tsv`` (``var_name``, ``ensembl_id``, ``kind``).
    gene_map
        The ``gene_map`` stage's table.
    """
    mapped = map_symbols(truth_genes["var_name"], gene_map)
    expected = truth_genes["ensembl_id"].fillna("").astype(str).to_numpy()
    got = mapped["ensembl_id"].fillna("").astype(str).to_numpy()
    mappable = expected != ""
    by_kind = {}
    for kind in sorted(truth_genes["kind"].unique()):
        rows = (truth_genes["kind"] == kind).to_numpy()
        by_kind[kind] = float((got[rows] == expected[rows]).mean())
    return {
        "mappable_genes": int(mappable.sum()),
        "mappable_recovered_fraction": float((got[mappable] == expected[mappable]).mean()),
        "unmappable_wrongly_mapped": int(((got != "") & ~mappable).sum()),
        "agreement_by_kind": by_kind,
    }


def perturbation_against_truth(
    table: pd.DataFrame,
    truth_ad: pd.DataFrame,
    *,
    perturb_type: str,
    cell_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Where the planted AD genes rank in a ``perturb`` table, each in its expected direction.

    Deleting a gene that AD raises should move AD cells towards control (the top of a table
    ranked by the shift towards the goal); deleting one that AD lowers should move them further
    towards AD (the bottom). Overexpression expects the opposite. Each planted gene's percentile
    is taken from the end it is expected at, so 0 is the best place and random genes average 0.5.

    Parameters
    ----------
    table
        A ``reports/perturb/<type>.tsv`` table in its ranked order (column ``gene``: Ensembl id).
    truth_ad
        ``truth/ad_genes.tsv`` (``ensembl_id``, ``gene``, ``cell_types``, ``direction``).
    perturb_type
        ``"delete"`` or ``"overexpress"``.
    cell_types
        The cell types that were perturbed: planted genes acting only in other types are left
        out. ``None``: all.

    Returns
    -------
    ``planted_tested`` (planted genes in the table), ``genes`` (per gene: symbol, direction,
    rank, expected-end percentile), ``mean_percentile``, ``auroc`` (probability that a planted
    gene sits nearer its expected end than a random gene does to the top) and the one-sided
    Mann-Whitney ``p`` of that comparison.
    """
    if perturb_type not in PERTURB_TYPES:
        msg = f"perturb_type={perturb_type!r}: use one of {list(PERTURB_TYPES)}."
        raise InputError(msg)
    planted = truth_ad
    if cell_types is not None:
        acts = (
            planted["cell_types"]
            .str.split(",")
            .map(lambda types: bool(set(types) & set(cell_types)))
        )
        planted = planted[acts.to_numpy(bool)]
    n = len(table)
    percentile = (np.arange(n) + 0.5) / n
    position = {gene: i for i, gene in enumerate(table["gene"])}
    rows = []
    for gene in planted.itertuples():
        if gene.ensembl_id not in position:
            continue
        i = position[gene.ensembl_id]
        towards_top = (gene.direction == "up") == (perturb_type == "delete")
        rows.append(
            {
                "symbol": gene.gene,
                "direction": gene.direction,
                "rank": i + 1,
                "percentile": float(percentile[i] if towards_top else percentile[n - 1 - i]),
            }
        )
    rows.sort(key=lambda r: r["rank"])
    out: dict[str, Any] = {"genes_tested": n, "planted_tested": len(rows), "genes": rows}
    if not rows:
        return {**out, "mean_percentile": None, "auroc": None, "p": None}
    planted_pct = np.array([r["percentile"] for r in rows])
    others = np.delete(percentile, [r["rank"] - 1 for r in rows])
    test = stats.mannwhitneyu(planted_pct, others, alternative="less")
    return {
        **out,
        "mean_percentile": float(planted_pct.mean()),
        "auroc": float(1.0 - test.statistic / (planted_pct.size * others.size)),
        "p": float(test.pvalue),
    }


# Columns checked when a truth table is read: (required, id columns read as text).
_TRUTH_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "donors": (("ad_status", "resilient", "severity", "ad_gene_effect"), ("subject",)),
}
DONOR_SCORE_COLUMNS = ("method", "patient_id", "set", "score", "called")
ATTENTION_COLUMNS = ("method", "cell_type", "enrichment")
_SET_ORDER = ("cv", "test")
_EFFECT_PREFIX = "effect_"


def read_truth(truth_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The truth tables as data frames, keyed by file stem.

    ``donors`` (``truth/donors.tsv``) is there only for data sets generated since it was added;
    its ``subject`` is read as text.
    """
    truth_dir = Path(truth_dir)
    tables = {}
    for path in sorted(truth_dir.glob("*.tsv")):
        required, ids = _TRUTH_TABLES.get(path.stem, ((), ()))
        tables[path.stem] = read_table(
            path, required=required, ids=ids, what=f"truth table {path.name}"
        )
    return tables


def _check_columns(frame: pd.DataFrame, required: Sequence[str], what: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        msg = f"{what} lacks column(s) {missing}; it has {list(frame.columns)}."
        raise InputError(msg)


def _auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC of ``score`` for ``positive``; ``None`` unless both classes are present."""
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """Spearman's rho and its p; ``None`` for fewer than 3 pairs or a constant side."""
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def _share(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if flags.size else None


def _donor_metrics(rows: pd.DataFrame) -> dict[str, Any]:
    """The scores of one method on one set of donors, against the planted truth."""
    scored = rows["score"].notna().to_numpy()
    rows = rows[scored]
    planted = rows["planted_ad_status"].eq("AD").to_numpy()
    resilient = rows["resilient"].astype(bool).to_numpy() & planted
    strong = planted & ~resilient
    score = rows["score"].to_numpy(float)
    called = rows["called"].astype(float).to_numpy() > 0
    n = len(rows)
    # Rank percentile in (0, 1), ties averaged: the mean over all donors is exactly 0.5.
    percentile = (stats.rankdata(score) - 0.5) / n if n else np.array([])
    rho, p = _spearman(score[planted], rows["ad_gene_effect"].to_numpy(float)[planted])
    out: dict[str, Any] = {
        "n_donors": n,
        "n_unscored": int((~scored).sum()),
        "n_ad": int(planted.sum()),
        "n_resilient": int(resilient.sum()),
        "auroc": _auroc(planted, score),
        "auroc_non_resilient": _auroc(strong[strong | ~planted], score[strong | ~planted]),
        "resilient_rank_percentile": float(percentile[resilient].mean())
        if resilient.any()
        else None,
        "spearman_ad_gene_effect": rho,
        "spearman_p": p,
        "resilient_called_fraction": _share(called[resilient]),
        "non_resilient_called_fraction": _share(called[strong]),
        "control_called_fraction": _share(called[~planted]),
    }
    if "label" in rows.columns:
        # The pipeline's label comes from the metadata, as the planted status does.
        labelled_ad = rows["label"].eq(1).to_numpy()
        out["label_mismatches"] = int((labelled_ad != planted).sum())
    return out


def donors_against_truth(donor_scores: pd.DataFrame, truth_donors: pd.DataFrame) -> dict[str, Any]:
    """How well each donor-level method recovers the planted AD status and AD effect.

    Parameters
    ----------
    donor_scores
        ``reports/donor/disease/donors.tsv``: one row per method, set and donor, with columns
        ``method``, ``patient_id``, ``set`` (``cv``: the out-of-fold score of a train/val donor;
        ``test``: a held-out donor), ``score`` (higher = more AD) and ``called`` (0/1 at the
        method's threshold); ``label`` (1 = AD), when present, is checked against the truth.
    truth_donors
        ``truth/donors.tsv`` (``subject``, ``ad_status``, ``resilient``, ``ad_gene_effect``).

    Returns
    -------
    Per method (in the order of ``donor_scores``) and per set (``cv``, ``test``, any other set
    named, and ``all``: every row of the method): ``n_donors`` (with a score; ``n_unscored``
    without), ``n_ad``, ``n_resilient``; ``auroc`` against the planted AD status;
    ``auroc_non_resilient`` (AD donors that are not resilient against controls);
    ``resilient_rank_percentile``, the mean percentile of the resilient AD donors' scores among
    all donors of the set (0.5 = no better than a random donor, 1 = the top); the Spearman
    correlation between score and planted ``ad_gene_effect`` among AD donors
    (``spearman_ad_gene_effect``, ``spearman_p``); the fractions of resilient, other AD and
    control donors called AD; and ``label_mismatches`` when ``label`` is given. A measure that
    needs a class the set does not hold (or, for Spearman, 3 AD donors) is ``None``.

    Raises
    ------
    InputError
        When a column is missing, a patient is unknown to the truth, or a method scores a patient
        twice in one set.
    """
    _check_columns(donor_scores, DONOR_SCORE_COLUMNS, "donor scores (reports/donor/disease)")
    _check_columns(
        truth_donors, ("subject", "ad_status", "resilient", "ad_gene_effect"), "truth/donors.tsv"
    )
    truth = truth_donors.assign(subject=truth_donors["subject"].astype(str)).set_index("subject")
    scores = donor_scores.assign(patient_id=donor_scores["patient_id"].astype(str))
    unknown = sorted(set(scores["patient_id"]) - set(truth.index))
    if unknown:
        msg = (
            f"donor scores name patient(s) {unknown[:10]} that truth/donors.tsv does not know; "
            "are the scores and the truth from the same demo data set?"
        )
        raise InputError(msg)
    twice = scores.duplicated(["method", "set", "patient_id"])
    if twice.any():
        first = scores[twice].iloc[0]
        msg = (
            f"donor scores: method {first['method']!r} scores patient {first['patient_id']!r} "
            f"more than once in set {first['set']!r}; expected one row per method, set and donor."
        )
        raise InputError(msg)
    planted = truth[["ad_status", "resilient", "ad_gene_effect"]].rename(
        columns={"ad_status": "planted_ad_status"}
    )
    joined = scores.join(planted, on="patient_id")
    out: dict[str, Any] = {}
    for method in pd.unique(joined["method"]):
        rows = joined[joined["method"] == method]
        present = [str(s) for s in pd.unique(rows["set"])]
        sets = [s for s in _SET_ORDER if s in present]
        sets += sorted(s for s in present if s not in _SET_ORDER)
        by_set = {s: _donor_metrics(rows[rows["set"].astype(str) == s]) for s in sets}
        by_set["all"] = _donor_metrics(rows)
        out[str(method)] = by_set
    return out


def attention_against_truth(
    attention: pd.DataFrame,
    truth_donors: pd.DataFrame,
    *,
    truth_ad: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Whether attention-based models attend most to the cell types AD hits hardest.

    Parameters
    ----------
    attention
        ``reports/donor/disease/attention.tsv``: per MIL ``method`` and ``cell_type``, the
        ``enrichment`` of attention (attention share / cell share).
    truth_donors
        ``truth/donors.tsv``: the planted AD effect per donor and major type (``effect_<type>``).
    truth_ad
        ``truth/ad_genes.tsv``, optional. The planted effect of a type is a multiplier of the AD
        genes acting there, and says nothing about a type no AD gene acts in; with the genes, each
        type's planted signal (its mean effect x the summed ``|log2 fold change|`` of its AD
        genes) is scored too.

    Returns
    -------
    ``planted_effect`` (mean ``effect_<type>`` over AD donors), ``planted_signal`` (with
    ``truth_ad``), and per method (``methods``): ``n_cell_types`` (those the truth knows),
    ``spearman_effect`` and ``p_effect`` between enrichment and planted effect (``None`` for
    fewer than 3 types or a constant side), ``spearman_signal`` and ``p_signal`` (with
    ``truth_ad``), ``ranked_cell_types`` (by enrichment, highest first), ``enrichment`` per type
    and ``unknown_cell_types`` (types the truth has no effect for).
    """
    _check_columns(attention, ATTENTION_COLUMNS, "attention table (reports/donor/disease)")
    _check_columns(truth_donors, ("ad_status",), "truth/donors.tsv")
    effect_columns = [c for c in truth_donors.columns if c.startswith(_EFFECT_PREFIX)]
    if not effect_columns:
        msg = "truth/donors.tsv has no effect_<cell type> columns; regenerate the demo data."
        raise InputError(msg)
    ad_rows = truth_donors[truth_donors["ad_status"].eq("AD")]
    effect = {c.removeprefix(_EFFECT_PREFIX): float(ad_rows[c].mean()) for c in effect_columns}
    out: dict[str, Any] = {"planted_effect": effect}
    signal = None
    if truth_ad is not None:
        load = dict.fromkeys(effect, 0.0)
        for row in truth_ad.itertuples():
            for cell_type in str(row.cell_types).split(","):
                if cell_type in load:
                    load[cell_type] += abs(float(row.log2_fold_change))
        signal = {t: effect[t] * load[t] for t in effect}
        out["planted_signal"] = signal

    per_method: dict[str, Any] = {}
    for method in pd.unique(attention["method"]):
        rows = attention[attention["method"] == method]
        if rows["cell_type"].duplicated().any():
            msg = (
                f"attention table: method {method!r} lists cell type(s) "
                f"{sorted(set(rows.loc[rows['cell_type'].duplicated(), 'cell_type']))} twice."
            )
            raise InputError(msg)
        rows = rows[rows["enrichment"].notna()]
        ranked = rows.sort_values("enrichment", ascending=False, kind="stable")
        known = rows[rows["cell_type"].isin(list(effect))]
        enrichment = known["enrichment"].to_numpy(float)
        rho, p = _spearman(enrichment, known["cell_type"].map(effect).to_numpy(float))
        scores: dict[str, Any] = {
            "n_cell_types": len(known),
            "spearman_effect": rho,
            "p_effect": p,
        }
        if signal is not None:
            rho, p = _spearman(enrichment, known["cell_type"].map(signal).to_numpy(float))
            scores.update(spearman_signal=rho, p_signal=p)
        scores.update(
            ranked_cell_types=[str(t) for t in ranked["cell_type"]],
            enrichment={
                str(t): float(e)
                for t, e in zip(ranked["cell_type"], ranked["enrichment"], strict=True)
            },
            unknown_cell_types=sorted(str(t) for t in set(rows["cell_type"]) - set(effect)),
        )
        per_method[str(method)] = scores
    out["methods"] = per_method
    return out
