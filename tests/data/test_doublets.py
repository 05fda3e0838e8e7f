"""Tests for rosmap_geneformer.data.doublets: the automatic doublet-score threshold."""

from __future__ import annotations

import numpy as np

from rosmap_geneformer.data import doublets


def test_threshold_rules() -> None:
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(0.05, 0.01, 2000), rng.normal(0.4, 0.05, 1000)])
    thr = doublets.threshold_minimum(bimodal)
    assert 0.08 < thr < 0.3
    assert 0.08 < doublets.threshold_otsu(bimodal) < 0.3
    assert doublets.threshold_minimum(np.full(10, 0.2)) is None
    obs = rng.normal(0.05, 0.01, 1000)
    assert doublets.choose_doublet_threshold(bimodal, obs, max_fraction=0.09) == (thr, "minimum")
    # A threshold inside the singlet mode would call half the cells: the cap raises it.
    low_obs = rng.uniform(0, 1, 1000)
    capped, rule = doublets.choose_doublet_threshold(bimodal, low_obs, max_fraction=0.09)
    assert rule == "minimum+capped" and (low_obs > capped).mean() <= 0.09
    assert doublets.choose_doublet_threshold(bimodal, obs, max_fraction=0.09, threshold=0.3) == (
        0.3,
        "fixed",
    )
    assert doublets.choose_doublet_threshold(np.full(5, 0.1), obs, max_fraction=0.09) == (
        1.0,
        "none",
    )
