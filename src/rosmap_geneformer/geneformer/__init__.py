"""What is shared with Geneformer's formats: dictionaries, the rank-value tokenizer, the model.

Imports the base modules only; never ``training`` or ``analysis``.
"""
