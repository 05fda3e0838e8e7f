"""Training: pretraining, fine-tuning on a task and the hyperparameter search.

Imports the base modules and ``geneformer``; never ``analysis``.
"""
