"""Cell and gene embeddings from a Geneformer-style BERT (``geneformer-spec.md`` section 6).

Conventions follow Geneformer's ``EmbExtractor``:

- the layer is chosen with ``emb_layer``: ``hidden_states`` has ``n_layers + 1`` entries (entry 0
  is the embedding output), and the layer read is ``n_layers + emb_layer``; ``emb_layer=0`` is the
  last layer, ``-1`` (the default) the second to last;
- batches are padded on the right with ``<pad>`` and carry an attention mask;
- a cell embedding (:func:`pool_cells`) is, by default (``emb_mode="auto"``), the ``<cls>``
  vector when the cells carry ``<cls>`` (V2; Geneformer's default ``emb_mode="cls"``), else the
  mean over the cell's gene positions (V1, ``emb_mode="cell"``), padding excluded, and
  ``<cls>``/``<eos>`` excluded when present;
- a gene embedding is the hidden state at the gene's position.

Layers past the one that is read do not change it, so they are not run (a 6-layer model read at
``emb_layer=-1`` runs 5 layers); the numbers are those of the full model's ``hidden_states``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import BertConfig, BertModel
from transformers.utils import logging as transformers_logging

from rosmap_geneformer import distributed
from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.geneformer.dictionaries import CLS, EOS, PAD
from rosmap_geneformer.geneformer.model import select_device

logger = logging.getLogger(__name__)

# Token ids of <cls>/<eos> in Geneformer's V2 layout (dictionaries.V2_SPECIAL_TOKENS).
_V2_CLS_ID, _V2_EOS_ID = 2, 3
_MODEL_CLASSES = ("BertForMaskedLM", "BertForSequenceClassification", "BertModel")


def load_encoder(
    model_dir: str | Path, *, device: str | torch.device | None = None
) -> tuple[BertModel, BertConfig]:
    """Load the BERT encoder of a saved Geneformer model.

    Parameters
    ----------
    model_dir
        A folder written by ``save_pretrained`` holding a ``BertForMaskedLM`` (base model),
        ``BertForSequenceClassification`` (fine-tuned model) or ``BertModel``.
    device
        Where to put the model; ``None``: the GPU when there is one
        (:func:`rosmap_geneformer.geneformer.model.select_device`), else the CPU.

    Returns
    -------
    The ``BertModel`` (no pooler; heads are dropped) in eval mode with SDPA attention and
    ``output_hidden_states`` set, and its config.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        msg = (
            f"{config_path}: not found; {model_dir} is not a saved model folder (expected the "
            "output of base_model or train, with config.json and model.safetensors)."
        )
        raise MissingInputError(msg)
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    if architectures and not set(architectures) & set(_MODEL_CLASSES):
        msg = (
            f"{config_path}: architectures {architectures} is not one of {list(_MODEL_CLASSES)}; "
            "point the model path at a Geneformer BERT folder."
        )
        raise InputError(msg)
    # The heads (language-model, classifier, pooler) are dropped on purpose: keep transformers'
    # load report about their unused weights out of the log.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        encoder = BertModel.from_pretrained(
            str(model_dir),
            attn_implementation="sdpa",
            add_pooling_layer=False,
            output_hidden_states=True,
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    if device is None:
        device = select_device().device
    encoder.to(torch.device(device))
    encoder.eval()
    logger.info(
        "loaded the encoder of %s (%s; %d layers, hidden %d) on %s",
        model_dir,
        ",".join(architectures) or "BertModel",
        encoder.config.num_hidden_layers,
        encoder.config.hidden_size,
        device,
    )
    return encoder, encoder.config


def hidden_layer_index(n_layers: int, emb_layer: int) -> int:
    """Index into ``hidden_states`` for Geneformer's ``emb_layer`` (``n_layers + emb_layer``).

    Parameters
    ----------
    n_layers
        Number of transformer layers; ``hidden_states`` has ``n_layers + 1`` entries.
    emb_layer
        0 for the last layer, -1 for the second to last (Geneformer's default), down to
        ``-n_layers`` for the embedding output.
    """
    if n_layers < 1:
        msg = f"n_layers must be at least 1, got {n_layers}."
        raise InputError(msg)
    if not -n_layers <= emb_layer <= 0:
        msg = (
            f"emb_layer={emb_layer} is out of range for a {n_layers}-layer model; use 0 (last "
            f"layer), -1 (second to last, Geneformer's default) ... {-n_layers} (embeddings)."
        )
        raise InputError(msg)
    return n_layers + emb_layer


def truncate_encoder(encoder: BertModel, layer_index: int) -> BertModel:
    """A view of ``encoder`` that runs only the first ``layer_index`` layers.

    Its ``last_hidden_state`` equals ``encoder(...).hidden_states[layer_index]``. The weights are
    shared, not copied; ``encoder`` itself is left unchanged.

    Parameters
    ----------
    encoder
        A ``BertModel``.
    layer_index
        From :func:`hidden_layer_index`; 0 runs no layer (the embedding output).
    """
    layers = encoder.encoder.layer
    if not 0 <= layer_index <= len(layers):
        msg = f"layer_index={layer_index} is out of range for {len(layers)} layers."
        raise InputError(msg)
    if layer_index == len(layers):
        return encoder
    body = copy.copy(encoder.encoder)
    body._modules = dict(body._modules)
    body.layer = torch.nn.ModuleList(list(layers)[:layer_index])
    view = copy.copy(encoder)
    view._modules = dict(view._modules)
    view.encoder = body
    return view


def pad_batch(
    input_ids_list: Sequence[Sequence[int]], *, pad_token_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists into an ``int64`` matrix and its attention mask.

    Parameters
    ----------
    input_ids_list
        One token list per cell.
    pad_token_id
        The ``<pad>`` id.

    Returns
    -------
    ``input_ids`` (cells x longest) and ``attention_mask`` (1 for tokens, 0 for padding).
    """
    lengths = np.fromiter((len(ids) for ids in input_ids_list), dtype=np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    input_ids = np.full((len(lengths), width), pad_token_id, dtype=np.int64)
    mask = np.arange(width)[None, :] < lengths[:, None]
    for row, ids in enumerate(input_ids_list):
        input_ids[row, : lengths[row]] = np.asarray(ids, dtype=np.int64)
    return input_ids, mask.astype(np.int64)


PRECISIONS = ("auto", "float32", "bfloat16")


def _autocast(device: torch.device, precision: str = "auto") -> Any:
    """Mixed precision for a forward pass.

    ``auto``: bfloat16 on GPUs that support it, float32 on the CPU (the exact reference).
    ``bfloat16``: bfloat16 matrix products (float32 accumulation, layer norms and softmax in
    float32) on any device; on CPUs with AMX this is about twice float32's rate, and cosine
    shifts agree with float32 to about 1% (``benchmarks/perturbation.py`` measures both).
    ``float32``: no autocast.
    """
    if precision not in PRECISIONS:
        msg = f"precision={precision!r}: use one of {list(PRECISIONS)}."
        raise InputError(msg)
    if precision == "auto":
        enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        enabled = precision == "bfloat16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def hidden_states(
    encoder: BertModel,
    input_ids: torch.Tensor,
    *,
    layer_index: int,
    attention_mask: torch.Tensor | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Hidden states of one layer for a batch (float32, cells x positions x hidden).

    Parameters
    ----------
    encoder
        A ``BertModel`` in eval mode (from :func:`load_encoder`).
    input_ids
        ``int64`` tokens on the encoder's device.
    layer_index
        Entry of ``hidden_states`` to return (:func:`hidden_layer_index`).
    attention_mask
        1 for tokens, 0 for padding; ``None`` when no row is padded, which lets SDPA skip masking.
    precision
        ``auto``, ``float32`` or ``bfloat16`` (see :func:`_autocast`).
    """
    view = truncate_encoder(encoder, layer_index)
    with torch.inference_mode(), _autocast(input_ids.device, precision):
        output = view(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=False,
            return_dict=True,
        )
    return output.last_hidden_state.float()


def mean_pool(
    states: torch.Tensor,
    lengths: torch.Tensor,
    *,
    exclude_first: bool = False,
    exclude_last: bool = False,
) -> torch.Tensor:
    """Mean of each row's hidden states over its gene positions.

    Parameters
    ----------
    states
        Cells x positions x hidden.
    lengths
        Tokens per row (padding follows).
    exclude_first, exclude_last
        Leave out position 0 (``<cls>``) and position ``length - 1`` (``<eos>``).
    """
    positions = torch.arange(states.shape[1], device=states.device)[None, :]
    start = 1 if exclude_first else 0
    stop = lengths[:, None] - (1 if exclude_last else 0)
    weights = ((positions >= start) & (positions < stop)).to(states.dtype)
    counts = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    return (states * weights[:, :, None]).sum(dim=1) / counts


EMB_MODES = ("auto", "cls", "cell")


def pool_cells(
    states: torch.Tensor,
    lengths: torch.Tensor,
    *,
    special_tokens: bool,
    emb_mode: str = "auto",
) -> torch.Tensor:
    """Cell embeddings from hidden states, as Geneformer reads them.

    Parameters
    ----------
    states
        Cells x positions x hidden.
    lengths
        Tokens per row (padding follows).
    special_tokens
        The cells start with ``<cls>`` and end with ``<eos>`` (V2).
    emb_mode
        ``"cls"``: the ``<cls>`` vector (position 0; V2 only); ``"cell"``: the mean over the gene
        positions (:func:`mean_pool`, specials excluded); ``"auto"``: ``"cls"`` when the cells
        carry ``<cls>``, else ``"cell"`` (Geneformer's ``EmbExtractor`` and ``InSilicoPerturber``
        default to ``"cls"`` for V2 and switch V1 to ``"cell"``).
    """
    if emb_mode not in EMB_MODES:
        msg = f"emb_mode={emb_mode!r}: use one of {list(EMB_MODES)}."
        raise InputError(msg)
    if emb_mode == "cls" and not special_tokens:
        msg = (
            "emb_mode='cls' needs cells that start with <cls> (a V2 dataset); these cells have "
            "none: use emb_mode='cell' or 'auto'."
        )
        raise InputError(msg)
    if emb_mode == "cls" or (emb_mode == "auto" and special_tokens):
        return states[:, 0, :]
    return mean_pool(states, lengths, exclude_first=special_tokens, exclude_last=special_tokens)


def embed_batch(
    encoder: BertModel,
    input_ids_list: Sequence[Sequence[int]],
    *,
    layer_index: int,
    pad_token_id: int = 0,
    special_tokens: bool = False,
    emb_mode: str = "auto",
    gene_embeddings: bool = True,
    precision: str = "auto",
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Cell embeddings and, optionally, per-position gene embeddings of a batch of cells.

    Parameters
    ----------
    encoder
        A ``BertModel`` in eval mode (from :func:`load_encoder`).
    input_ids_list
        One token list per cell, any lengths (padded here on the right).
    layer_index
        Entry of ``hidden_states`` to read (:func:`hidden_layer_index`).
    pad_token_id
        The ``<pad>`` id.
    special_tokens
        The cells carry ``<cls>``/``<eos>`` (V2).
    emb_mode
        ``auto``, ``cls`` or ``cell`` (:func:`pool_cells`).
    gene_embeddings
        Also return the per-position embeddings.
    precision
        ``auto``, ``float32`` or ``bfloat16`` (see :func:`hidden_states`).

    Returns
    -------
    Cell embeddings (cells x hidden, float32) and, if asked, one ``length x hidden`` float32 array
    per cell (all positions, specials included, padding cut off), else ``None``.
    """
    device = next(encoder.parameters()).device
    ids, mask = pad_batch(input_ids_list, pad_token_id=pad_token_id)
    lengths = torch.from_numpy(mask.sum(axis=1)).to(device)
    ids_t = torch.from_numpy(ids).to(device)
    mask_t = None if mask.all() else torch.from_numpy(mask).to(device)
    states = hidden_states(
        encoder, ids_t, layer_index=layer_index, attention_mask=mask_t, precision=precision
    )
    cells = pool_cells(states, lengths, special_tokens=special_tokens, emb_mode=emb_mode)
    genes = None
    if gene_embeddings:
        host = states.cpu().numpy()
        genes = [host[row, : int(n)] for row, n in enumerate(lengths.tolist())]
    return cells.cpu().numpy(), genes


def detect_special_tokens(
    dataset: datasets.Dataset,
    *,
    token_dictionary: Mapping[str, int] | None = None,
) -> bool:
    """Whether a tokenized dataset's cells start with ``<cls>`` and end with ``<eos>`` (V2).

    Parameters
    ----------
    dataset
        Tokenized cells (``input_ids``).
    token_dictionary
        The token dictionary; when given, V2 means it has ``<cls>`` and ``<eos>``. Without it the
        first and last tokens of the cells decide (all ``<cls>``=2 ... ``<eos>``=3).
    """
    if token_dictionary is not None:
        return CLS in token_dictionary and EOS in token_dictionary
    if len(dataset) == 0:
        return False
    probe = dataset.select(range(min(len(dataset), 256)))["input_ids"]
    return all(len(ids) >= 2 and ids[0] == _V2_CLS_ID and ids[-1] == _V2_EOS_ID for ids in probe)


def cell_embeddings(
    model_dir: str | Path | None,
    dataset: datasets.Dataset,
    *,
    emb_layer: int = -1,
    batch_size: int = 32,
    special_tokens: bool | None = None,
    token_dictionary: Mapping[str, int] | None = None,
    encoder: BertModel | None = None,
    precision: str = "auto",
    emb_mode: str = "auto",
    processes: distributed.Processes | None = None,
) -> np.ndarray:
    """Cell embeddings (:func:`pool_cells`) of every cell of a dataset.

    Parameters
    ----------
    model_dir
        A saved base or fine-tuned model (see :func:`load_encoder`); may be ``None`` when
        ``encoder`` is given.
    dataset
        Tokenized cells with an ``input_ids`` column (and ``length``, else it is computed).
    emb_layer
        Layer, in Geneformer's convention (:func:`hidden_layer_index`).
    batch_size
        Cells per forward pass; cells are run longest first so batches pad little.
    special_tokens
        Whether cells carry ``<cls>``/``<eos>`` (excluded from the mean). ``None``: detected by
        :func:`detect_special_tokens`.
    token_dictionary
        Used for the detection and for the ``<pad>`` id when given.
    encoder
        An already loaded encoder (skips loading ``model_dir``).
    precision
        ``auto`` (bfloat16 on a GPU, float32 on the CPU), ``float32`` or ``bfloat16``.
    emb_mode
        ``auto`` (``<cls>`` for V2 cells, the gene mean for V1), ``cls`` or ``cell``.
    processes
        Under a launcher (:func:`rosmap_geneformer.distributed.start`): the batches are shared
        out and every process gets all embeddings, the same bytes as one process.

    Returns
    -------
    Cells x hidden, float32, rows in dataset order.
    """
    if encoder is None:
        if model_dir is None:
            msg = "cell_embeddings: give model_dir or an already loaded encoder."
            raise InputError(msg)
        encoder, _ = load_encoder(model_dir)
    layer_index = hidden_layer_index(encoder.config.num_hidden_layers, emb_layer)
    if special_tokens is None:
        special_tokens = detect_special_tokens(dataset, token_dictionary=token_dictionary)
    pad_token_id = int(
        token_dictionary[PAD] if token_dictionary is not None else encoder.config.pad_token_id or 0
    )
    if "length" in dataset.column_names:
        lengths = np.asarray(dataset["length"], dtype=np.int64)
    else:
        lengths = np.fromiter((len(x) for x in dataset["input_ids"]), dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    out = np.zeros((len(dataset), encoder.config.hidden_size), dtype=np.float32)
    ids_column = dataset.select_columns(["input_ids"])
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def embed_rows(rows: np.ndarray) -> np.ndarray:
        cells, _ = embed_batch(
            encoder,
            ids_column.select(rows.tolist())["input_ids"],
            layer_index=layer_index,
            pad_token_id=pad_token_id,
            special_tokens=special_tokens,
            emb_mode=emb_mode,
            gene_embeddings=False,
            precision=precision,
        )
        return cells

    results = distributed.ordered_across_processes(
        batches, embed_rows, processes or distributed.Processes()
    )
    for rows, cells in zip(
        batches, tqdm(results, total=len(batches), desc="embed", unit="batch"), strict=True
    ):
        out[rows] = cells
    return out
