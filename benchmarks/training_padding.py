"""Fine-tuning throughput benchmark (not a test): ``python benchmarks/training_padding.py``.

Two ways of batching cells, both measured in this run on the same seeded model, cells, batch
size and number of optimizer steps, through the project's ``training_arguments`` and
``build_trainer`` (``params.yaml: train``, one epoch; a random model of ``params.yaml:
base_model.architecture`` with ``max_position_embeddings`` = ``--max-length``, on the CPU):

- ``dynamic`` (the project's): each batch padded to its longest cell, ``group_by_length``;
- ``max_padding`` (the reference): every batch padded to ``--max-length`` (mask 0 on the
  padding), random batches.

Cells are synthetic: lognormal lengths (median ``--median-fraction`` of the maximum, ``--sigma``
on the log scale) clipped to ``[--min-length, --max-length]``, distinct genes of
``--vocab-size`` (the demo's own cells all have its full length and would pad nothing).
transformers length-sorts within mega-batches of ``min(n // (4 x batch), 50)`` batches, only 2
to 10 for a benchmark's few hundred cells, so ``--megabatch-mult`` fixes it to a real run's 50.

Each run trains ``--warmup-steps`` untimed steps, then one timed epoch of ``--steps`` batches
from the saved initial model; ``seconds`` runs from the epoch's start to its last optimizer step
(a ``TrainerCallback``), tokens are counted per batch in the collator (``real_tokens``: mask 1,
``padded_tokens``: all slots). Each method runs in its own interpreter through :mod:`harness`
(quiet-machine wait, load recorded, process-tree peak RSS), ``--repeat`` times alternating; the
run with most real tokens/s is kept. ``cpu_normalised_real_tokens_per_s`` (real tokens per CPU
second x threads) is robust to load. Results: ``reports/benchmarks/training_padding.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import harness

ROOT = harness.ROOT
METHODS = ("dynamic", "max_padding")
DEMO_VOCAB_SIZE = 2_494  # the demo's token dictionary: 2,492 genes + <pad>, <mask>
CONFIG = ("min_length", "median_fraction", "sigma", "vocab_size", "classes", "batch_size")
CONFIG += ("warmup_steps", "steps", "megabatch_mult", "threads", "seed")


def _library() -> tuple[ModuleType, ModuleType, ModuleType]:
    """The library modules this benchmark uses (the one place to update if they move)."""
    from rosmap_geneformer.geneformer import model
    from rosmap_geneformer.training import finetune, tasks

    return model, finetune, tasks


def _params() -> dict[str, Any]:
    """The project's ``params.yaml``."""
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def synthetic_cells(config: Mapping[str, Any], n_cells: int, offset: int) -> tuple[Any, Any]:
    """Cells like snRNA-seq, seeded by ``seed + offset``.

    Lengths are lognormal numbers of expressed genes clipped to ``[min(min_length, max_length),
    max_length]`` (QC's minimum, the tokenizer's truncation); each cell's ids are distinct genes
    in ``2 .. vocab_size - 1``; labels are uniform in ``0 .. classes - 1``.

    Returns
    -------
    tuple
        The ``datasets.Dataset`` (``input_ids``, ``length``, ``label``) and the int64 lengths.
    """
    import datasets
    import numpy as np

    top, seed = config["max_length"], config["seed"] + offset
    rng = np.random.default_rng(seed)
    genes = rng.lognormal(np.log(config["median_fraction"] * top), config["sigma"], n_cells)
    lengths = np.clip(np.rint(genes), min(config["min_length"], top), top).astype(np.int64)
    rng = np.random.default_rng(seed)  # a second generator of the same seed, as before
    ids = [(rng.permutation(config["vocab_size"] - 2)[:n] + 2).astype(np.int32) for n in lengths]
    labels = rng.integers(0, config["classes"], n_cells).tolist()
    cells = {"input_ids": ids, "length": lengths.tolist(), "label": labels}
    return datasets.Dataset.from_dict(cells), lengths


def _probe(inner: Callable[..., dict], *, length: int | None) -> Any:
    """The collator and ``TrainerCallback`` that pads, counts tokens and times the epoch.

    As the collator it wraps ``inner``, pads every batch on the right to ``length`` (None: not
    at all; attention mask 0 on the padding) and records ``(real tokens, padded slots)`` per
    batch in ``batches``. As the callback it marks ``wall``/``cpu`` times at the epoch's start
    (key 0) and at the end of each optimizer step (key: global step), stops counting at the
    epoch's end and skips the end-of-epoch evaluation.
    """
    import torch.nn.functional as F
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.active, self.batches = True, []
            self.wall: dict[int, float] = {}
            self.cpu: dict[int, float] = {}

        def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
            batch = inner(features)
            extra = (length or 0) - batch["input_ids"].shape[1]
            if extra > 0:  # pad id 0; mask 0, so the model attends to the real genes only
                batch["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=0)
                batch["attention_mask"] = F.pad(batch["attention_mask"], (0, extra), value=0)
            if self.active:
                mask = batch["attention_mask"]
                self.batches.append((int(mask.sum()), int(mask.numel())))
            return batch

        def _mark(self, step: int) -> None:
            self.wall[step], self.cpu[step] = time.perf_counter(), time.process_time()

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._mark(0)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._mark(state.global_step)

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.active = False
            # Runs after the default flow callback: the throughput is that of training only.
            control.should_evaluate = False

    return Probe()


def _fix_megabatch(mult: int) -> None:
    """Make ``group_by_length`` sort mega-batches of ``mult`` batches (0: transformers' rule)."""
    if mult <= 0:
        return
    import functools

    from transformers import trainer_pt_utils

    # LengthGroupedSampler.__iter__ looks the function up in its module at every epoch.
    original = trainer_pt_utils.get_length_grouped_indices
    trainer_pt_utils.get_length_grouped_indices = functools.partial(original, mega_batch_mult=mult)


def _train_epoch(
    config: Mapping[str, Any], train: Any, val: Any, *, base: Path, output_dir: Path
) -> tuple[Any, Any]:
    """Fine-tune the classifier from ``base`` for one epoch of ``train`` with one method.

    Returns
    -------
    tuple
        The probe (:func:`_probe`) and the training arguments.
    """
    _, finetune, tasks = _library()
    hyper = replace(
        finetune.Hyperparameters.from_params(_params()["train"]),
        epochs=1,
        batch_size=config["batch_size"],
    )
    args = finetune.training_arguments(
        hyper,
        output_dir=output_dir,
        metric="macro_f1",
        seed=config["seed"],
        n_train=len(train),
        save_checkpoints=False,
    )
    padded = config["method"] == "max_padding"
    if padded:
        args.train_sampling_strategy = "random"
    classes = [f"class_{i}" for i in range(config["classes"])]
    trainer = finetune.build_trainer(
        task=tasks.TaskSpec(name="benchmark", label="label"),
        prepared=tasks.PreparedTask(train=train, val=val, classes=classes),
        base_model=base,
        hyper=hyper,
        args=args,
        seed=config["seed"],
    )
    probe = _probe(trainer.data_collator, length=config["max_length"] if padded else None)
    trainer.data_collator = probe
    trainer.add_callback(probe)
    trainer.train()
    return probe, args


def worker(config: Mapping[str, Any]) -> dict[str, Any]:
    """Warm up, then train one method for one timed epoch of ``steps`` batches.

    Parameters
    ----------
    config
        ``method`` and the keys of ``CONFIG``.

    Returns
    -------
    dict
        Timings, token counts and rates of the timed epoch.
    """
    import logging

    import numpy as np
    import torch

    torch.set_num_threads(int(config["threads"]))
    import transformers
    from transformers import BertForMaskedLM

    logging.basicConfig(level="WARNING")
    transformers.logging.set_verbosity_error()
    _fix_megabatch(int(config["megabatch_mult"]))
    seed, batch, steps = config["seed"], config["batch_size"], int(config["steps"])

    # Same seeds for both methods: the same cells, labels and initial weights, each cell once.
    train, lengths = synthetic_cells(config, steps * batch, 0)
    val, _ = synthetic_cells(config, batch, 1)
    warmup, _ = synthetic_cells(config, int(config["warmup_steps"]) * batch, 2)
    with tempfile.TemporaryDirectory(prefix="training-padding-") as tmp:
        base = Path(tmp) / "base"
        torch.manual_seed(seed)
        bert_config = _library()[0].geneformer_bert_config(
            vocab_size=config["vocab_size"],
            max_position_embeddings=config["max_length"],
            pad_token_id=0,
            **_params()["base_model"]["architecture"],
        )
        BertForMaskedLM(bert_config).save_pretrained(base)
        # Untimed warm-up on other cells (thread pools, allocator, kernel selection); the timed
        # run then starts from the saved base model again.
        _train_epoch(config, warmup, val, base=base, output_dir=Path(tmp) / "warmup")
        probe, args = _train_epoch(config, train, val, base=base, output_dir=Path(tmp) / "out")

    if len(probe.batches) != steps or max(probe.wall) != steps:
        msg = f"expected {steps} batches and steps, got {len(probe.batches)}, {max(probe.wall)}"
        raise RuntimeError(msg)
    seconds, cpu_seconds = probe.wall[steps] - probe.wall[0], probe.cpu[steps] - probe.cpu[0]
    counts = np.array(probe.batches, dtype=np.int64)
    real, padded = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    threads = int(config["threads"])
    return {
        "method": config["method"],
        "max_length": config["max_length"],
        "sampling": args.train_sampling_strategy,
        "seconds": round(seconds, 3),
        "steps": steps,
        "cells": len(train),
        "real_tokens": real,
        "padded_tokens": padded,
        "real_tokens_per_s": round(real / seconds, 1),
        "padded_tokens_per_s": round(padded / seconds, 1),
        "padding_fraction": round(1 - real / padded, 4),
        "mean_padded_length": round(padded / len(train), 1),
        "cpu_seconds": round(cpu_seconds, 3),
        # Load-robust estimate of the idle-machine rate (busy-waiting threads count as work).
        "cpu_normalised_real_tokens_per_s": round(real / cpu_seconds * threads, 1),
        "threads": threads,
        "transformers": transformers.__version__,
        "data": {
            "length_min": int(lengths.min()),
            "length_median": float(np.median(lengths)),
            "length_mean": round(float(lengths.mean()), 1),
            "length_max": int(lengths.max()),
            "fraction_at_max_length": round(float(np.mean(lengths == config["max_length"])), 4),
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Run every method and maximum length, write and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--max-length", default="1024", help="maximum cell lengths, comma-separated")
    add("--min-length", type=int, default=200, help="shortest cell (genes)")
    add("--median-fraction", type=float, default=0.4, help="median length / maximum length")
    add("--sigma", type=float, default=0.5, help="sd of the log length")
    add("--vocab-size", type=int, default=DEMO_VOCAB_SIZE)
    add("--classes", type=int, default=6, help="number of labels (2-7)")
    add("--batch-size", type=int, default=16)
    add("--steps", type=int, default=40, help="timed optimizer steps")
    add("--warmup-steps", type=int, default=3, help="untimed steps first")
    add("--megabatch-mult", type=int, default=50, help="batches per length-sorted mega-batch")
    add("--threads", type=int, default=os.cpu_count() or 1)
    add("--seed", type=int, default=0)
    add("--repeat", type=int, default=3, help="runs per method (best kept)")
    add("--output", type=Path, default=ROOT / "reports/benchmarks/training_padding.json")
    harness.worker_arguments(parser)
    args = parser.parse_args(argv)
    if harness.serve_worker(args, worker):
        return
    if not 2 <= args.classes <= 7:
        parser.error("--classes must be between 2 and 7")
    if args.steps < 1 or args.warmup_steps < 1:
        parser.error("--steps and --warmup-steps must be at least 1")
    max_lengths = [int(x) for x in args.max_length.split(",")]
    if max(max_lengths) > args.vocab_size - 2:
        parser.error("--max-length exceeds the number of genes (--vocab-size - 2)")

    params = _params()
    report = harness.start_report(
        "training_padding",
        torch=True,
        note="both methods measured in this run, alternating; wall rates depend on the load "
        "recorded beside each (process.busy_cpus_before, loadavg_before); cpu_normalised rates "
        "estimate an idle machine",
        reference="max_padding: every batch padded to the maximum length, random batches",
        ratio_dynamic_over_max_padding={},
        results={},
        settings={k: getattr(args, k) for k in CONFIG}
        | {"max_lengths": max_lengths, "wait_quiet_s": args.wait_quiet},
        model={
            **params["base_model"]["architecture"],
            "vocab_size": args.vocab_size,
            "max_position_embeddings": "= max_length",
            "attn_implementation": "sdpa",
            "weights": "random (seeded)",
        },
        training={**params["train"], "batch_size": args.batch_size, "epochs": 1},
        repeats=f"best (most real tokens/s) of {args.repeat} runs per method",
    )
    for max_length in max_lengths:
        config = {k: getattr(args, k) for k in CONFIG} | {"max_length": max_length}
        configs = {f"{max_length} {m}": {**config, "method": m} for m in METHODS}
        runs = harness.alternate(
            __file__,
            configs,
            repeat=args.repeat,
            wait_quiet_s=args.wait_quiet,
            show="real_tokens_per_s",
        )
        also = ["cpu_normalised_real_tokens_per_s"]
        kept = {
            m: harness.best_of(runs[f"{max_length} {m}"], "real_tokens_per_s", also=also)
            for m in METHODS
        }
        dyn, ref = kept["dynamic"], kept["max_padding"]
        report["results"][str(max_length)] = kept
        # Same cells and steps on both sides: the seconds per step ratio is the same number.
        report["ratio_dynamic_over_max_padding"][str(max_length)] = {
            key: harness.ratio(dyn[key], ref[key])
            for key in ("real_tokens_per_s", "cpu_normalised_real_tokens_per_s")
        }
    harness.finish_report(report, args.output)
    for length, ratio in report["ratio_dynamic_over_max_padding"].items():
        print(f"max_length {length}: dynamic / max_padding, same run: {ratio}")


if __name__ == "__main__":
    main()
