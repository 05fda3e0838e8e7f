"""Gene regulatory network edges read from a model's attention, as the field's benchmarks do.

Two unsupervised recipes, both read from the same model and cells as the deletion of
:mod:`rosmap_geneformer.analysis.grn.inference`, with the regulator as the key (attended to) and
the target as the query (attending), as scPRINT reads them:

- ``attention_mean``: Geneformer's network as geneRNIB builds it. Per cell, the attention
  probabilities averaged over all layers and heads; per gene pair, summed over the cells where
  both genes occur and divided by the number of those cells.
- ``attention_layer``: scGPT's recipe on one layer (the last by default): the raw scores
  ``Q K^T`` (no scaling, no softmax), rank-normalised along rows and then along columns, averaged
  over heads; per gene pair, the mean over the cells where both occur.

Queries and keys are read by hooks on each layer's ``query`` and ``key`` projections, so the
recipes do not depend on the attention implementation the model was loaded with (``sdpa``
returns no attention weights).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import BertModel

from rosmap_geneformer import distributed
from rosmap_geneformer.analysis.perturbation.encodings import gene_slice

logger = logging.getLogger(__name__)

ATTENTION_METHODS = ("attention_mean", "attention_layer")


@dataclass
class AttentionStats:
    """Counters of an attention read-out (the wall time goes to the log and the benchmark)."""

    cells: int = 0
    tokens: int = 0
    forward_passes: int = 0
    seconds: float = field(default=0.0, compare=False)


@contextmanager
def _queries_and_keys(encoder: BertModel) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Capture every layer's query and key projections during the forward passes inside."""
    captured: list[dict[str, torch.Tensor]] = [{} for _ in encoder.encoder.layer]
    handles = []
    for i, layer in enumerate(encoder.encoder.layer):
        for name in ("query", "key"):

            def hook(_module: Any, _inputs: Any, output: torch.Tensor, i=i, name=name) -> None:
                captured[i][name] = output.detach()

            handles.append(getattr(layer.attention.self, name).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _rank_normalise(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Ranks along ``dim`` scaled to (0, 1], ties given their average rank (as
    ``scipy.stats.rankdata``: after ranking rows, the columns hold many ties)."""
    moved = scores.movedim(dim, -1).contiguous()
    ordered = moved.sort(dim=-1).values
    below = torch.searchsorted(ordered, moved, right=False)
    up_to = torch.searchsorted(ordered, moved, right=True)
    ranks = (below + up_to + 1).to(torch.float32) / 2.0
    return (ranks / scores.shape[dim]).movedim(-1, dim)


def cell_attention(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    *,
    n_heads: int,
    layer: int,
    columns: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both recipes for one cell: every token's attention to the ``columns`` tokens.

    Parameters
    ----------
    queries, keys
        Per layer, the cell's projections (tokens x hidden), padding removed.
    n_heads
        Attention heads per layer.
    layer
        The layer of the ``attention_layer`` recipe.
    columns
        Positions of the regulators (the keys) in the cell.

    Returns
    -------
    ``attention_mean`` and ``attention_layer``, each tokens x regulators.
    """
    n_tokens, hidden = queries[0].shape
    head_dim = hidden // n_heads
    mean = torch.zeros(n_tokens, columns.numel(), dtype=torch.float32)
    for q, k in zip(queries, keys, strict=True):
        q = q.float().view(n_tokens, n_heads, head_dim).transpose(0, 1)
        k = k.float().view(n_tokens, n_heads, head_dim).transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
        mean += probs[:, :, columns].mean(dim=0)
    mean /= len(queries)
    q = queries[layer].float().view(n_tokens, n_heads, head_dim).transpose(0, 1)
    k = keys[layer].float().view(n_tokens, n_heads, head_dim).transpose(0, 1)
    ranked = _rank_normalise(_row_ranks_at(q @ k.transpose(1, 2), columns), dim=-2)
    return mean, ranked.mean(dim=0)


def _row_ranks_at(scores: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``_rank_normalise(scores, dim=-1)[..., columns]`` without ranking the other columns:
    only the regulators' columns are read, and their column ranks need only those."""
    ordered = scores.sort(dim=-1).values
    picked = scores[..., columns].contiguous()
    below = torch.searchsorted(ordered, picked, right=False)
    up_to = torch.searchsorted(ordered, picked, right=True)
    ranks = (below + up_to + 1).to(torch.float32) / 2.0
    return ranks / scores.shape[-1]


def _batches(lengths: Sequence[int], max_tokens: int) -> Iterator[list[int]]:
    """Consecutive row groups whose rows x longest row stays within the budget."""
    group: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if group and (len(group) + 1) * max(longest, n) > max_tokens:
            yield group
            group, longest = [], 0
        group.append(i)
        longest = max(longest, n)
    if group:
        yield group


def attention_edges(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    regulator_cells: Mapping[int, np.ndarray],
    edges: pd.DataFrame,
    *,
    special_tokens: bool,
    layer: int = -1,
    max_tokens: int = 16384,
    pad_token_id: int = 0,
    progress: bool = True,
    stats: AttentionStats | None = None,
    processes: distributed.Processes | None = None,
) -> pd.DataFrame:
    """Score candidate edges by attention, over each regulator's cells.

    Parameters
    ----------
    encoder
        A ``BertModel`` in eval mode.
    cells
        Token lists.
    regulator_cells
        Regulator token -> indices of its cells (the deletion's,
        :attr:`~rosmap_geneformer.analysis.grn.inference.GRNResult.cells`).
    edges
        Candidate edges (``regulator``, ``target`` tokens).
    special_tokens
        V2 layout (``<cls>``/``<eos>`` are neither regulators nor targets).
    layer
        Layer of the ``attention_layer`` recipe (Python index; -1: the last).
    max_tokens
        Tokens per forward pass (bounds memory).
    pad_token_id
        The ``<pad>`` id.
    progress
        Show a progress bar.
    stats
        Filled with counters when given.
    processes
        Under a launcher: the batches of cells are shared out and every process gets the same
        scores as one process (:func:`rosmap_geneformer.distributed.ordered_across_processes`).

    Returns
    -------
    One row per edge, in ``edges``' order: ``attention_mean``, ``attention_layer`` and
    ``attention_cells`` (cells where both genes occur; the scores are NaN where none).
    """
    import time

    stats = stats if stats is not None else AttentionStats()
    n_layers = len(encoder.encoder.layer)
    layer = range(n_layers)[layer]
    n_heads = encoder.config.num_attention_heads
    device = next(encoder.parameters()).device
    per_cell: dict[int, list[int]] = {}
    for r, members in sorted(regulator_cells.items()):
        for c in np.asarray(members).tolist():
            per_cell.setdefault(int(c), []).append(int(r))
    order = sorted(per_cell)
    vocab = 1 + max((int(np.max(cells[c])) for c in order), default=0)
    vocab = max(vocab, 1 + int(edges["target"].max()) if len(edges) else 0)
    index = {r: k for k, r in enumerate(sorted(regulator_cells))}
    sums = np.zeros((2, len(index), vocab), dtype=np.float64)
    counts = np.zeros((len(index), vocab), dtype=np.int64)
    start = time.perf_counter()
    groups = list(_batches([len(cells[c]) for c in order], max_tokens))
    bar = tqdm(total=len(groups), desc="attention", unit="batch", disable=not progress)

    def read_group(group: list[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per cell of the group: its tokens and both recipes' tokens x regulators."""
        rows = [np.asarray(cells[order[i]], dtype=np.int64) for i in group]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        out = []
        with torch.inference_mode(), _queries_and_keys(encoder) as captured:
            encoder(
                input_ids=torch.from_numpy(ids).to(device),
                attention_mask=torch.from_numpy(mask).to(device),
            )
            for i, row in enumerate(rows):
                n = len(row)
                where = {int(t): p for p, t in enumerate(row.tolist())}
                regulators = per_cell[order[group[i]]]
                columns = torch.tensor([where[r] for r in regulators], dtype=torch.long)
                mean, ranked = cell_attention(
                    [captured[j]["query"][i, :n].cpu() for j in range(n_layers)],
                    [captured[j]["key"][i, :n].cpu() for j in range(n_layers)],
                    n_heads=n_heads,
                    layer=layer,
                    columns=columns,
                )
                out.append((row, mean.numpy(), ranked.numpy()))
        return out

    results = distributed.ordered_across_processes(
        groups, read_group, processes or distributed.Processes()
    )
    for group, read in zip(groups, results, strict=True):
        stats.forward_passes += 1
        for i, (row, mean, ranked) in zip(group, read, strict=True):
            window = gene_slice(len(row), special_tokens=special_tokens)
            targets = row[window]
            for col, r in enumerate(per_cell[order[i]]):
                keep = targets != r
                k = index[r]
                rows_kept = np.arange(window.start, window.stop)[keep]
                sums[0, k, targets[keep]] += mean[rows_kept, col]
                sums[1, k, targets[keep]] += ranked[rows_kept, col]
                counts[k, targets[keep]] += 1
            stats.cells += 1
            stats.tokens += len(row)
        bar.update()
    bar.close()
    stats.seconds += time.perf_counter() - start
    reg = np.array([index[int(r)] for r in edges["regulator"]], dtype=np.int64)
    tgt = edges["target"].to_numpy(dtype=np.int64)
    n_cells = counts[reg, tgt]
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = sums[:, reg, tgt] / np.where(n_cells > 0, n_cells, np.nan)
    logger.info(
        "attention of %d cells (%d tokens) in %.1f s", stats.cells, stats.tokens, stats.seconds
    )
    return pd.DataFrame(
        {
            "attention_mean": scores[0],
            "attention_layer": scores[1],
            "attention_cells": n_cells,
        },
        index=edges.index,
    )
