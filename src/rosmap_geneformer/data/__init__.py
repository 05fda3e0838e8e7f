"""Data preparation: the demo generator, gene mapping, the donor split, QC, metadata and sampling.

Reads raw files and the one count matrix, writes cell tables. Imports only the base modules
(``params``, ``io``, ``counts``, ``parallel``, ``logs``); never ``geneformer``, ``training`` or
``analysis``.
"""
