"""The typed schema of ``params.yaml``: one pydantic model per section.

Stage scripts receive a :class:`Params` from :func:`rosmap_geneformer.params.stage_arguments` and
read typed attributes (``params.qc.scrublet.n_prin_comps``) instead of looking keys up one by one.
Every section refuses keys it does not know (a typo names itself), and every value is checked
against its type when the file is read. Sections are optional at this level, because a stage reads
only its own: :meth:`Params.section` gives a clear error when a stage needs one that is missing.

:func:`json_schema` exports the schema as JSON Schema (``params.schema.json`` beside
``params.yaml``, which names it in its first line so that editors complete and check the file).

Defaults here are the library's defaults (the values a key takes when it is absent); the shipped
``params.yaml`` spells every key out.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rosmap_geneformer.errors import MissingKeyError


def _members(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (``int | float | None`` -> {int, float, NoneType})."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_members(arg) for arg in typing.get_args(annotation)))
    if origin is Literal:
        return {type(arg) for arg in typing.get_args(annotation)}
    return {origin or annotation}


def _scalar(value: Any, annotation: Any) -> Any:
    """Refuse a boolean where a number is meant; read a number YAML left as text.

    PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string: such a value is taken as the
    number it spells when the key holds a number and not text. ``true`` for a count is refused
    rather than read as 1.
    """
    if isinstance(value, list | dict):
        element = _element(annotation, list if isinstance(value, list) else dict)
        if element is None:
            return value
        if isinstance(value, list):
            return [_scalar(item, element) for item in value]
        return {key: _scalar(item, element) for key, item in value.items()}
    allowed = _members(annotation)
    numeric = allowed & {int, float}
    if isinstance(value, bool) and bool not in allowed and (numeric or str in allowed):
        msg = f"expected {_kind(allowed)}, got the boolean {str(value).lower()}"
        raise ValueError(msg)
    if isinstance(value, str) and numeric and str not in allowed:
        text = value.strip()
        try:
            number = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
        except ValueError:
            msg = f"expected {_kind(allowed)}, got the text {value!r}"
            raise ValueError(msg) from None
        if text.endswith("%"):
            msg = f"write a fraction ({number:g}) rather than a percentage ({value!r})"
            raise ValueError(msg)
        if float not in allowed:
            if not number.is_integer():
                msg = f"expected a whole number, got {value!r}"
                raise ValueError(msg)
            return int(number)
        return number
    return value


def _element(annotation: Any, container: type) -> Any:
    """The element type of the ``list[X]`` / ``dict[str, X]`` member of ``annotation``, if any."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            element = _element(arg, container)
            if element is not None:
                return element
        return None
    if origin is container:
        return typing.get_args(annotation)[-1]
    return None


def _kind(allowed: set[Any]) -> str:
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
    if float in allowed:
        allowed = allowed - {int}
    kinds = [names[t] for t in (float, int, str, bool) if t in allowed]
    return " or ".join(kinds) or "another kind of value"


class Section(BaseModel):
    """A section of ``params.yaml``: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _scalars(cls, value: Any, info: ValidationInfo) -> Any:
        return _scalar(value, cls.model_fields[info.field_name].annotation)

    def values(self) -> dict[str, Any]:
        """The keys the file sets, as a plain mapping (what the library's ``from_params``
        constructors read; they apply their own defaults to the keys left out)."""
        return self.model_dump(exclude_unset=True)


class Paths(Section):
    """Where each stage reads and writes; ``dvc.yaml`` refers to these with ``${paths.*}``."""

    raw: str = "data/raw"
    gene_map: str = "data/reference/gene_map.tsv"
    ensembl: str = "data/interim/ensembl.h5ad"
    split: str = "data/interim/split"
    qc: str = "data/interim/qc"
    annotated: str = "data/interim/annotated"
    sampled: str = "data/processed/sampled"
    dictionaries: str = "models/dictionaries"
    tokenized: str = "data/processed/tokenized"
    base_model: str = "models/base"
    finetuned: str = "models/finetuned"
    checkpoints: str = "models/checkpoints"
    dvclive: str = "dvclive"
    predictions: str = "data/predictions"
    embeddings: str = "data/processed/embeddings"
    grn: str = "data/processed/grn"
    reports: str = "reports"


class Columns(Section):
    """Column names in the raw files (ROSMAP's by default)."""

    batch: str = "batch"
    library: str = "dataset"
    subject: str = "subject"
    cell: str = "cell"
    cell_type: str = "cell_type"
    cell_type_fine: str | None = "cell_type_high_resolution"
    sex: str = "msex"
    age: str = "age_death"
    pathologic_ad: str = "Pathologic_diagnosis_of_AD"
    cogdx: str = "cogdx"


class Data(Section):
    source: str = "demo"
    columns: Columns = Field(default_factory=Columns)


class Compute(Section):
    """How stages use the machine: never changes results, only memory and speed."""

    chunk_size: int = Field(10_000, gt=0)
    workers: int | Literal["auto"] = 1
    scheduler: str | None = None
    launcher: str = Field("python", min_length=1)
    threads: int | Literal["auto"] = "auto"

    @field_validator("threads")
    @classmethod
    def _positive_threads(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            msg = "use a positive integer or 'auto'"
            raise ValueError(msg)
        return value


class Raw(Section):
    counts: str = "counts.h5ad"
    individual_metadata: str = "individual_metadata.tsv"
    batch_mapping: str = "batch_mapping.tsv"
    cell_annotation: str = "cell_annotation.tsv"


class Demo(Section):
    n_donors: int = Field(40, gt=0)
    cells_per_donor: int = Field(150, gt=0)
    libraries_per_donor: list[int] = Field(default_factory=lambda: [1, 2])
    n_genes: int = Field(2500, gt=0)
    fraction_ad: int | float = Field(0.5, ge=0, le=1)
    low_quality_fraction: int | float = Field(0.05, ge=0, le=1)
    doublet_rate: int | float = Field(0.045, ge=0, le=1)
    n_ad_genes: int = Field(12, ge=0)
    n_tf_programs: int = Field(6, ge=0)
    targets_per_tf: int = Field(12, ge=0)
    n_previous_symbols: int = Field(10, ge=0)
    n_alias_symbols: int = Field(10, ge=0)
    n_duplicate_genes: int = Field(3, ge=0)
    n_unmappable: int = Field(5, ge=0)
    resilient_fraction: int | float = Field(0.0, ge=0, le=1)
    cell_type_effect_sd: int | float = Field(0.0, ge=0)


class GeneMap(Section):
    source: Literal["bundled", "biomart"] = "bundled"
    release: int = 93
    biomart_host: str = "http://jul2018.archive.ensembl.org"


class Scrublet(Section):
    enabled: bool = True
    expected_doublet_rate: int | float = Field(0.045, gt=0, lt=1)
    n_prin_comps: int = Field(20, gt=0)
    min_cells_per_library: int = Field(60, ge=0)
    threshold: int | float | None = None
    max_doublet_fraction: int | float | None = None
    max_cells_per_run: int | None = Field(5000, gt=0)


class QC(Section):
    min_genes: int = Field(200, ge=0)
    min_counts: int = Field(400, ge=0)
    max_pct_mito: int | float = Field(10.0, ge=0, le=100)
    scrublet: Scrublet = Field(default_factory=Scrublet)


class Split(Section):
    fractions: dict[str, int | float] = Field(
        default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2}
    )
    balance: list[str] = Field(default_factory=lambda: ["msex", "age_death"])
    max_trials: int = Field(200, gt=0)
    min_donors_per_class: int = Field(5, ge=0)


class Labels(Section):
    ad_definition: Literal["pathologic", "clinical"] = "pathologic"


class Sample(Section):
    splits: list[str] = Field(default_factory=lambda: ["train", "val"])
    max_cells_per_patient_cell_type: int | None = 40
    max_cells_per_class: int | None = 5000


class Dictionaries(Section):
    source: Literal["from_data", "geneformer"] = "from_data"
    token_dictionary: str | None = None
    gene_median_dictionary: str | None = None
    chunk_size: int = Field(4096, gt=0)


class Tokenize(Section):
    model_input_size: int = Field(2048, gt=0)
    special_tokens: bool = False
    columns: list[str] = Field(default_factory=lambda: ["cell_id", "patient_id"])
    chunk_size: int = Field(512, gt=0)
    nproc: int | Literal["auto"] = "auto"


class Architecture(Section):
    num_hidden_layers: int = Field(6, gt=0)
    hidden_size: int = Field(256, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(512, gt=0)
    dropout: int | float = Field(0.02, ge=0, lt=1)
    attention_dropout: int | float = Field(0.02, ge=0, lt=1)


class Pretrain(Section):
    epochs: int | float = Field(3, gt=0)
    learning_rate: int | float = Field(1e-3, gt=0)
    batch_size: int = Field(12, gt=0)
    warmup_ratio: int | float = Field(0.0, ge=0, le=1)
    weight_decay: int | float = Field(0.001, ge=0)
    mlm_probability: int | float = Field(0.15, gt=0, lt=1)
    max_cells: int | None = None
    eval_fraction: int | float = Field(0.05, ge=0, lt=1)
    eval_batch_size: int = Field(32, gt=0)
    logging_steps: int = Field(10, gt=0)


class BaseModelSection(Section):
    source: Literal["pretrain", "checkpoint"] = "pretrain"
    checkpoint: str | None = None
    architecture: Architecture = Field(default_factory=Architecture)
    pretrain: Pretrain = Field(default_factory=Pretrain)


class Task(Section):
    """A classification task (``tasks.<name>``); each gets ``train@`` and ``evaluate@`` stages."""

    label: str
    cell_types: list[str] | None = None
    min_cells_per_class: int = Field(1, ge=1)
    patient_level: bool = False
    positive_class: str | None = None
    early_stopping_metric: str | None = None


class Train(Section):
    learning_rate: int | float = Field(5e-5, gt=0)
    epochs: int | float = Field(10, gt=0)
    batch_size: int = Field(12, gt=0)
    eval_batch_size: int = Field(32, gt=0)
    warmup_ratio: int | float = Field(0.0, ge=0, le=1)
    weight_decay: int | float = Field(0.001, ge=0)
    lr_scheduler_type: str = "linear"
    freeze_layers: int = Field(0, ge=0)
    class_weights: bool = True
    early_stopping_patience: int = Field(2, ge=0)
    gradient_accumulation_steps: int = Field(1, gt=0)


class Evaluate(Section):
    n_boot: int = Field(1000, ge=0)


class Baseline(Section):
    n_top_genes: int = Field(2000, gt=0)
    target_sum: int | float = Field(1.0e4, gt=0)
    n_components: int | None = 50
    C: list[int | float] = Field(default_factory=lambda: [0.01, 0.1, 1.0])
    l1_ratio: int | float = Field(0.0, ge=0, le=1)
    max_iter: int = Field(1000, gt=0)
    class_weight: Literal["balanced"] | None = "balanced"


class HvgPca(Section):
    n_top_genes: int = Field(2000, gt=0)
    n_components: int = Field(50, gt=0)


class Embed(Section):
    emb_layer: int = -1
    batch_size: int = Field(32, gt=0)
    max_cells: int | None = None
    n_neighbors: int = Field(15, gt=0)
    metric: str = "cosine"
    silhouette_max_cells: int | None = None
    hvg_pca: HvgPca | None = None


class DonorCV(Section):
    n_splits: int = Field(5, ge=2)
    n_repeats: int = Field(5, ge=1)


class DonorPseudobulk(Section):
    n_top_genes: int = Field(2000, gt=0)
    min_cells: int = Field(3, ge=1)
    min_cpm: int | float = Field(1.0, ge=0)
    l1_ratio: int | float = Field(1.0, ge=0, le=1)


class DonorMIL(Section):
    att_dim: int = Field(64, gt=0)
    epochs: int = Field(40, gt=0)
    learning_rate: int | float = Field(1e-3, gt=0)
    weight_decay: int | float = Field(1e-4, ge=0)
    batch_size: int = Field(8, gt=0)


class Donor(Section):
    cv: DonorCV = Field(default_factory=DonorCV)
    n_boot: int = Field(1000, ge=0)
    max_cells_per_donor: int | None = Field(500, gt=0)
    emb_layer: int = -1
    batch_size: int = Field(32, gt=0)
    C: list[int | float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1)
    max_iter: int = Field(5000, gt=0)
    pseudobulk: DonorPseudobulk = Field(default_factory=DonorPseudobulk)
    mil: DonorMIL = Field(default_factory=DonorMIL)


class Tune(Section):
    """The hyperparameter search; ``tuning.space.TuneSettings`` checks the search space itself."""

    task: str | None = None
    n_trials: int = Field(5, gt=0)
    storage: str | None = None
    study_name: str | None = None
    enqueue: list[dict[str, Any]] | None = None
    sampler: dict[str, Any] | None = None
    pruner: dict[str, Any] | None = None
    space: dict[str, Any] = Field(default_factory=dict)


class PerturbScreen(Section):
    """How deletions are found: ``exact`` (every one a forward pass) or ``estimate`` first."""

    method: Literal["exact", "estimate"] = "exact"
    grid: int = Field(16, ge=2)
    confirm: float = Field(0.05, gt=0, le=0.5)
    confirm_fdr: float = Field(0.25, ge=0, le=1)


class Perturb(Section):
    task: str = "disease"
    emb_layer: int = 0
    split: str = "train"
    state_key: str = "ad_status"
    start_state: str = "AD"
    goal_state: str = "control"
    alt_states: list[str] = Field(default_factory=list)
    rank_by: Literal["net", "goal"] = "net"
    cell_type: str | None = "Mic"
    types: list[Literal["delete", "overexpress"]] = Field(
        default_factory=lambda: ["delete", "overexpress"]
    )
    max_cells: int | None = 50
    min_cells: int = Field(10, ge=1)
    max_state_cells: int | None = 1000
    null_size: int = Field(100_000, gt=0)
    fdr: int | float = Field(0.05, gt=0, lt=1)
    max_tokens: int = Field(16_384, gt=0)
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(32, gt=0)
    top_n: int = Field(25, gt=0)
    screen: PerturbScreen = Field(default_factory=PerturbScreen)


class GRN(Section):
    model: str = "models/base"
    emb_layer: int = -1
    split: str = "train"
    cell_types: list[str] | None = None
    regulators: list[str] = Field(default_factory=list)
    regulators_file: str | None = None
    max_cells: int | None = 100
    min_cells: int = Field(10, ge=1)
    control: Literal["neighbor", "none"] = "neighbor"
    max_tokens: int = Field(16_384, gt=0)
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    truth: str | None = None
    decoys: str | None = None
    tf_list: str | None = None
    compare: list[Literal["attention", "coexpression", "grnboost2", "genie3", "random"]] = Field(
        default_factory=lambda: ["attention", "coexpression", "grnboost2", "genie3", "random"]
    )
    attention_layer: int = -1
    genie3_trees: int = Field(100, gt=0)
    workers: int = Field(1, ge=1)
    bootstrap: int = Field(1000, ge=0)
    k: list[int] = Field(default_factory=lambda: [10, 50, 100])
    graph_top_edges: int = Field(50, gt=0)
    plot_top_edges: int = Field(8, gt=0)


class LossLimit(Section):
    """Fractions lost above which a stage logs a WARNING (``warn``) and stops (``stop``)."""

    warn: float = Field(ge=0, le=1)
    stop: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> LossLimit:
        if self.warn > self.stop:
            msg = f"warn ({self.warn}) must not exceed stop ({self.stop})"
            raise ValueError(msg)
        return self


def _limit(warn: float, stop: float) -> Any:
    return Field(default_factory=lambda: LossLimit(warn=warn, stop=stop))


class Losses(Section):
    """What each stage may drop before it warns and before it stops (fractions, see losses.py)."""

    unmapped_genes: LossLimit = _limit(0.02, 0.10)
    unmapped_counts: LossLimit = _limit(0.01, 0.05)
    unannotated_cells: LossLimit = _limit(0.05, 0.50)
    unlabelled_cells: LossLimit = _limit(0.50, 0.90)
    qc_removed_cells: LossLimit = _limit(0.50, 0.95)
    genes_outside_vocabulary: LossLimit = _limit(0.40, 0.80)
    empty_cells: LossLimit = _limit(0.001, 0.05)
    rare_class_cells: LossLimit = _limit(0.01, 0.20)


class Params(BaseModel):
    """All of ``params.yaml``. A section is ``None`` when the file leaves it out."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    seed: int = 0

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> Any:
        return _scalar(value, int)

    paths: Paths = Field(default_factory=Paths)
    data: Data = Field(default_factory=Data)
    compute: Compute = Field(default_factory=Compute)
    raw: Raw = Field(default_factory=Raw)
    losses: Losses = Field(default_factory=Losses)
    demo: Demo | None = None
    gene_map: GeneMap | None = None
    qc: QC | None = None
    split: Split | None = None
    labels: Labels | None = None
    sample: Sample | None = None
    dictionaries: Dictionaries | None = None
    tokenize: Tokenize | None = None
    base_model: BaseModelSection | None = None
    tasks: dict[str, Task] | None = None
    train: Train | None = None
    evaluate: Evaluate | None = None
    baseline: Baseline | None = None
    donor: Donor | None = None
    embed: Embed | None = None
    tune: Tune | None = None
    perturb: Perturb | None = None
    grn: GRN | None = None

    def section(self, name: str) -> Any:
        """The section ``name``, or an error that says the stage needs it.

        Raises
        ------
        KeyError
            When ``params.yaml`` has no such section.
        """
        value = getattr(self, name, None)
        if value is None:
            msg = f"params.yaml: missing section {name!r}; this stage reads it (see params.yaml in the repository for its keys)."
            raise MissingKeyError(msg)
        return value


SCHEMA_FILE = "params.schema.json"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``params.yaml`` (what ``rosmap-geneformer schema`` writes)."""
    schema = _standard(Params.model_json_schema())
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rosmap-geneformer params.yaml"
    return schema


_BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def _standard(node: Any) -> Any:
    """``int | float`` as JSON's ``number``, and pydantic's bounds on unions as JSON Schema's."""
    if isinstance(node, list):
        return [_standard(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {_BOUNDS.get(key, key): _standard(value) for key, value in node.items()}
    members = node.get("anyOf")
    if (
        isinstance(members, list)
        and {"type": "integer"} in members
        and {"type": "number"} in members
    ):
        rest = [m for m in members if m not in ({"type": "integer"}, {"type": "number"})]
        node.pop("anyOf")
        if rest:
            node["anyOf"] = [{"type": "number"}, *rest]
        else:
            node["type"] = "number"
    return node
