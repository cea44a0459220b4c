"""capdemo: text-only image captioning (MacCap, TOMCap) you can see into.

The torchvision compatibility shim is imported first, before anything can import
open_clip, timm, transformers or peft (see ``_torchvision_compat``).
"""

import os

# Idle OpenMP threads sleep instead of spinning. Measured here on 2 shared cores: training the shapes CLIP ran at
# 0.35 steps/s with the default (spinning) policy and 1.3 steps/s with PASSIVE. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from capdemo import _torchvision_compat  # noqa: F401  (before open_clip, timm, transformers, peft)

__version__ = "0.1.0"
