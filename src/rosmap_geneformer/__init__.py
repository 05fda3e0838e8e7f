"""rosmap-geneformer."""
