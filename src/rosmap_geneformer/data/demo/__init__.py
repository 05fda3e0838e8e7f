"""The demo data set: a synthetic ROSMAP-like snRNA-seq data set with a known truth.

:func:`rosmap_geneformer.data.demo.dataset.generate_demo` simulates donors, libraries and nuclei
of the prefrontal cortex and returns them in the layout of the ROSMAP release (a raw-count
``.h5ad`` with gene symbols, donor metadata, a library -> donor map and a cell annotation that,
like ROSMAP's, covers only cells that pass QC);
:func:`rosmap_geneformer.data.demo.dataset.write_demo` writes them, together with a ``truth/``
folder the pipeline never reads: which cells are doublets or low quality, what each feature name
maps to, which genes carry the AD signal and which TF -> target programs were planted.

Modules, bottom up:

- :mod:`~rosmap_geneformer.data.demo.genes`: which real Ensembl genes the demo carries, their roles
  (markers, TFs and targets, AD genes) and the hard-to-map feature names;
- :mod:`~rosmap_geneformer.data.demo.simulation`: cell types, donors and the expression model that
  turns them into counts;
- :mod:`~rosmap_geneformer.data.demo.dataset`: the ``DemoData`` it returns, generating it from
  ``params.yaml: demo`` and writing it in the ROSMAP file layout.

Everything is drawn from one ``numpy.random.default_rng(seed)`` in a fixed order, so the same
arguments give the same files byte for byte.
"""
