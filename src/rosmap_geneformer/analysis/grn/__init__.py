"""Gene regulatory network inference and its evaluation against the field's baselines.

- :mod:`rosmap_geneformer.analysis.grn.inference`: edges by deleting each regulator in the cells
  that express it (the perturbation engine in Geneformer's gene mode).
- :mod:`rosmap_geneformer.analysis.grn.attention`: edges read from the same model's attention
  (geneRNIB's mean over layers and heads, scGPT's per-layer ranks).
- :mod:`rosmap_geneformer.analysis.grn.baselines`: co-expression, GRNBoost2, GENIE3 and random
  scores on the same cells and edges.
- :mod:`rosmap_geneformer.analysis.grn.scoring`: truth networks (the demo's, the OmniPath
  snapshot), TF lists and the metrics (AUPRC, EPR, precision at k, bootstrap over regulators).
- :mod:`rosmap_geneformer.analysis.grn.network`: the outputs: strongest edges, the graph, GraphML
  and the plots.
- :mod:`rosmap_geneformer.analysis.grn.settings`: ``params.yaml: grn``, checked.
- :mod:`rosmap_geneformer.analysis.grn.regulators`: regulator names resolved to tokens and
  checked against the cells that express them.
- :mod:`rosmap_geneformer.analysis.grn.stage`: the ``grn`` stage's computation.
- :mod:`rosmap_geneformer.analysis.grn.tables`: the stage's headline metrics and method x metric table.
"""
