"""TOMCap (CVPR 2026): model and config in ``model``, batched inference and its options in ``inference``."""
