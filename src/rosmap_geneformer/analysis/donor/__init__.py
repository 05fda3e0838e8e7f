"""Donor-level AD classification: every method on the same donors and folds (stage ``donor``).

AD status belongs to a donor, so the methods here score donors, not cells, and are compared the
way the field compares them (scAGG, 2025): cross-validation grouped by donor, a held-out test
set, intervals over donors and paired tests.

Modules
-------
- :mod:`~rosmap_geneformer.analysis.donor.features`: what the methods read: pseudobulk counts per
  donor and per donor x cell type (streamed from the one count matrix), cell-type proportions,
  and cell embeddings and fine-tuned P(AD) from the models.
- :mod:`~rosmap_geneformer.analysis.donor.methods`: the donor classifiers (penalised logistic
  regressions in scikit-learn pipelines, a cell-level classifier averaged per donor, the
  fine-tuned model's own scores).
- :mod:`~rosmap_geneformer.analysis.donor.mil`: gated-attention multiple-instance learning over
  cell embeddings (``torchmil``'s ABMIL and trainer), with per-cell attention.
- :mod:`~rosmap_geneformer.analysis.donor.crossval`: the folds, out-of-fold scores, thresholds,
  metrics with intervals and the paired comparison with pseudobulk.
- :mod:`~rosmap_geneformer.analysis.donor.plots`: ROC curves, donor scores, attention.
- :mod:`~rosmap_geneformer.analysis.donor.run`: the stage's one call and its files.

The package imports none of its modules: import the one you use.
"""
