"""The in silico perturbation engine: batched forward passes of perturbed cells.

The perturbed encodings (delete, overexpress) are built by
:mod:`~rosmap_geneformer.analysis.perturbation.encodings`.

Shifts measured here:

- cell mode: ``cos(perturbed, original)`` of the cell embeddings: the mean over the genes (V1),
  or the ``<cls>`` vector when the cells carry it (V2, Geneformer's ``emb_mode="cls"``;
  :func:`rosmap_geneformer.analysis.embeddings.pool_cells`);
- gene mode: for each remaining gene, ``cos`` between its embedding in the perturbed cell and in
  the original cell, positions aligned after the removal (or the move).

Shifts towards cell states and their statistics are in
:mod:`rosmap_geneformer.analysis.perturbation.statistics`.

Speed: every perturbation is a full forward pass (a deletion changes every position's attention),
but all perturbations of a cell have the same length, so they run together without padding;
cells are taken longest first; layers after the one read are not run
(:mod:`rosmap_geneformer.analysis.embeddings`); the language-model or classification head is never run;
the perturbed encodings are built with array indexing, not per-token Python. ``max_tokens``
bounds the tokens of one forward pass and so the memory. :func:`naive_cell_shifts` is the
one-forward-per-perturbation reference the tests compare against.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import BertModel

from rosmap_geneformer import distributed
from rosmap_geneformer.analysis.embeddings import hidden_states, pool_cells
from rosmap_geneformer.analysis.perturbation.encodings import (
    check_type,
    delete_tokens,
    overexpress_tokens,
    perturbation_batch,
)
from rosmap_geneformer.errors import InputError

# Tokens per forward pass; bounds the activations held at once (about 4 x hidden x intermediate
# bytes per token for a BERT layer).
DEFAULT_MAX_TOKENS = 16_384


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
    processes: distributed.Processes | None = None,
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
        V2 layout: the cell embedding is the ``<cls>`` vector, and ``<cls>``/``<eos>`` are left
        out of the gene comparisons.
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
    processes
        Under a launcher (:func:`rosmap_geneformer.distributed.start`): the chunks of cells are
        shared out round-robin and every process gets every result in the one-process order,
        the same bytes (same batches); the counters are summed over processes.

    Yields
    ------
    One :class:`CellPerturbations` per cell with at least one perturbation, longest cell first.
    """
    check_type(perturb_type)
    if len(cells) != len(positions):
        msg = f"{len(cells)} cells but {len(positions)} position lists."
        raise InputError(msg)
    device = _encoder_device(encoder)
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
    counts = np.fromiter((len(p) for p in positions), dtype=np.int64, count=len(cells))
    order = [int(i) for i in np.argsort(-lengths, kind="stable") if counts[i] > 0]
    total = int(counts[order].sum()) if order else 0
    engine_stats = engine_stats if engine_stats is not None else EngineStats()
    start_time = time.perf_counter()
    # A chunk holds enough perturbations for a few full forward passes, so that short cells share
    # batches, while the originals' gene embeddings held for gene mode stay bounded.
    costs = [int(counts[i] * lengths[i]) for i in order]
    chunks = list(_chunks(order, costs, budget=4 * max_tokens))
    processes = processes or distributed.Processes()
    if processes.world_size > 1:
        total = sum(
            int(counts[chunk].sum())
            for k, chunk in enumerate(chunks)
            if k % processes.world_size == processes.rank
        )
    bar = tqdm(total=total, desc=f"perturb ({perturb_type})", unit="pert", disable=not progress)
    counters = ("cells", "perturbations", "forward_passes", "tokens")
    before = [getattr(engine_stats, name) for name in counters]

    def run(chunk: list[int]) -> Iterator[CellPerturbations]:
        return _run_chunk(
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

    try:
        if processes.world_size == 1:
            for chunk in chunks:
                yield from run(chunk)
        else:
            shared = distributed.ordered_across_processes(
                chunks, lambda chunk: list(run(chunk)), processes
            )
            for results in shared:
                yield from results
            mine = [
                getattr(engine_stats, name) - b for name, b in zip(counters, before, strict=True)
            ]
            summed = distributed.sum_over_processes(mine, processes)
            for name, b, value in zip(counters, before, summed, strict=True):
                setattr(engine_stats, name, b + int(value))
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
        """Hidden states of ``rows`` and their cell embeddings."""
        states, lengths = _forward(
            encoder,
            rows,
            layer_index=layer_index,
            pad_token_id=pad_token_id,
            precision=precision,
            device=device,
            engine_stats=engine_stats,
        )
        pooled = pool_cells(states, lengths, special_tokens=special_tokens)
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
        return pool_cells(states, length, special_tokens=special_tokens)[0]

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
