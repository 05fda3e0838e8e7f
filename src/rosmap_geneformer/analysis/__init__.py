"""Analysis of data and models: evaluation, baselines, embeddings, perturbation, networks, report.

The top layer of the library: may import every other part; no other part imports it.
"""
