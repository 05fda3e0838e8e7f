"""Fine-tuning Geneformer-style BERT models for cell classification: the ``Trainer`` run.

Matches the semantics of Geneformer's ``Classifier`` (spec section 5) and fixes its known flaws:
the class-to-id mapping is the sorted class list (not ``set()`` order) and is saved with the model;
rare classes are filtered, with counts; the ``disease`` task stops early on patient-level
validation AUROC, because AD status is a donor property.

Owns the hyperparameters, the ``Trainer`` (collator, class weights, frozen layers, metrics), the
resumable checkpoints, the saved model with its label mapping, and prediction. The task's cells,
classes and ids come from :mod:`rosmap_geneformer.training.tasks`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm
from transformers import (
    BertForSequenceClassification,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import SchedulerType

from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.geneformer.model import select_device
from rosmap_geneformer.training.tasks import (
    PreparedTask,
    TaskSpec,
    check_task_metric,
    patient_auroc,
    prepare_task,
)
from rosmap_geneformer.training.trainer import GeneformerTrainer, LiveCallback, is_wall_clock

logger = logging.getLogger(__name__)

LABEL_MAPPING_FILE = "label_mapping.json"
FINGERPRINT_FILE = "fingerprint.json"
SCHEDULERS = tuple(s.value for s in SchedulerType)


class ClassificationCollator:
    """Pad ``input_ids`` on the right to the longest cell of the batch; add the attention mask.

    Other keys (``length``, ids) are dropped; ``labels`` become int64, as in Geneformer's
    ``DataCollatorForCellClassification``.
    """

    def __init__(self, *, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(np.asarray(feature["input_ids"], dtype=np.int64))
            input_ids[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if "label" in features[0]:
            batch["labels"] = torch.tensor([int(f["label"]) for f in features], dtype=torch.long)
        return batch


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (k * count_c)`` (scikit-learn's "balanced")."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(float)
    weights = len(labels) / (n_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def freeze_layers(model: BertForSequenceClassification, n_layers: int) -> None:
    """Freeze the first ``n_layers`` encoder layers (embeddings stay trainable, as in Geneformer)."""
    layers = model.bert.encoder.layer
    if not 0 <= n_layers <= len(layers):
        msg = (
            f"params.yaml: train.freeze_layers={n_layers}, but the model has {len(layers)} layers."
        )
        raise InputError(msg)
    for layer in layers[:n_layers]:
        for parameter in layer.parameters():
            parameter.requires_grad = False


class CellTrainer(GeneformerTrainer):
    """``Trainer`` with an optional class-weighted loss, evaluating in dataset order (so that
    patient-level metrics can line predictions up with patients)."""

    def __init__(self, *args: Any, loss_weights: torch.Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_weights = loss_weights

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.loss_weights is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        weight = self.loss_weights.to(device=outputs.logits.device, dtype=outputs.logits.dtype)
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels, weight=weight)
        return (loss, outputs) if return_outputs else loss


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def make_compute_metrics(*, patient_ids: Sequence[str] | None, n_classes: int) -> Any:
    """``compute_metrics`` for ``Trainer``: accuracy, macro-F1 and, for binary tasks with
    patient ids, patient-level AUROC on the mean P(class 1) per patient."""

    def compute_metrics(prediction: Any) -> dict[str, float]:
        logits = (
            prediction.predictions[0]
            if isinstance(prediction.predictions, tuple)
            else prediction.predictions
        )
        labels = np.asarray(prediction.label_ids)
        predicted = logits.argmax(axis=1)
        metrics = {
            "accuracy": float(accuracy_score(labels, predicted)),
            "macro_f1": float(
                f1_score(
                    labels,
                    predicted,
                    average="macro",
                    labels=list(range(n_classes)),
                    zero_division=0,
                )
            ),
        }
        if n_classes == 2 and patient_ids is not None:
            metrics["patient_auroc"] = patient_auroc(patient_ids, labels, softmax(logits)[:, 1])
        return metrics

    return compute_metrics


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A stable hash of what a run depends on (params, data and base-model hashes)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def prepare_checkpoint_dir(path: Path, digest: str) -> bool:
    """Make ``path`` hold checkpoints of this exact run; True when there is one to resume.

    Checkpoints of a run with other params or data are removed rather than resumed.
    """
    marker = path / FINGERPRINT_FILE
    if path.exists():
        same = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == digest
        if same and any(path.glob("checkpoint-*")):
            logger.info("resuming from the checkpoints in %s", path)
            return True
        shutil.rmtree(path)
    path.mkdir(parents=True)
    marker.write_text(json.dumps({"fingerprint": digest}) + "\n")
    return False


def directory_digest(path: str | Path) -> str:
    """sha256 over the relative names and bytes of every file below ``path`` (or of one file)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(path.parent if path.is_file() else path).as_posix().encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(kw_only=True)
class Hyperparameters:
    """Fine-tuning settings (``params.yaml: train``); Geneformer's defaults where it has them."""

    learning_rate: float = 5e-5
    epochs: int = 10
    batch_size: int = 12
    eval_batch_size: int = 32
    warmup_ratio: float = 0.0
    weight_decay: float = 0.001
    lr_scheduler_type: str = "linear"
    freeze_layers: int = 0
    class_weights: bool = True
    early_stopping_patience: int = 2
    gradient_accumulation_steps: int = 1

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> Hyperparameters:
        """Build from ``params.yaml: train``, refusing unknown keys and bad values."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            msg = f"params.yaml: train has unknown key(s) {unknown}; known: {sorted(known)}."
            raise InputError(msg)
        hyper = cls(**values)
        checks = {
            "learning_rate": hyper.learning_rate > 0,
            "epochs": hyper.epochs >= 1,
            "batch_size": hyper.batch_size >= 1,
            "eval_batch_size": hyper.eval_batch_size >= 1,
            "warmup_ratio": 0 <= hyper.warmup_ratio < 1,
            "weight_decay": hyper.weight_decay >= 0,
            "freeze_layers": hyper.freeze_layers >= 0,
            "early_stopping_patience": hyper.early_stopping_patience >= 1,
            "gradient_accumulation_steps": hyper.gradient_accumulation_steps >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            msg = f"params.yaml: train.{bad[0]}={getattr(hyper, bad[0])!r} is out of range."
            raise InputError(msg)
        if hyper.lr_scheduler_type not in SCHEDULERS:
            msg = (
                f"params.yaml: train.lr_scheduler_type={hyper.lr_scheduler_type!r} is not a "
                f"transformers scheduler; use one of {list(SCHEDULERS)}."
            )
            raise InputError(msg)
        return hyper


def training_arguments(
    hyper: Hyperparameters,
    *,
    output_dir: Path,
    metric: str,
    seed: int,
    n_train: int,
    save_checkpoints: bool = True,
) -> TrainingArguments:
    """``TrainingArguments`` for one fine-tuning run: epoch-wise eval and checkpoints, best model
    by ``metric``, length-grouped batches, bf16 on CUDA and the CPU otherwise.

    With ``save_checkpoints=False`` (hyperparameter search) nothing is saved and the best model
    is not reloaded at the end; the training itself and ``state.best_metric`` are unchanged.
    """
    steps_per_epoch = max(1, n_train // (hyper.batch_size * hyper.gradient_accumulation_steps))
    return TrainingArguments(
        output_dir=str(output_dir),
        eval_strategy="epoch",
        save_strategy="epoch" if save_checkpoints else "no",
        logging_strategy="steps",
        logging_steps=max(1, steps_per_epoch // 10),
        learning_rate=hyper.learning_rate,
        num_train_epochs=hyper.epochs,
        per_device_train_batch_size=hyper.batch_size,
        per_device_eval_batch_size=hyper.eval_batch_size,
        gradient_accumulation_steps=hyper.gradient_accumulation_steps,
        warmup_steps=hyper.warmup_ratio,
        weight_decay=hyper.weight_decay,
        lr_scheduler_type=hyper.lr_scheduler_type,
        load_best_model_at_end=save_checkpoints,
        metric_for_best_model=metric,
        greater_is_better=True,
        save_total_limit=2 if save_checkpoints else None,
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        remove_unused_columns=False,
        report_to="none",
        dataloader_num_workers=0,
        **select_device().training_arguments(),
    )


def build_trainer(
    *,
    task: TaskSpec,
    prepared: PreparedTask,
    base_model: str | Path,
    hyper: Hyperparameters,
    args: TrainingArguments,
    seed: int,
    callbacks: Sequence[Any] = (),
) -> CellTrainer:
    """A :class:`CellTrainer` for one run: the classifier initialised from ``base_model`` with
    ``seed``, ``hyper.freeze_layers`` frozen, early stopping, class weights and the task's metrics.

    Used by :func:`fine_tune` and by the hyperparameter search, so that a trial and a ``train``
    run with the same hyperparameters and seed train identically.
    """
    from transformers import set_seed

    classes = prepared.classes
    # The classifier head is initialised from the torch RNG: seed it right before.
    set_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        str(base_model),
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
        attn_implementation="sdpa",
    )
    freeze_layers(model, hyper.freeze_layers)
    columns = ["input_ids", "length", "label"]
    train_ds = prepared.train.select_columns(columns)
    val_ds = prepared.val.select_columns(columns)
    return CellTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=ClassificationCollator(pad_token_id=model.config.pad_token_id or 0),
        compute_metrics=make_compute_metrics(
            patient_ids=prepared.val["patient_id"] if task.patient_level else None,
            n_classes=len(classes),
        ),
        callbacks=[
            EarlyStoppingCallback(early_stopping_patience=hyper.early_stopping_patience),
            *callbacks,
        ],
        loss_weights=class_weights(train_ds["label"], len(classes))
        if hyper.class_weights
        else None,
    )


def fine_tune(
    *,
    task: TaskSpec,
    train: datasets.Dataset,
    val: datasets.Dataset,
    base_model: str | Path,
    output_dir: str | Path,
    checkpoint_dir: str | Path,
    live_dir: str | Path | None,
    hyper: Hyperparameters,
    seed: int,
    run_fingerprint: str,
) -> dict[str, Any]:
    """Fine-tune ``BertForSequenceClassification`` from ``base_model`` on one task.

    Evaluates on ``val`` every epoch, stops early on ``task.early_stopping_metric`` and keeps
    the best epoch. Checkpoints go to ``checkpoint_dir``; a rerun of the same run (same
    ``run_fingerprint``) resumes from the last one. The best model, its label mapping and a
    summary are written atomically to ``output_dir`` by the main process.

    Returns
    -------
    The summary: task report, best metric, final val metrics (no timings), epochs run.
    """
    from dvclive import Live
    from transformers import set_seed

    set_seed(seed)
    prepared = prepare_task(train, val, task)
    classes = prepared.classes
    metric = check_task_metric(prepared, task)
    checkpoint_dir = Path(checkpoint_dir)
    args = training_arguments(
        hyper, output_dir=checkpoint_dir, metric=metric, seed=seed, n_train=len(prepared.train)
    )
    resume = (
        prepare_checkpoint_dir(checkpoint_dir, run_fingerprint)
        if args.process_index == 0
        else False
    )
    callbacks: list[Any] = []
    if live_dir is not None and args.process_index == 0:
        live = Live(str(live_dir), dvcyaml=None, report=None, save_dvc_exp=False, resume=resume)
        callbacks.append(LiveCallback(live=live, log_model=False))
    trainer = build_trainer(
        task=task,
        prepared=prepared,
        base_model=base_model,
        hyper=hyper,
        args=args,
        seed=seed,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    final = trainer.evaluate()
    summary = {
        "task": task.name,
        **prepared.report,
        "early_stopping_metric": metric,
        "best_metric": trainer.state.best_metric,
        "best_checkpoint_epoch": _best_epoch(trainer),
        "epochs_run": float(trainer.state.epoch or 0.0),
        "resumed": bool(resume),
        "val": without_wall_clock(
            {k.removeprefix("eval_"): float(v) for k, v in sorted(final.items())}
        ),
    }
    logger.info("trained %s in %.0f s", task.name, result.metrics.get("train_runtime", 0.0))
    if trainer.is_world_process_zero():
        save_model(trainer.model, output_dir, classes=classes, task=task, summary=summary)
        # The run is complete: its checkpoints would only let a later rerun "resume" at the end.
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return summary


def without_wall_clock(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` without Trainer's timings (``runtime``, ``*_per_second``,
    ``model_preparation_time``), which differ from run to run: what goes into a DVC-cached
    output must be the same bytes every time."""
    return {k: v for k, v in metrics.items() if not is_wall_clock(k)}


def _best_epoch(trainer: Trainer) -> float | None:
    best = trainer.state.best_model_checkpoint
    if best is None:
        return None
    step = int(Path(best).name.split("-")[-1])
    for entry in trainer.state.log_history:
        if entry.get("step") == step and "epoch" in entry:
            return float(entry["epoch"])
    return None


def save_model(
    model: torch.nn.Module,
    output_dir: str | Path,
    *,
    classes: Sequence[str],
    task: TaskSpec,
    summary: Mapping[str, Any],
) -> None:
    """Write the model (safetensors), its label mapping and the run summary atomically."""
    from rosmap_geneformer.io import atomic_output, write_json

    with atomic_output(output_dir) as tmp:
        model.save_pretrained(tmp)
        write_json(
            {"task": task.name, "label": task.label, "classes": list(classes)},
            tmp / LABEL_MAPPING_FILE,
        )
        write_json(summary, tmp / "train_summary.json")
    logger.info("saved the fine-tuned %s model to %s", task.name, output_dir)


def load_label_mapping(model_dir: str | Path) -> dict[str, Any]:
    """The task, label column and class list saved beside a fine-tuned model."""
    path = Path(model_dir) / LABEL_MAPPING_FILE
    if not path.is_file():
        msg = (
            f"{path}: no label mapping, so {model_dir} is not a fine-tuned model; train it first "
            f"(`dvc repro train@{Path(model_dir).name}`) or fix paths.finetuned."
        )
        raise MissingInputError(msg)
    return json.loads(path.read_text())


def predict(
    model_dir: str | Path, dataset: datasets.Dataset, *, batch_size: int = 32
) -> np.ndarray:
    """Class probabilities (cells x classes, float64) for every row of ``dataset``, in row order.

    Rows are run longest first, so batches pad little, then put back in order.
    """
    model = BertForSequenceClassification.from_pretrained(
        str(model_dir), attn_implementation="sdpa"
    )
    model.eval()
    device = torch.device(select_device().device)
    model.to(device)
    collator = ClassificationCollator(pad_token_id=model.config.pad_token_id or 0)
    order = np.argsort(-np.asarray(dataset["length"]), kind="stable")
    probabilities = np.zeros((len(dataset), model.config.num_labels), dtype=np.float64)
    subset = dataset.select_columns(["input_ids"])
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="predict", unit="batch"):
            rows = order[start : start + batch_size]
            batch = collator([subset[int(i)] for i in rows])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            probabilities[rows] = softmax(logits.float().cpu().numpy())
    return probabilities
