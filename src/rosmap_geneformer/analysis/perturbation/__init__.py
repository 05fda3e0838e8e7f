"""In silico perturbation with Geneformer's semantics (``geneformer-spec.md`` section 7).

- :mod:`rosmap_geneformer.analysis.perturbation.encodings`: the perturbed encodings (deletion,
  overexpression) of a cell's tokens.
- :mod:`rosmap_geneformer.analysis.perturbation.engine`: the batched forward passes that embed
  them; one place for its speed.
- :mod:`rosmap_geneformer.analysis.perturbation.statistics`: shifts towards cell states, rank-sum
  tests against the pooled null, Benjamini-Hochberg FDR, the ranked per-gene table.
- :mod:`rosmap_geneformer.analysis.perturbation.estimate`: the fast first pass of deletion (a grid
  of exact deletions, a first-order part, interpolation) and its exact confirmation
  (``perturb.screen``).
- :mod:`rosmap_geneformer.analysis.perturbation.screen`: the ``perturb`` stage's screen: settings,
  cells and genes chosen, perturbed and tested.
- :mod:`rosmap_geneformer.analysis.perturbation.annotation`: the ranked tables' gene names
  (also for ``grn``), significance and top-genes plot.

Network inference by deletion (:mod:`rosmap_geneformer.analysis.grn`) runs the same engine.
"""
