"""Gene regulatory network inference by in silico deletion, and its evaluation.

- :mod:`rosmap_geneformer.analysis.grn.inference`: edges by deleting each regulator in the cells
  that express it (the perturbation engine in Geneformer's gene mode).
- :mod:`rosmap_geneformer.analysis.grn.scoring`: truth networks, the random and co-expression
  baselines, and the ranking metrics (AUPR, AUROC, precision at k).
- :mod:`rosmap_geneformer.analysis.grn.network`: the outputs: strongest edges, the graph, GraphML
  and the plots.
- :mod:`rosmap_geneformer.analysis.grn.stage`: the ``grn`` stage's settings and computation.
"""
