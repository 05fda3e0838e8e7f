"""Cell- and patient-level metrics, bootstrap intervals and plots for a classifier's predictions.

Model-agnostic: everything here works on class probabilities, true class ids and patient ids, so the
fine-tuned Geneformer (``evaluate``) and the baselines (``baseline``) are scored by the same code.

Modules
-------
- :mod:`~rosmap_geneformer.analysis.evaluation.common`: what both levels share: input checks,
  confusion-matrix scores, ROC and AUROC, bootstrap resampling and intervals.
- :mod:`~rosmap_geneformer.analysis.evaluation.cell_level`: cell level (cell metrics, clustered
  bootstrap).
- :mod:`~rosmap_geneformer.analysis.evaluation.patient_level`: patient (donor) level of a binary
  task (one row per patient, patient metrics, bootstrap within class).
- :mod:`~rosmap_geneformer.analysis.evaluation.evaluate`: one call that scores a model's test-set
  predictions (:class:`~rosmap_geneformer.analysis.evaluation.evaluate.Evaluation`) and writes its
  files.
- :mod:`~rosmap_geneformer.analysis.evaluation.plots`: figures and dvclive plots.

The package imports none of its modules: import the one you use.

Conventions
-----------
- ``classes`` lists the class names in id order: class id ``i`` is ``classes[i]``.
- A cell's predicted class is the argmax of its probabilities (ties go to the lower id), as in
  Geneformer's ``get_metrics``.
- Binary tasks: the positive class is ``classes[1]`` (for the disease task the label ids must put
  ``"AD"`` at 1). ROC AUC uses P(positive) = ``probabilities[:, 1]``.
- Patient level (disease task): a patient's score is the mean P(positive) over their cells (the
  Geneformer-style aggregation); the patient is called positive when that mean is
  ``>= threshold`` (the same ``>=`` rule as :func:`sklearn.metrics.roc_curve`).
- Macro-F1 averages over the classes present in the truth or the predictions (scikit-learn's
  default and Geneformer's); balanced accuracy is the mean recall over the classes present in the
  truth (scikit-learn's). Per-class values that are undefined (no support, no predictions) are
  ``None``, never a silent 0.

Bootstrap
---------
Percentile intervals. Patients, not cells, are the independent units, so:

- patient metrics resample patients with replacement *within each class* (stratified). Every
  resample then holds both classes, so AUROC is always defined, and the class balance of the test
  set is kept fixed, as in a case-control design (pROC's ``ci.auc(stratified=TRUE)`` default).
- cell metrics use a *clustered* bootstrap: resample patients with replacement and take all their
  cells. Cells of one donor share genotype, pathology, dissection and library, so resampling cells
  as if independent would give intervals that are far too narrow. For the disease task (a donor
  has one label) the patient resampling is stratified by label as well.
"""
