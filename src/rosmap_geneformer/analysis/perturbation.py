"""In silico perturbation with Geneformer's semantics (``geneformer-spec.md`` section 7).

Encodings, per cell and per perturbed gene:

- **delete**: the gene's token is removed; the cell gets one token shorter.
- **overexpress** (genes present in the cell): the gene's token moves to the front, position 0 in
  V1 and position 1, right after ``<cls>``, in V2; the other tokens keep their order. A gene
  already at the front is skipped (Geneformer skips it too: its shift would be zero).
  :func:`overexpress_tokens` also implements the gene-list form (genes inserted at the front when
  absent, then truncation to the model's length keeping ``<eos>``).

Shifts:

- cell mode: ``cos(perturbed, original)`` of the mean-pooled cell embeddings;
- towards states: ``cos(perturbed, E_s) - cos(original, E_s)`` for the centroid ``E_s`` of a
  state's cell embeddings (same model, same layer);
- gene mode: for each remaining gene, ``cos`` between its embedding in the perturbed cell and in
  the original cell, positions aligned after the removal (or the move).

Speed: every perturbation is a full forward pass (a deletion changes every position's attention),
but all perturbations of a cell have the same length, so they run together without padding;
cells are taken longest first; layers after the one read are not run
(:mod:`rosmap_geneformer.analysis.embeddings`); the language-model or classification head is never run;
the perturbed encodings are built with array indexing, not per-token Python. ``max_tokens``
bounds the tokens of one forward pass and so the memory. :func:`naive_cell_shifts` is the
one-forward-per-perturbation reference the tests compare against.

Statistics follow ``InSilicoPerturberStats(mode="goal_state_shift")``: each gene's shifts against
the pooled shifts of all genes (downsampled with a seed), Wilcoxon rank-sum test, Benjamini-Hochberg
FDR.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm
from transformers import BertModel

from rosmap_geneformer.analysis.embeddings import PRECISIONS, hidden_states, mean_pool
from rosmap_geneformer.params import check_known_keys

logger = logging.getLogger(__name__)

PERTURB_TYPES = ("delete", "overexpress")
RANK_BY = ("goal", "net")
# Key of the net shift (towards the goal minus towards the start state) among the state shifts.
NET = "net"
# Tokens per forward pass; bounds the activations held at once (about 4 x hidden x intermediate
# bytes per token for a BERT layer).
DEFAULT_MAX_TOKENS = 16_384
# Geneformer's null size for goal_state_shift.
DEFAULT_NULL_SIZE = 100_000


# --------------------------------------------------------------------------------------------
# Encodings


def _check_type(perturb_type: str) -> None:
    if perturb_type not in PERTURB_TYPES:
        msg = f"perturb_type={perturb_type!r}: use one of {list(PERTURB_TYPES)}."
        raise ValueError(msg)


def gene_slice(length: int, *, special_tokens: bool) -> slice:
    """Positions of the genes in a cell of ``length`` tokens (``<cls>``/``<eos>`` excluded)."""
    return slice(1, length - 1) if special_tokens else slice(0, length)


def delete_tokens(input_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """Geneformer's deletion: remove every occurrence of ``tokens`` (perturbed together).

    Parameters
    ----------
    input_ids
        A cell's rank-value encoding.
    tokens
        Gene tokens to delete; tokens absent from the cell are ignored.
    """
    ids = np.asarray(input_ids)
    return ids[~np.isin(ids, np.asarray(tokens, dtype=ids.dtype))]


def overexpress_tokens(
    input_ids: Sequence[int],
    tokens: Sequence[int],
    *,
    special_tokens: bool,
    max_length: int | None = None,
) -> np.ndarray:
    """Geneformer's overexpression of a gene set: the genes go to the front.

    Genes present in the cell move to the front in their original relative order; absent genes
    are inserted there too, after the present ones in the order given. The front is position 0
    (V1) or 1, after ``<cls>`` (V2). The result is truncated to ``max_length``; in V2 the last
    token stays ``<eos>``.

    Parameters
    ----------
    input_ids
        A cell's rank-value encoding.
    tokens
        Gene tokens to overexpress (together).
    special_tokens
        Whether the cell starts with ``<cls>`` and ends with ``<eos>``.
    max_length
        The model's input size; ``None``: no truncation.
    """
    ids = np.asarray(input_ids)
    tokens = np.asarray(tokens, dtype=ids.dtype)
    present = np.isin(ids, tokens)
    moved = ids[present]
    if special_tokens:
        present[[0, -1]] = False
        moved = ids[present]
    absent = tokens[~np.isin(tokens, ids)]
    front = np.concatenate([moved, absent]).astype(ids.dtype)
    rest = ids[~present]
    if special_tokens:
        out = np.concatenate([rest[:1], front, rest[1:]])
        if max_length is not None and len(out) > max_length:
            out = np.concatenate([out[: max_length - 1], out[-1:]])
        return out
    out = np.concatenate([front, rest])
    return out[:max_length] if max_length is not None else out


def perturbation_index(
    length: int, positions: np.ndarray, *, perturb_type: str, special_tokens: bool
) -> np.ndarray:
    """For each single-gene perturbation, the original position of every perturbed position.

    Parameters
    ----------
    length
        Tokens in the cell.
    positions
        Positions perturbed, one perturbation each.
    perturb_type
        ``"delete"`` (rows of ``length - 1``) or ``"overexpress"`` (rows of ``length``, the gene
        moved to the front).
    special_tokens
        V2 layout (the front is position 1).

    Returns
    -------
    ``int64`` array, perturbations x perturbed length: ``perturbed = input_ids[index]``, and the
    same index aligns the perturbed cell's gene embeddings with the original's.
    """
    _check_type(perturb_type)
    p = np.asarray(positions, dtype=np.int64)[:, None]
    if perturb_type == "delete":
        j = np.arange(length - 1, dtype=np.int64)[None, :]
        return j + (j >= p)
    front = 1 if special_tokens else 0
    j = np.arange(length, dtype=np.int64)[None, :]
    shifted = np.where(j <= p, j - 1, j)
    return np.where(j < front, j, np.where(j == front, p, shifted))


def perturbation_batch(
    input_ids: Sequence[int],
    positions: Sequence[int],
    *,
    perturb_type: str,
    special_tokens: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """All single-gene perturbations of one cell as one matrix.

    Parameters
    ----------
    input_ids
        The cell's tokens.
    positions
        Positions to perturb (genes only; ``<cls>``/``<eos>`` are refused).
    perturb_type
        ``"delete"`` or ``"overexpress"``.
    special_tokens
        V2 layout.

    Returns
    -------
    The perturbed encodings (perturbations x length, the input's dtype) and their
    :func:`perturbation_index`.
    """
    ids = np.asarray(input_ids)
    positions = np.asarray(positions, dtype=np.int64)
    genes = gene_slice(len(ids), special_tokens=special_tokens)
    if positions.size and (
        positions.min() < genes.start
        or positions.max() >= genes.stop
        or positions.max() >= len(ids)
    ):
        msg = (
            f"positions {positions.tolist()} include a non-gene position for a cell of "
            f"{len(ids)} tokens (genes are positions {genes.start}..{genes.stop - 1})."
        )
        raise ValueError(msg)
    index = perturbation_index(
        len(ids), positions, perturb_type=perturb_type, special_tokens=special_tokens
    )
    return ids[index], index


# --------------------------------------------------------------------------------------------
# Batched engine


@dataclass
class CellPerturbations:
    """The perturbations of one cell.

    Attributes
    ----------
    cell
        Index of the cell in the input of :func:`perturb_cells`.
    tokens
        The perturbed gene tokens, one per perturbation.
    original
        The unperturbed cell embedding (hidden,).
    perturbed
        The perturbed cell embeddings (perturbations x hidden).
    gene_tokens
        Gene mode: the tokens of the affected genes (perturbations x genes), else ``None``.
    gene_cosines
        Gene mode: cosine of each affected gene's embedding, perturbed vs original.
    """

    cell: int
    tokens: np.ndarray
    original: np.ndarray
    perturbed: np.ndarray
    gene_tokens: np.ndarray | None = None
    gene_cosines: np.ndarray | None = None

    @property
    def cell_cosines(self) -> np.ndarray:
        """``cos(perturbed, original)`` per perturbation (Geneformer's cell-mode shift)."""
        return cosine(self.perturbed, self.original[None, :])


@dataclass
class EngineStats:
    """Counters of a :func:`perturb_cells` run (for the stage report and the benchmark)."""

    cells: int = 0
    perturbations: int = 0
    forward_passes: int = 0
    tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Perturbations per second."""
        return self.perturbations / self.seconds if self.seconds else float("nan")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64 (broadcasting over leading axes)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.where(den == 0, 1.0, den)


def _torch_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


def _encoder_device(encoder: BertModel) -> torch.device:
    return next(encoder.parameters()).device


def perturb_cells(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    *,
    perturb_type: str,
    layer_index: int,
    special_tokens: bool,
    gene_mode: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    pad_token_id: int = 0,
    precision: str = "auto",
    progress: bool = True,
    engine_stats: EngineStats | None = None,
) -> Iterator[CellPerturbations]:
    """Run single-gene perturbations of many cells, batched, and yield their embeddings.

    Cells are processed longest first; the perturbations of consecutive cells are packed into
    forward passes of at most ``max_tokens`` tokens (same-length rows need no padding or mask).

    Parameters
    ----------
    encoder
        A ``BertModel`` in eval mode (:func:`rosmap_geneformer.analysis.embeddings.load_encoder`).
    cells
        Token lists.
    positions
        For each cell, the positions to perturb, one perturbation each (may be empty).
    perturb_type
        ``"delete"`` or ``"overexpress"`` (moves the gene to the front).
    layer_index
        ``hidden_states`` entry to read (:func:`rosmap_geneformer.analysis.embeddings.hidden_layer_index`).
    special_tokens
        V2 layout: ``<cls>``/``<eos>`` are excluded from means and gene comparisons.
    gene_mode
        Also compare every remaining gene's embedding (``*_and_gene`` modes).
    max_tokens
        Upper bound on rows x length of one forward pass.
    pad_token_id
        The ``<pad>`` id.
    precision
        ``auto`` (bfloat16 on a GPU, float32 on the CPU), ``float32`` or ``bfloat16``
        (:func:`rosmap_geneformer.analysis.embeddings.hidden_states`).
    progress
        Show a tqdm bar over perturbations.
    engine_stats
        Filled with counters and wall time when given.

    Yields
    ------
    One :class:`CellPerturbations` per cell with at least one perturbation, longest cell first.
    """
    _check_type(perturb_type)
    if len(cells) != len(positions):
        msg = f"{len(cells)} cells but {len(positions)} position lists."
        raise ValueError(msg)
    device = _encoder_device(encoder)
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
    counts = np.fromiter((len(p) for p in positions), dtype=np.int64, count=len(cells))
    order = [int(i) for i in np.argsort(-lengths, kind="stable") if counts[i] > 0]
    total = int(counts[order].sum()) if order else 0
    engine_stats = engine_stats if engine_stats is not None else EngineStats()
    start_time = time.perf_counter()
    bar = tqdm(total=total, desc=f"perturb ({perturb_type})", unit="pert", disable=not progress)
    # A chunk holds enough perturbations for a few full forward passes, so that short cells share
    # batches, while the originals' gene embeddings held for gene mode stay bounded.
    costs = [int(counts[i] * lengths[i]) for i in order]
    try:
        for chunk in _chunks(order, costs, budget=4 * max_tokens):
            yield from _run_chunk(
                encoder,
                cells,
                positions,
                chunk,
                perturb_type=perturb_type,
                layer_index=layer_index,
                special_tokens=special_tokens,
                gene_mode=gene_mode,
                max_tokens=max_tokens,
                pad_token_id=pad_token_id,
                precision=precision,
                device=device,
                engine_stats=engine_stats,
                bar=bar,
            )
    finally:
        bar.close()
        engine_stats.seconds += time.perf_counter() - start_time


def _chunks(items: Sequence[int], costs: Sequence[int], *, budget: int) -> Iterator[list[int]]:
    """Consecutive groups of ``items``, each closed once its summed cost reaches ``budget``."""
    chunk: list[int] = []
    total = 0
    for item, cost in zip(items, costs, strict=True):
        chunk.append(item)
        total += cost
        if total >= budget:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


def _batches(lengths: Sequence[int], max_tokens: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) row ranges whose rows x longest row stays within the budget."""
    start = 0
    while start < len(lengths):
        stop = start + 1
        longest = lengths[start]
        while stop < len(lengths):
            longest_next = max(longest, lengths[stop])
            if (stop - start + 1) * longest_next > max_tokens:
                break
            longest = longest_next
            stop += 1
        yield start, stop
        start = stop


def _forward(
    encoder: BertModel,
    rows: Sequence[np.ndarray],
    *,
    layer_index: int,
    pad_token_id: int,
    precision: str,
    device: torch.device,
    engine_stats: EngineStats,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of a list of token rows (right-padded when lengths differ)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max())
    if (lengths == width).all():
        ids = torch.from_numpy(np.stack(rows).astype(np.int64, copy=False)).to(device)
        mask = None
    else:
        matrix = np.full((len(rows), width), pad_token_id, dtype=np.int64)
        for r, row in enumerate(rows):
            matrix[r, : len(row)] = row
        ids = torch.from_numpy(matrix).to(device)
        mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]).long().to(device)
    states = hidden_states(
        encoder, ids, layer_index=layer_index, attention_mask=mask, precision=precision
    )
    engine_stats.forward_passes += 1
    engine_stats.tokens += int(lengths.sum())
    return states, torch.from_numpy(lengths).to(device)


def _run_chunk(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    chunk: Sequence[int],
    *,
    perturb_type: str,
    layer_index: int,
    special_tokens: bool,
    gene_mode: bool,
    max_tokens: int,
    pad_token_id: int,
    precision: str,
    device: torch.device,
    engine_stats: EngineStats,
    bar: Any,
) -> Iterator[CellPerturbations]:
    ids = {i: np.asarray(cells[i]) for i in chunk}
    pos = {i: np.asarray(positions[i], dtype=np.int64) for i in chunk}

    def forward(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of ``rows`` and their mean-pooled cell embeddings."""
        states, lengths = _forward(
            encoder,
            rows,
            layer_index=layer_index,
            pad_token_id=pad_token_id,
            precision=precision,
            device=device,
            engine_stats=engine_stats,
        )
        pooled = mean_pool(
            states, lengths, exclude_first=special_tokens, exclude_last=special_tokens
        )
        return states, pooled

    # Originals, longest first (the chunk is already in that order).
    original_cell: dict[int, torch.Tensor] = {}
    original_genes: dict[int, torch.Tensor] = {}
    for a, b in _batches([len(ids[i]) for i in chunk], max_tokens):
        members = chunk[a:b]
        states, pooled = forward([ids[i] for i in members])
        for r, i in enumerate(members):
            original_cell[i] = pooled[r]
            if gene_mode:
                original_genes[i] = states[r, : len(ids[i])]

    # Perturbations: one job per (cell, perturbation); rows of a cell share one length.
    encodings: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    jobs: list[tuple[int, int]] = []
    for i in chunk:
        encodings[i] = perturbation_batch(
            ids[i], pos[i], perturb_type=perturb_type, special_tokens=special_tokens
        )
        jobs.extend((i, r) for r in range(len(pos[i])))
    perturbed = {
        i: torch.empty((len(pos[i]), original_cell[i].shape[-1]), device=device) for i in chunk
    }
    gene_cos: dict[int, np.ndarray] = {}
    gene_tok: dict[int, np.ndarray] = {}
    if gene_mode:
        for i in chunk:
            index = encodings[i][1]
            keep = _affected_columns(index, pos[i], special_tokens=special_tokens)
            gene_tok[i] = np.take_along_axis(encodings[i][0], keep, axis=1)
            gene_cos[i] = np.empty(keep.shape, dtype=np.float64)
    job_lengths = [encodings[i][0].shape[1] for i, _ in jobs]
    for a, b in _batches(job_lengths, max_tokens):
        batch = jobs[a:b]
        states, pooled = forward([encodings[i][0][r] for i, r in batch])
        # Write back per run of rows from the same cell (vectorised gene comparison).
        start = 0
        while start < len(batch):
            i = batch[start][0]
            stop = start
            while stop < len(batch) and batch[stop][0] == i:
                stop += 1
            first, last = batch[start][1], batch[stop - 1][1] + 1
            perturbed[i][first:last] = pooled[start:stop]
            if gene_mode:
                index = encodings[i][1][first:last]
                keep = _affected_columns(index, pos[i][first:last], special_tokens=special_tokens)
                width = index.shape[1]
                mine = states[start:stop, :width]
                keep_t = torch.from_numpy(keep).to(device)
                original = original_genes[i][torch.from_numpy(index).to(device)]
                mine = torch.gather(mine, 1, keep_t[:, :, None].expand(-1, -1, mine.shape[-1]))
                original = torch.gather(
                    original, 1, keep_t[:, :, None].expand(-1, -1, original.shape[-1])
                )
                gene_cos[i][first:last] = _torch_cosine(mine, original).cpu().numpy()
            start = stop
        bar.update(len(batch))
        engine_stats.perturbations += len(batch)

    for i in chunk:
        engine_stats.cells += 1
        yield CellPerturbations(
            cell=i,
            tokens=ids[i][pos[i]],
            original=original_cell[i].cpu().numpy(),
            perturbed=perturbed[i].cpu().numpy(),
            gene_tokens=gene_tok.get(i),
            gene_cosines=gene_cos.get(i),
        )


def _affected_columns(
    index: np.ndarray, positions: np.ndarray, *, special_tokens: bool
) -> np.ndarray:
    """Columns of each perturbed row that hold a remaining gene (not a special, not the gene)."""
    width = index.shape[1]
    columns = np.arange(width)[None, :]
    keep = np.ones(index.shape, dtype=bool)
    if special_tokens:
        keep[:, 0] = False
        keep[:, -1] = False
    keep &= index != positions[:, None]
    counts = keep.sum(axis=1)
    if not (counts == counts[0]).all():  # pragma: no cover - rows of one cell share a layout
        msg = "internal error: perturbed rows of one cell keep different numbers of genes."
        raise AssertionError(msg)
    return np.broadcast_to(columns, index.shape)[keep].reshape(len(index), -1)


def naive_cell_shifts(
    encoder: BertModel,
    input_ids: Sequence[int],
    positions: Sequence[int],
    *,
    perturb_type: str,
    layer_index: int,
    special_tokens: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference: one unbatched full-model forward pass per perturbation, Geneformer style.

    Runs the whole encoder with ``output_hidden_states`` and reads ``hidden_states[layer_index]``
    from it, building each perturbed encoding with :func:`delete_tokens` or
    :func:`overexpress_tokens`. For tests and benchmarks only.

    Returns
    -------
    The original cell embedding and the perturbed cell embeddings (perturbations x hidden).
    """
    device = _encoder_device(encoder)
    ids = np.asarray(input_ids)

    def embed(tokens: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            out = encoder(
                input_ids=torch.from_numpy(tokens.astype(np.int64))[None].to(device),
                output_hidden_states=True,
            )
        states = out.hidden_states[layer_index].float()
        length = torch.tensor([len(tokens)], device=device)
        return mean_pool(states, length, exclude_first=special_tokens, exclude_last=special_tokens)[
            0
        ]

    original = embed(ids).cpu().numpy()
    rows = []
    for p in positions:
        token = [int(ids[p])]
        if perturb_type == "delete":
            perturbed = delete_tokens(ids, token)
        else:
            perturbed = overexpress_tokens(ids, token, special_tokens=special_tokens)
        rows.append(embed(perturbed).cpu().numpy())
    return original, np.stack(rows) if rows else np.zeros((0, original.shape[0]), np.float32)


# --------------------------------------------------------------------------------------------
# Shifts towards cell states and statistics


def state_shifts(
    perturbed: np.ndarray, original: np.ndarray, centroids: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``cos(perturbed, E_s) - cos(original, E_s)`` for every state ``s``.

    Parameters
    ----------
    perturbed
        Perturbed cell embeddings (perturbations x hidden).
    original
        The original cell embedding (hidden,).
    centroids
        State -> centroid embedding (hidden,).
    """
    out = {}
    for state, centroid in centroids.items():
        base = cosine(original, centroid)
        out[state] = cosine(perturbed, centroid[None, :]) - base
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR), as ``statsmodels`` ``fdr_bh``.

    NaN p-values stay NaN and do not count towards the number of tests.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    n = order.size
    ranked = p[order] * n / np.arange(1, n + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out[order] = np.clip(adjusted, 0.0, 1.0)
    return out


def pooled_null(
    shifts: Mapping[Any, np.ndarray], *, size: int = DEFAULT_NULL_SIZE, seed: int = 0
) -> np.ndarray:
    """All genes' shifts pooled, downsampled without replacement to ``size`` with a seed.

    Genes are pooled in sorted key order, so the null depends only on the data and the seed.
    """
    keys = sorted(shifts)
    if not keys:
        return np.zeros(0)
    pooled = np.concatenate([np.asarray(shifts[k], dtype=np.float64) for k in keys])
    if pooled.size > size:
        rng = np.random.default_rng(seed)
        pooled = pooled[np.sort(rng.choice(pooled.size, size=size, replace=False))]
    return pooled


def shift_statistics(
    shifts: Mapping[Any, np.ndarray],
    *,
    null: np.ndarray | None = None,
    null_size: int = DEFAULT_NULL_SIZE,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-gene mean shift, rank-sum p-value against the pooled null, and BH FDR.

    Parameters
    ----------
    shifts
        Gene -> its per-cell shifts.
    null
        The null sample; ``None``: :func:`pooled_null` of ``shifts``.
    null_size, seed
        Size and seed of the pooled null.

    Returns
    -------
    Indexed by gene (sorted): ``mean_shift``, ``p``, ``fdr``, ``n_cells``.
    """
    if null is None:
        null = pooled_null(shifts, size=null_size, seed=seed)
    keys = sorted(shifts)
    means, pvalues, n_cells = [], [], []
    for key in keys:
        values = np.asarray(shifts[key], dtype=np.float64)
        means.append(values.mean() if values.size else np.nan)
        n_cells.append(values.size)
        if values.size and null.size:
            pvalues.append(float(stats.ranksums(values, null).pvalue))
        else:
            pvalues.append(np.nan)
    frame = pd.DataFrame(
        {"mean_shift": means, "p": pvalues, "n_cells": n_cells},
        index=pd.Index(keys, name="gene"),
    )
    frame["fdr"] = benjamini_hochberg(frame["p"].to_numpy())
    return frame[["mean_shift", "p", "fdr", "n_cells"]]


# --------------------------------------------------------------------------------------------
# The perturb stage's computation


@dataclass
class PerturbationResult:
    """Per-gene results of one perturbation type.

    Attributes
    ----------
    table
        Ranked table, one row per gene (see :func:`perturbation_table`).
    engine
        Counters of the forward passes.
    """

    table: pd.DataFrame
    engine: EngineStats


def genes_to_perturb(
    cells: Sequence[Sequence[int]],
    *,
    min_cells: int,
    special_tokens: bool,
    exclude: Sequence[int] = (),
) -> np.ndarray:
    """Gene tokens present in at least ``min_cells`` of the cells (sorted)."""
    counts: dict[int, int] = {}
    for ids in cells:
        genes = np.unique(np.asarray(ids)[gene_slice(len(ids), special_tokens=special_tokens)])
        for token in genes.tolist():
            counts[token] = counts.get(token, 0) + 1
    excluded = set(int(t) for t in exclude)
    return np.array(
        sorted(t for t, n in counts.items() if n >= min_cells and t not in excluded),
        dtype=np.int64,
    )


def perturbation_positions(
    cells: Sequence[Sequence[int]],
    genes: np.ndarray,
    *,
    perturb_type: str,
    special_tokens: bool,
) -> list[np.ndarray]:
    """Per cell, the positions of ``genes`` to perturb (overexpression skips the front gene)."""
    out = []
    for ids in cells:
        ids = np.asarray(ids)
        window = gene_slice(len(ids), special_tokens=special_tokens)
        where = np.flatnonzero(np.isin(ids[window], genes)) + window.start
        if perturb_type == "overexpress":
            where = where[where != window.start]
        out.append(where)
    return out


def run_state_perturbation(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    genes: np.ndarray,
    centroids: Mapping[str, np.ndarray],
    *,
    goal_state: str,
    start_state: str | None = None,
    rank_by: str = "goal",
    perturb_type: str,
    layer_index: int,
    special_tokens: bool,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    pad_token_id: int = 0,
    precision: str = "auto",
    null_size: int = DEFAULT_NULL_SIZE,
    seed: int = 0,
    progress: bool = True,
) -> PerturbationResult:
    """Perturb ``genes`` one at a time in every cell and test the shifts towards each state.

    Parameters
    ----------
    encoder
        The model's encoder.
    cells
        Start-state cells (token lists).
    genes
        Gene tokens to perturb (each where present in a cell).
    centroids
        State -> centroid embedding; must include ``goal_state``; the others are alternatives
        (and ``start_state``).
    goal_state
        The state the perturbation should move the cells towards.
    start_state
        The cells' own state; when its centroid is given, the table also has the net shift
        (towards the goal minus towards the start state), which discounts perturbations that
        move a cell away from every state alike.
    rank_by
        ``"goal"`` (Geneformer: the shift towards the goal) or ``"net"``.
    perturb_type, layer_index, special_tokens, max_tokens, pad_token_id, precision
        See :func:`perturb_cells`.
    null_size, seed
        Pooled null for the rank-sum test (per state).
    progress
        Show a progress bar.

    Returns
    -------
    The per-gene table (indexed by token) and the engine counters.
    """
    if goal_state not in centroids:
        msg = f"goal state {goal_state!r} has no centroid; states: {sorted(centroids)}."
        raise ValueError(msg)
    positions = perturbation_positions(
        cells, genes, perturb_type=perturb_type, special_tokens=special_tokens
    )
    per_state: dict[str, dict[int, list[np.ndarray]]] = {s: {} for s in centroids}
    if start_state is not None and start_state in centroids:
        per_state[NET] = {}
    cos_original: dict[int, list[np.ndarray]] = {}
    engine = EngineStats()
    for result in perturb_cells(
        encoder,
        cells,
        positions,
        perturb_type=perturb_type,
        layer_index=layer_index,
        special_tokens=special_tokens,
        max_tokens=max_tokens,
        pad_token_id=pad_token_id,
        precision=precision,
        progress=progress,
        engine_stats=engine,
    ):
        shifts = state_shifts(result.perturbed, result.original, centroids)
        if start_state is not None and start_state in shifts:
            shifts[NET] = shifts[goal_state] - shifts[start_state]
        cosines = result.cell_cosines
        for k, token in enumerate(result.tokens.tolist()):
            for state, values in shifts.items():
                per_state[state].setdefault(token, []).append(values[k : k + 1])
            cos_original.setdefault(token, []).append(cosines[k : k + 1])
    collected = {
        state: {t: np.concatenate(v) for t, v in values.items()}
        for state, values in per_state.items()
    }
    table = perturbation_table(
        collected,
        {t: np.concatenate(v) for t, v in cos_original.items()},
        goal_state=goal_state,
        rank_by=rank_by,
        null_size=null_size,
        seed=seed,
    )
    return PerturbationResult(table=table, engine=engine)


def perturbation_table(
    shifts: Mapping[str, Mapping[int, np.ndarray]],
    cell_cosines: Mapping[int, np.ndarray],
    *,
    goal_state: str,
    rank_by: str = "goal",
    null_size: int = DEFAULT_NULL_SIZE,
    seed: int = 0,
) -> pd.DataFrame:
    """Ranked per-gene table from per-cell shifts.

    Parameters
    ----------
    shifts
        State -> gene token -> per-cell shifts towards that state.
    cell_cosines
        Gene token -> per-cell ``cos(perturbed, original)``.
    goal_state
        The goal state.
    rank_by
        ``"goal"``: order by the mean shift towards the goal (Geneformer), largest first;
        ``"net"``: by the mean net shift (``shifts["net"]``, goal minus start).
    null_size, seed
        Pooled null (one per state, same seed).

    Returns
    -------
    Indexed by token: ``mean_shift``, ``p``, ``fdr``, ``n_cells`` for the goal state, then
    ``<state>_mean_shift``, ``<state>_p``, ``<state>_fdr`` for each other state (``net_...``
    for the net shift), and ``mean_cosine_to_original``; ties by token.
    """
    if rank_by not in RANK_BY:
        msg = f"rank_by={rank_by!r}: use one of {list(RANK_BY)}."
        raise ValueError(msg)
    if rank_by == "net" and NET not in shifts:
        msg = "rank_by='net' needs the start state's centroid (the net shift)."
        raise ValueError(msg)
    goal = shift_statistics(shifts[goal_state], null_size=null_size, seed=seed)
    table = goal.copy()
    for state in sorted(s for s in shifts if s not in (goal_state, NET)) + (
        [NET] if NET in shifts else []
    ):
        other = shift_statistics(shifts[state], null_size=null_size, seed=seed)
        table[f"{state}_mean_shift"] = other["mean_shift"]
        table[f"{state}_p"] = other["p"]
        table[f"{state}_fdr"] = other["fdr"]
    table["mean_cosine_to_original"] = pd.Series(
        {t: float(np.mean(v)) for t, v in cell_cosines.items()}
    )
    table = table.reset_index()
    key = "mean_shift" if rank_by == "goal" else f"{NET}_mean_shift"
    table = table.sort_values([key, "gene"], ascending=[False, True], kind="stable")
    return table.set_index("gene")


# --------------------------------------------------------------------------------------------
# The perturb stage


@dataclass(frozen=True)
class PerturbSettings:
    """``params.yaml: perturb``.

    Attributes
    ----------
    task
        Fine-tuned model to explain (``models/finetuned/<task>``); its encoder is used.
    emb_layer
        Layer, in Geneformer's convention (0: last, -1: second to last).
    split
        Split whose cells are perturbed and whose cells give the state centroids.
    state_key
        Column holding the cell state (``ad_status``).
    start_state, goal_state
        Cells perturbed, and the state they should move towards.
    alt_states
        Further states to measure shifts towards.
    rank_by
        ``net`` (towards the goal minus towards the start state; the default, because a
        deletion that moves a cell away from every state alike gets a negative goal shift
        however relevant it is) or ``goal`` (Geneformer's ranking: the shift towards the goal).
        The table has both.
    cell_type
        Only cells of this ``cell_type`` (``None``: all).
    types
        Perturbations to run (``delete``, ``overexpress``).
    max_cells
        Start-state cells perturbed (seeded subset; ``None``: all).
    min_cells
        Genes perturbed: present in at least this many of the perturbed cells.
    max_state_cells
        Cells per state for the centroids (seeded subset; ``None``: all).
    null_size
        Size of the pooled null of the rank-sum test.
    fdr
        Significance threshold on the BH FDR.
    max_tokens
        Tokens per forward pass (bounds memory).
    precision
        ``auto`` (bfloat16 on a GPU, exact float32 on the CPU), ``float32`` or ``bfloat16``
        (bfloat16 matrix products; on CPUs with AMX about twice float32's rate, shifts within
        ~1%).
    batch_size
        Cells per forward pass for the centroid embeddings.
    top_n
        Genes shown in the plot.
    """

    task: str = "disease"
    emb_layer: int = 0
    split: str = "train"
    state_key: str = "ad_status"
    start_state: str = "AD"
    goal_state: str = "control"
    alt_states: tuple[str, ...] = ()
    rank_by: str = "net"
    cell_type: str | None = "Mic"
    types: tuple[str, ...] = PERTURB_TYPES
    max_cells: int | None = 50
    min_cells: int = 10
    max_state_cells: int | None = 1000
    null_size: int = DEFAULT_NULL_SIZE
    fdr: float = 0.05
    max_tokens: int = DEFAULT_MAX_TOKENS
    precision: str = "auto"
    batch_size: int = 32
    top_n: int = 25

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> PerturbSettings:
        """Build from ``params.yaml: perturb`` (unknown keys are an error)."""
        check_known_keys(values, cls.__dataclass_fields__, section="perturb")
        values = dict(values)
        for key in ("alt_states", "types"):
            if key in values:
                values[key] = tuple(values[key] or ())
        settings = cls(**values)
        bad = sorted(set(settings.types) - set(PERTURB_TYPES))
        if bad or not settings.types:
            msg = f"params.yaml perturb.types={list(settings.types)}: use {list(PERTURB_TYPES)}."
            raise ValueError(msg)
        if settings.split == "test":
            msg = "params.yaml perturb.split: test is reserved for evaluate; use train or val."
            raise ValueError(msg)
        if settings.precision not in PRECISIONS:
            msg = f"params.yaml perturb.precision={settings.precision!r}: use {list(PRECISIONS)}."
            raise ValueError(msg)
        if settings.rank_by not in RANK_BY:
            msg = f"params.yaml perturb.rank_by={settings.rank_by!r}: use one of {list(RANK_BY)}."
            raise ValueError(msg)
        return settings


def token_annotation(
    token_dictionary: Mapping[str, int], symbols: Mapping[str, str]
) -> pd.DataFrame:
    """Token -> Ensembl id and symbol (``""`` when unknown), special tokens excluded.

    Parameters
    ----------
    token_dictionary
        Ensembl id -> token.
    symbols
        Ensembl id -> gene symbol (e.g. ``var["gene_symbol"]`` of the sampled h5ad).
    """
    rows = [
        (int(token), gene, str(symbols.get(gene, "") or ""))
        for gene, token in token_dictionary.items()
        if not gene.startswith("<")
    ]
    frame = pd.DataFrame(rows, columns=["token", "ensembl_id", "symbol"])
    return frame.set_index("token").sort_index()


def _subset(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


def perturb_dataset(
    encoder: BertModel,
    dataset: Any,
    *,
    settings: PerturbSettings,
    annotation: pd.DataFrame,
    special_tokens: bool,
    pad_token_id: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The ``perturb`` stage: select cells, compute state centroids, perturb, test, rank.

    Parameters
    ----------
    encoder
        The encoder of the model to explain.
    dataset
        Tokenized cells of ``settings.split`` (``input_ids``, ``length``, ``cell_type`` and the
        state column).
    settings
        ``params.yaml: perturb``.
    annotation
        :func:`token_annotation` (token -> Ensembl id, symbol).
    special_tokens
        V2 layout.
    pad_token_id
        The ``<pad>`` id.
    seed
        Seeds the cell subsets and the null.
    progress
        Show progress bars.

    Returns
    -------
    One ranked table per perturbation type, and the summary (counts and settings) for the
    stage report.
    """
    from rosmap_geneformer.analysis.embeddings import cell_embeddings, hidden_layer_index

    for column in (settings.state_key, "cell_type", "input_ids"):
        if column not in dataset.column_names:
            msg = (
                f"tokenized {settings.split} dataset: no column {column!r} (columns: "
                f"{dataset.column_names}); check perturb.state_key and tokenize.columns."
            )
            raise ValueError(msg)
    rng = np.random.default_rng(seed)
    layer_index = hidden_layer_index(encoder.config.num_hidden_layers, settings.emb_layer)
    states = np.asarray(dataset[settings.state_key], dtype=object)
    types = np.asarray(dataset["cell_type"], dtype=object)
    in_type = (
        np.ones(len(dataset), bool) if settings.cell_type is None else types == settings.cell_type
    )
    summary: dict[str, Any] = {
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "layer_index": layer_index,
        "n_layers": encoder.config.num_hidden_layers,
        "cells": {
            "split": len(dataset),
            "other_cell_types": int((~in_type).sum()),
            "by_state": {
                str(s): int(((states == s) & in_type).sum()) for s in sorted(set(states[in_type]))
            },
        },
    }
    wanted_states = [settings.start_state, settings.goal_state, *settings.alt_states]
    missing = [s for s in wanted_states if not ((states == s) & in_type).any()]
    if missing:
        msg = (
            f"perturb: no {settings.split} cells of cell type {settings.cell_type!r} in state(s) "
            f"{missing} (column {settings.state_key!r}; present: "
            f"{summary['cells']['by_state']}). Check perturb.cell_type and the states."
        )
        raise ValueError(msg)

    # Centroids of the goal and alternative states (and the start state, for reference).
    centroids: dict[str, np.ndarray] = {}
    centroid_cells: dict[str, int] = {}
    for state in dict.fromkeys(wanted_states):
        rows = np.flatnonzero((states == state) & in_type)
        rows = rows[_subset(rows.size, settings.max_state_cells, rng)]
        emb = cell_embeddings(
            None,
            dataset.select(rows.tolist()),
            emb_layer=settings.emb_layer,
            batch_size=settings.batch_size,
            special_tokens=special_tokens,
            encoder=encoder,
        )
        centroids[state] = emb.astype(np.float64).mean(axis=0)
        centroid_cells[state] = int(rows.size)
    summary["centroid_cells"] = centroid_cells
    summary["centroid_cosines"] = {
        f"{a}~{b}": float(cosine(centroids[a], centroids[b]))
        for i, a in enumerate(centroids)
        for b in list(centroids)[i + 1 :]
    }

    start_rows = np.flatnonzero((states == settings.start_state) & in_type)
    start_rows = start_rows[_subset(start_rows.size, settings.max_cells, rng)]
    cells = list(dataset.select(start_rows.tolist()).with_format("numpy")["input_ids"])
    expressed = genes_to_perturb(cells, min_cells=1, special_tokens=special_tokens)
    genes = genes_to_perturb(cells, min_cells=settings.min_cells, special_tokens=special_tokens)
    summary["cells"]["perturbed"] = len(cells)
    summary["genes"] = {
        "expressed_in_perturbed_cells": int(expressed.size),
        "below_min_cells": int(expressed.size - genes.size),
        "perturbed": int(genes.size),
    }
    shift_centroids = {
        s: centroids[s] for s in (settings.goal_state, *settings.alt_states, settings.start_state)
    }
    tables: dict[str, pd.DataFrame] = {}
    summary["runs"] = {}
    for perturb_type in settings.types:
        result = run_state_perturbation(
            encoder,
            cells,
            genes,
            shift_centroids,
            goal_state=settings.goal_state,
            start_state=settings.start_state,
            rank_by=settings.rank_by,
            perturb_type=perturb_type,
            layer_index=layer_index,
            special_tokens=special_tokens,
            max_tokens=settings.max_tokens,
            pad_token_id=pad_token_id,
            precision=settings.precision,
            null_size=settings.null_size,
            seed=seed,
            progress=progress,
        )
        table = annotate_table(
            result.table,
            annotation,
            fdr=settings.fdr,
            fdr_column="fdr" if settings.rank_by == "goal" else f"{NET}_fdr",
        )
        tables[perturb_type] = table
        engine = result.engine
        summary["runs"][perturb_type] = {
            "perturbations": engine.perturbations,
            "forward_passes": engine.forward_passes,
            "genes_tested": len(table),
            # Overexpression skips a gene already at the front (its shift would be 0).
            "skipped_already_first": _already_first(cells, genes, special_tokens=special_tokens)
            if perturb_type == "overexpress"
            else 0,
            "significant": int(table["significant"].sum()),
            "top_genes": table["symbol"].head(10).tolist(),
        }
        logger.info(
            "%s: %d perturbations in %.1f s (%.1f/s); %d of %d genes significant at FDR %.2g",
            perturb_type,
            engine.perturbations,
            engine.seconds,
            engine.rate,
            int(table["significant"].sum()),
            len(table),
            settings.fdr,
        )
    return tables, summary


def _already_first(cells: Sequence[np.ndarray], genes: np.ndarray, *, special_tokens: bool) -> int:
    front = 1 if special_tokens else 0
    return int(sum(len(c) > front and np.isin(c[front], genes) for c in cells))


def annotate_table(
    table: pd.DataFrame, annotation: pd.DataFrame, *, fdr: float, fdr_column: str = "fdr"
) -> pd.DataFrame:
    """Add rank, Ensembl id, symbol and significance (``fdr_column`` below ``fdr``) to a
    :func:`perturbation_table`."""
    out = table.copy()
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out.insert(1, "gene", annotation["ensembl_id"].reindex(out.index).fillna("").to_numpy())
    out.insert(2, "symbol", annotation["symbol"].reindex(out.index).fillna("").to_numpy())
    out["significant"] = out[fdr_column] < fdr
    out.index.name = "token"
    return out.reset_index()


def plot_top_genes(
    table: pd.DataFrame, *, top_n: int, goal_state: str, title: str, column: str = "mean_shift"
) -> Any:
    """Bar chart of the top genes of the table by ``column`` (the shift it is ranked by).

    Bars of genes significant at the FDR threshold are filled, others hatched.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = table.head(top_n).iloc[::-1]
    labels = [s or g for s, g in zip(top["symbol"], top["gene"], strict=True)]
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(top) + 1.4))
    colors = ["#1f77b4" if s else "#c7c7c7" for s in top["significant"]]
    ax.barh(labels, top[column], color=colors, edgecolor="#333333", linewidth=0.4)
    ax.axvline(0.0, color="#333333", linewidth=0.6)
    what = "net shift towards" if column.startswith(NET) else "shift towards"
    ax.set_xlabel(f"mean {what} {goal_state} (cosine to centroid, perturbed - original)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(facecolor="#1f77b4", label="significant (BH FDR)"),
            Patch(facecolor="#c7c7c7", label="not significant"),
        ],
        fontsize=7,
        loc="lower right",
    )
    fig.tight_layout()
    return fig
