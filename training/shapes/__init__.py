"""The shapes world: a procedural stand-in for COCO, small enough to train and evaluate on a CPU."""
