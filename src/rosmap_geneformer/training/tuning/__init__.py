"""Hyperparameter search for fine-tuning, with optuna, on the patient-level ``val`` split only.

Geneformer tunes with Ray on a cell-level split whose eval set is its test set (spec section 5), so
its scores leak. Here a study trains on ``train``, scores every epoch on ``val`` (macro-F1, or
patient-level AUROC for a patient-level task: the task's early-stopping metric) and never sees
``test``.

Modules
-------
- :mod:`~rosmap_geneformer.training.tuning.space`: the search space and the ``params.yaml: tune``
  settings, checked before any training.
- :mod:`~rosmap_geneformer.training.tuning.search`: the study and its trials (storage, sampler,
  pruner, trial slots shared by workers, the objective).
- :mod:`~rosmap_geneformer.training.tuning.outputs`: the files a finished study writes, and
  ``best_params.yaml`` back into ``params.yaml``.

The package imports none of its modules: import the one you use.

Design
------
- The search space is ``params.yaml: tune.space``; it covers Geneformer's space (learning rate
  log-uniform, warm-up, weight decay, scheduler, epochs, batch size) plus ``freeze_layers``. The
  other fine-tuning settings (``train.eval_batch_size``, ``class_weights``,
  ``early_stopping_patience``, ``gradient_accumulation_steps``) are fixed from ``train``, so a
  tuned value promoted into ``train`` does not invalidate the study.
- Each trial is a :func:`rosmap_geneformer.training.finetune.build_trainer` run, the very code path of the
  ``train`` stage, with the pipeline ``seed``: the same hyperparameters give the same model, so the
  best trial's val metric is what ``train`` reproduces with the tuned values. (Geneformer searches
  over the seed too; that confounds hyperparameters with initialisation noise.)
- Sampler: TPE seeded with ``seed`` (``constant_liar`` for parallel workers). Pruner: median
  pruner, fed the val metric after every epoch by :class:`~.search.PruningCallback`, at
  step = epoch so that trials with different batch sizes compare.
- Budget: the main process enqueues ``tune.n_trials`` trial slots in the study; the main process and
  any ``--worker`` pop slots atomically from the storage until none are left, so the study ends with
  exactly ``n_trials`` trials however many workers join. Storage is a journal file by default
  (resumable: it lives under ``paths.checkpoints``, which is no DVC output) or any database URL for
  workers on many machines.

Why not ``Trainer.hyperparameter_search(backend="optuna")`` (transformers 5.23)? It reuses one
``Trainer`` across trials, and ``EarlyStoppingCallback`` keeps its patience counter between them;
it reports to the pruner at step = global step, so the median pruner never compares trials with
different batch sizes (it compares values at equal steps only); its objective is the last epoch's
metric, not the best epoch that ``train`` keeps; and it passes no callbacks to
``Study.optimize``, so there is no shared budget across workers.
"""
