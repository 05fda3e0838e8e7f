"""QC settings: the thresholds and Scrublet options of ``params.yaml: qc``, checked once.

:class:`QCSettings` is what :func:`rosmap_geneformer.data.qc.run_qc` and each library's run read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rosmap_geneformer.errors import InputError
from rosmap_geneformer.params_schema import QC


@dataclass(frozen=True, kw_only=True)
class QCSettings:
    """Thresholds and Scrublet options (``params.yaml: qc`` and ``seed``).

    Parameters
    ----------
    min_genes
        Minimum number of genes with a count > 0.
    min_counts
        Minimum total counts over the genes in the matrix.
    max_pct_mito
        Maximum percentage of counts on mitochondrial genes.
    scrublet
        Run Scrublet (``False`` keeps every cell that passes the filters).
    expected_doublet_rate
        Scrublet's expected doublet rate.
    n_prin_comps
        Principal components Scrublet embeds the cells in.
    min_cells_per_library
        Libraries with fewer cells (after the filters) skip Scrublet.
    seed
        Scrublet's ``random_state``, the same for every library.
    threshold
        A fixed doublet-score threshold; ``None`` chooses one per library
        (see :func:`rosmap_geneformer.data.doublets.choose_doublet_threshold`).
    max_doublet_fraction
        Cap on the fraction of a library called doublets by an automatic threshold;
        ``None`` means ``2 * expected_doublet_rate``.
    max_cells_per_run
        A library with more cells (after the filters) is scored in seeded random parts of at most
        this many cells, one Scrublet run each: Scrublet's memory grows with the cells of a run
        (about 0.5 MB a cell with ROSMAP's 33,538 genes, dense PCA input), so this bounds qc's
        peak. ``None``: one run per library, whatever its size.
    symbol_column
        ``var`` column holding gene symbols.
    mito_prefix
        Prefix of mitochondrial gene symbols.
    """

    min_genes: int = 200
    min_counts: int = 400
    max_pct_mito: float = 10.0
    scrublet: bool = True
    expected_doublet_rate: float = 0.045
    n_prin_comps: int = 20
    min_cells_per_library: int = 100
    seed: int = 0
    threshold: float | None = None
    max_doublet_fraction: float | None = None
    max_cells_per_run: int | None = None
    symbol_column: str = "gene_symbol"
    mito_prefix: str = "MT-"

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_pct_mito <= 100.0:
            msg = f"params.yaml: qc.max_pct_mito must be a percentage in [0, 100], got {self.max_pct_mito}."
            raise InputError(msg)
        if not 0.0 < self.expected_doublet_rate < 1.0:
            msg = (
                "params.yaml: qc.scrublet.expected_doublet_rate must be in (0, 1), got "
                f"{self.expected_doublet_rate}."
            )
            raise InputError(msg)
        if self.n_prin_comps < 2:
            msg = f"params.yaml: qc.scrublet.n_prin_comps must be >= 2, got {self.n_prin_comps}."
            raise InputError(msg)
        floor = max(self.min_cells_per_library, self.n_prin_comps + 1)
        if self.max_cells_per_run is not None and self.max_cells_per_run < 2 * floor:
            msg = (
                f"params.yaml: qc.scrublet.max_cells_per_run={self.max_cells_per_run} must be at "
                f"least twice qc.scrublet.min_cells_per_library ({2 * floor}), or null."
            )
            raise InputError(msg)

    @classmethod
    def from_params(cls, section: QC, *, seed: int) -> QCSettings:
        """The settings of ``params.yaml: qc`` (its ``scrublet`` keys flattened) and ``seed``."""
        scrublet = section.scrublet
        return cls(
            min_genes=section.min_genes,
            min_counts=section.min_counts,
            max_pct_mito=float(section.max_pct_mito),
            scrublet=scrublet.enabled,
            expected_doublet_rate=float(scrublet.expected_doublet_rate),
            n_prin_comps=scrublet.n_prin_comps,
            min_cells_per_library=scrublet.min_cells_per_library,
            seed=seed,
            threshold=scrublet.threshold,
            max_doublet_fraction=scrublet.max_doublet_fraction,
            max_cells_per_run=scrublet.max_cells_per_run,
        )

    @property
    def doublet_fraction_cap(self) -> float:
        """The effective ``max_doublet_fraction``."""
        if self.max_doublet_fraction is None:
            return min(1.0, 2.0 * self.expected_doublet_rate)
        return float(self.max_doublet_fraction)

    def thresholds(self) -> dict[str, Any]:
        """The settings as a JSON-ready mapping, for the report."""
        return {
            "min_genes": self.min_genes,
            "min_counts": self.min_counts,
            "max_pct_mito": self.max_pct_mito,
            "scrublet": self.scrublet,
            "expected_doublet_rate": self.expected_doublet_rate,
            "n_prin_comps": self.n_prin_comps,
            "min_cells_per_library": self.min_cells_per_library,
            "doublet_threshold": "auto" if self.threshold is None else self.threshold,
            "max_doublet_fraction": self.doublet_fraction_cap,
            "max_cells_per_run": self.max_cells_per_run,
            "seed": self.seed,
        }
