"""What pretraining and fine-tuning share around transformers' ``Trainer``.

:class:`GeneformerTrainer` evaluates in dataset order. :class:`LiveCallback` logs to dvclive
without Trainer's wall-clock timings (:func:`is_wall_clock`), so that the logs are the same bytes
on every run; :func:`live_output`, :func:`open_live` and :func:`live_callbacks` set up a dvclive
folder that is written atomically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer
from transformers.integrations import DVCLiveCallback

from rosmap_geneformer.io import atomic_output

# --------------------------------------------------------------------------------------------
# Trainer


class GeneformerTrainer(Trainer):
    """``Trainer`` that evaluates in dataset order.

    With ``train_sampling_strategy="group_by_length"`` the stock ``Trainer`` also groups (and
    shuffles) the evaluation set by length; a sequential sampler keeps predictions in row order.
    """

    def _get_eval_sampler(self, eval_dataset: Any) -> torch.utils.data.Sampler | None:
        # Several processes: accelerate shards the rows in order and gathers them back in order.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


# --------------------------------------------------------------------------------------------
# dvclive


@contextlib.contextmanager
def live_output(path: Path | None) -> Iterator[Path | None]:
    """``atomic_output`` for the dvclive folder, or nothing when there is none."""
    if path is None:
        yield None
        return
    with atomic_output(path) as tmp:
        yield tmp


def open_live(path: Path) -> Any:
    """A ``dvclive.Live`` logging into ``path``."""
    from dvclive import Live

    # No dvc.yaml (dvc.yaml declares the metrics), no report, and no experiment commit when the
    # script runs outside `dvc exp run`.
    return Live(str(path), dvcyaml=None, report=None, save_dvc_exp=False)


def is_wall_clock(key: str) -> bool:
    """Whether a Trainer metric is a timing (``train_runtime``, ``eval_samples_per_second``,
    ``eval_model_preparation_time``, ...). Timings differ from run to run, so they stay out of
    every pipeline output: the same params must give the same bytes (Trainer still prints them)."""
    name = key.removeprefix("eval_").removeprefix("train_")
    return name in ("runtime", "model_preparation_time") or name.endswith("_per_second")


class LiveCallback(DVCLiveCallback):
    """transformers' ``DVCLiveCallback`` without Trainer's timings (:func:`is_wall_clock`), so
    that the dvclive logs, and what is drawn from them, are the same bytes on every run."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        logs = {k: v for k, v in (logs or {}).items() if not is_wall_clock(k)}
        super().on_log(args, state, control, logs=logs, **kwargs)


def live_callbacks(path: Path | None) -> list[Any]:
    """Trainer callbacks logging to dvclive in ``path``; none when ``path`` is ``None``."""
    if path is None:
        return []
    return [LiveCallback(live=open_live(path), log_model=False)]


__all__ = [
    "GeneformerTrainer",
    "LiveCallback",
    "is_wall_clock",
    "live_callbacks",
    "live_output",
    "open_live",
]
