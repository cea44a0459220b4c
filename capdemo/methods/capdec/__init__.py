"""CapDec (EMNLP Findings 2022): model and config in ``model``, batched inference and its options in ``inference``."""
