"""capdemo: text-only image captioning (MacCap, TOMCap) you can see into.

The torchvision compatibility shim is imported first, before anything can import
open_clip, timm, transformers or peft (see ``_torchvision_compat``).
"""

from capdemo import _torchvision_compat  # noqa: F401  (must stay the first import)

__version__ = "0.1.0"
