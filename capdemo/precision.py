"""Serving precision: run a loaded model's arithmetic in float32, bfloat16 or int8, for inference on a CPU.

On a 2-core CPU nearly all of a caption's time is matrix products (GPT-2's
projections and its 768 x 50257 LM head; see benchmarks/README.md), so the
lever left is the precision they run at. :func:`apply_precision` converts a
loaded module tree in place, once, after loading:

* ``"fp32"``: nothing changes (the precision every model is trained and stored in).
* ``"bf16"``: every floating parameter and buffer becomes bfloat16, except, on a CPU, inside
  ``nn.MultiheadAttention`` (open_clip's CLIP towers, the MacCap adaptor), which
  stays float32 with its inputs cast up and its outputs cast back: PyTorch's CPU
  bf16 ``F.linear`` on the transposed (L, N, E) view that a ``batch_first``
  attention projects copies its weight once per position (measured 12x slower
  than float32 for CLIP's text tower at torch 2.13). PyTorch's CPU kernels
  accumulate LayerNorm, softmax and matmul sums in float32, ``generate`` turns
  each step's logits into float32 before beam scores, and capdemo casts the
  inputs it builds (prefix, ``inputs_embeds``, CLIP pixels, TOMCap's memory) to
  the dtype of the weights that read them, so nothing else has to stay float32.
  Fast only where the CPU has bf16 instructions (``avx512_bf16`` or AMX on x86,
  ``bf16`` on ARM); elsewhere the products are emulated, and this warns once.
* ``"int8"``: dynamic quantization of the linear layers through PyTorch's own
  ``torch.ao.quantization.quantize_dynamic``: weights int8 per output channel,
  activations quantized at run time per call (one scale per input tensor, i.e.
  per batch; fbgemm/x86 use 7-bit activations), accumulation in int32. GPT-2's
  ``Conv1D`` layers (weight stored (in, out)) are first turned into equivalent
  ``nn.Linear`` layers (:func:`conv1d_to_linear`, same outputs) so they are
  quantized too. Left in float32: embeddings, LayerNorms, convolutions, the
  attention inside ``nn.MultiheadAttention`` (open_clip's CLIP towers and the
  MacCap adaptor: ``in_proj`` is a raw parameter and ``out_proj`` is read by
  ``F.multi_head_attention_forward`` as a tensor), torch's ``TransformerEncoderLayer``
  (CapDec's mapper: its fast path reads its weights as tensors), raw projection matrices
  (CLIP's ``proj``/``text_projection``), timm's MAP pooling head (capdemo's
  encoder reads its ``kv`` weight as a tensor) and any module the caller names
  in ``keep``. CPU only. Because one scale serves a whole input tensor, an
  image's candidates can depend on the other images (and beams) decoded with
  it, and the batched and sequential MacCap paths no longer agree token for
  token; fp32 keeps both guarantees.

Both non-fp32 precisions first merge peft LoRA adapters into the weights they
adapt (TOMCap), so each projection is one matrix product in the new precision.
The converted module is for inference only: to train or save it, load it again.

``torch.ao.quantization`` is deprecated (its warning names torchao as the
successor) but still present and working in torch 2.13; its warnings are
silenced here, where they are known. :class:`PrecisionReport` says what changed.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_PRECISION = "fp32"
# x86 /proc/cpuinfo flags of bf16 dot-product instructions (AVX512-BF16, AMX); ARM's feature name is "bf16"
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ARM_BF16_FLAGS = frozenset({"bf16"})
CPUINFO = Path("/proc/cpuinfo")
# what the int8 path's report calls a layer it converted from GPT-2's Conv1D before quantizing it
CONV1D = "Conv1D"
LINEAR = "Linear"


class PrecisionError(ValueError):
    """A precision that cannot be applied as asked (unknown name, wrong device, weights not float32)."""


@dataclass
class PrecisionReport:
    """What :func:`apply_precision` did to one module tree."""

    precision: str  # "fp32", "bf16" or "int8"
    # int8: linear layers now int8, by the kind they were ("Linear", or "Conv1D" converted to Linear first)
    quantized: dict[str, int] = field(default_factory=dict)
    # modules whose matmul weights stay float32, counted by reason ("MultiheadAttention", "keep", ...)
    kept_float: dict[str, int] = field(default_factory=dict)
    lora_merged: int = 0  # peft LoRA layers whose adapters were merged into their base weights (bf16, int8)
    cast_tensors: int = 0  # bf16: floating parameters and buffers now bfloat16
    bf16_native: bool | None = None  # bf16: whether the device has bf16 instructions (None for fp32 and int8)

    @property
    def quantized_total(self) -> int:
        return sum(self.quantized.values())

    def summary(self) -> str:
        """One line for a log or the app's About tab."""
        merged = f"; {self.lora_merged} LoRA layers merged" if self.lora_merged else ""
        kept = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kept_float.items()))
        kept = f"; float32 kept: {kept}" if kept else ""
        if self.precision == "int8":
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.quantized.items()))
            return f"int8: {self.quantized_total} linear layers quantized ({kinds or 'none'}){kept}{merged}"
        if self.precision == "bf16":
            native = "native" if self.bf16_native else "emulated (no bf16 instructions: slower)"
            return f"bf16: {self.cast_tensors} tensors in bfloat16, {native}{kept}{merged}"
        return "fp32: unchanged"

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "quantized": dict(self.quantized), "kept_float": dict(self.kept_float),
                "lora_merged": self.lora_merged, "cast_tensors": self.cast_tensors, "bf16_native": self.bf16_native,
                "summary": self.summary()}


def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of :data:`PRECISIONS`; otherwise a one-line :class:`PrecisionError`."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def apply_precision(module: nn.Module, precision: str, *, keep: Iterable[nn.Module] = ()) -> PrecisionReport:
    """Convert ``module`` (a loaded model tree, in eval mode) in place for serving at ``precision``.

    ``keep``: submodules whose weights code outside them reads as tensors (so they must stay
    ``nn.Linear``); int8 leaves them, and everything under them, in float32. Call once, right
    after loading and before any request (cached features computed before keep their precision).
    """
    check_precision(precision)
    if precision == "fp32":
        return PrecisionReport(precision)
    device = _device_of(module)
    if precision == "bf16":
        return _cast_bf16(module, device)
    return _quantize_int8(module, device, keep)


# --------------------------------------------------------------------------------------------
# bf16


def _cast_bf16(module: nn.Module, device: torch.device) -> PrecisionReport:
    merged = merge_lora(module)
    # the slow bf16 path is a CPU kernel's: on CUDA attention runs in bf16 like the rest
    attention = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)] if device.type == "cpu" else []
    in_attention = {id(t) for m in attention for t in _tensors(m)}
    cast = sum(t.is_floating_point() and id(t) not in in_attention for t in _tensors(module))
    module.to(torch.bfloat16)
    for mha in attention:
        run_in_float32(mha, outputs=torch.bfloat16)
    native = bf16_is_native(device)
    if not native:
        log.warning("bf16 on %s without bf16 instructions: matmuls are emulated and may be slower than fp32",
                    device.type.upper())
    kept = {"MultiheadAttention": len(attention)} if attention else {}
    return PrecisionReport("bf16", kept_float=kept, lora_merged=merged, cast_tensors=cast, bf16_native=native)


def run_in_float32(module: nn.Module, *, outputs: torch.dtype) -> None:
    """Make ``module`` a float32 island in a model of another dtype: its weights become float32, every
    floating tensor it is called with is cast to float32 and every floating tensor it returns to ``outputs``."""
    module.float()
    module.register_forward_pre_hook(lambda _, args, kwargs: (_cast(args, torch.float32), _cast(kwargs, torch.float32)),
                                     with_kwargs=True)
    module.register_forward_hook(lambda _, args, output: _cast(output, outputs))


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (through tuples, lists and dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# int8


# torch layers that read their Linear children's weights as tensors, so int8 leaves them (and all under them) float:
# MultiheadAttention (in_proj is a raw parameter; out_proj goes to F.multi_head_attention_forward as a tensor) and
# TransformerEncoderLayer (its inference fast path passes linear1/linear2's weights to one fused kernel: CapDec's
# mapper). Checked outermost first, so an encoder layer's own attention is not counted twice.
READ_AS_TENSORS = (nn.TransformerEncoderLayer, nn.MultiheadAttention)


def _quantize_int8(module: nn.Module, device: torch.device, keep: Iterable[nn.Module]) -> PrecisionReport:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    if device.type != "cpu":
        raise PrecisionError(f"int8 dynamic quantization runs on the CPU only; this model is on {device}")
    if torch.backends.quantized.engine == "none":
        raise PrecisionError("int8: this PyTorch build has no quantized CPU engine (fbgemm, x86 or qnnpack)")
    wrong = {str(t.dtype) for t in _tensors(module) if t.is_floating_point() and t.dtype != torch.float32}
    if wrong:
        raise PrecisionError(f"int8 quantizes float32 weights; this model holds {', '.join(sorted(wrong))}")
    merged = merge_lora(module)
    kept = Counter()
    frozen: set[int] = set()  # ids of modules left float, with everything under them
    for reason, root in [*(("keep", m) for m in keep), *_float_by_type(module)]:
        kept[reason] += 1
        frozen.update(id(m) for m in root.modules())
    for layer in (m for m in module.modules() if isinstance(m, READ_AS_TENSORS) and id(m) not in frozen):
        kept[type(layer).__name__] += 1
        frozen.update(id(m) for m in layer.modules())
    kinds: dict[str, str] = {}  # module name -> what it was, for every layer to quantize
    for name, child in list(module.named_modules()):
        if id(child) in frozen or not name:
            continue
        if _is_conv1d(child):
            _set_submodule(module, name, conv1d_to_linear(child))
            kinds[name] = CONV1D
        elif type(child) is nn.Linear:  # exact type: subclasses (NonDynamicallyQuantizableLinear) keep their reasons
            kinds[name] = LINEAR
    if kinds:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices, known (module docstring)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\.")
            warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            quantize_dynamic(module, {name: per_channel_dynamic_qconfig for name in kinds}, dtype=torch.qint8,
                             inplace=True)
    quantized: Counter[str] = Counter()
    for name, child in module.named_modules():
        if isinstance(child, DynamicQuantizedLinear):
            # open_clip reads a block's activation dtype from its c_fc weight unless this says it (its int8 hook)
            child.int8_original_dtype = torch.float32
            if name in kinds:
                quantized[kinds[name]] += 1
    return PrecisionReport("int8", quantized=dict(quantized), kept_float=dict(kept), lora_merged=merged)


def _float_by_type(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules whose weights capdemo reads as tensors, with the reason they stay float:

    * any module's own ``float_submodules()`` (TOMCap's memory projection, whose weight dtype and
      device ``TOMCap.memory`` reads);
    * timm's MAP pooling head: ``capdemo.map_pool`` slices its ``kv.weight``.
    """
    found = [named for m in module.modules() if hasattr(m, "float_submodules") for named in m.float_submodules()]
    try:
        from timm.layers import AttentionPoolLatent
    except ImportError:  # no timm: no timm towers
        return found
    return found + [("AttentionPoolLatent", m) for m in module.modules() if isinstance(m, AttentionPoolLatent)]


def _is_conv1d(child: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(child, Conv1D)


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's ``Conv1D`` (weight (in, out), ``y = x W + b``) as an ``nn.Linear`` computing the same outputs.

    The Linear's weight (out, in) is the transposed *view* of the Conv1D's storage, so ``F.linear``
    runs the very product ``Conv1D`` runs (``addmm(b, x, W)``) and no memory is copied.
    """
    fan_in, fan_out = conv.weight.shape
    linear = nn.Linear(fan_in, fan_out, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)  # (out, in) view
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)  # (out,)
    return linear


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child_name, new)


# --------------------------------------------------------------------------------------------
# LoRA


def merge_lora(module: nn.Module) -> int:
    """Merge every peft LoRA layer under ``module`` into its base layer and put the base layer in its place.

    Inference gives the same outputs (up to float rounding): ``W + scale B A`` in one product
    instead of three. Returns how many layers were merged (0 when peft or LoRA is absent).
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge()
        _set_submodule(module, name, layer.get_base_layer())
    return len(layers)


# --------------------------------------------------------------------------------------------
# bf16 support of the machine


def bf16_is_native(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 in hardware: the CUDA device's own answer, or the CPU's flags."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & (X86_BF16_FLAGS | ARM_BF16_FLAGS))


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags in lower case: /proc/cpuinfo's ``flags``/``Features`` (Linux), sysctl's
    ``hw.optional.arm.FEAT_*`` (macOS); empty where neither answers."""
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.lower().split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        return frozenset({"bf16"}) if out == "1" else frozenset()
    return frozenset()


# --------------------------------------------------------------------------------------------
# helpers


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _device_of(module: nn.Module) -> torch.device:
    tensors = _tensors(module)
    return tensors[0].device if tensors else torch.device("cpu")


__all__ = [
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "PrecisionError",
    "PrecisionReport",
    "apply_precision",
    "bf16_is_native",
    "check_precision",
    "conv1d_to_linear",
    "cpu_flags",
    "merge_lora",
    "run_in_float32",
]
