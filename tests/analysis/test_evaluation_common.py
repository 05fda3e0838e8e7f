from __future__ import annotations

import numpy as np
from evaluation_data import patients_frame

from rosmap_geneformer.analysis.evaluation.common import stratified_counts
from rosmap_geneformer.analysis.evaluation.patient_level import bootstrap_patient_ci


def test_stratified_resamples_keep_both_classes_at_their_sizes() -> None:
    strata = np.array([0, 1, 0, 0, 1, 0, 0])
    counts = stratified_counts(np.random.default_rng(0), strata, 500)
    assert counts.shape == (500, len(strata))
    assert (counts[:, strata == 0].sum(axis=1) == 5).all()
    assert (counts[:, strata == 1].sum(axis=1) == 2).all()
    # The resamples do vary: some patients are drawn twice, some not at all.
    assert (counts == 0).any() and (counts >= 2).any()
    # With one patient per class every resample still holds both: AUROC stays defined.
    tiny = bootstrap_patient_ci(patients_frame([0, 1], [0.2, 0.8]), n_boot=100, seed=0)
    assert (tiny["auroc"]["ci_low"], tiny["auroc"]["ci_high"]) == (1.0, 1.0)
