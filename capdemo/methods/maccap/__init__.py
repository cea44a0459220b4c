"""MacCap (AAAI 2024): model and config in ``model``, batched inference and its options in ``inference``."""
