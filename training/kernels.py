"""The CPU float kernels training runs on, pinned so that trained weights do not depend on the CPU.

PyTorch's CPU libraries choose their vectorised code by the CPU they find. On an x86-64 CPU with
AVX-512, oneDNN's element-wise primitive, which runs the GELU of the tiny CLIP's MLPs, runs 512-bit
code whose last bits differ from its AVX2 code, and training amplifies a last bit into another draw
of every model: the shapes bundle built on an AMD EPYC with AVX-512 differed from the shipped one in
every trained weight. With oneDNN pinned to AVX2 the same build on that CPU gives the shipped bytes
(README, "Bit for bit on another CPU too"; how it was found: docs/shapes-world-history.md). ATen's
vectorised kernels also choose by the CPU; they are pinned to their AVX2 code as a precaution (the CPU
that built the shipped bundle ran it), not shown to matter on their own.

Each library reads its setting once, at its first use, so :func:`pin_cpu_kernels` must run before
the first tensor operation of the process; worker processes inherit it through the environment.
A variable the environment already sets is left as it is (``ONEDNN_MAX_CPU_ISA=ALL`` gives oneDNN
its fastest code back, at the cost of bytes that depend on the CPU).
"""

from __future__ import annotations

import os
import platform

PINNED_KERNELS = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN primitives (element-wise ops such as GELU)
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels (reductions, norms, optimisers)
}
# MKL's matrix products are left to MKL: pinned to its AVX2 branch (MKL_CBWR=AVX2), the build on the AMD EPYC
# trained another MacCap (adaptor and LM), while MKL's own choice there gave the shipped bytes


def pins_apply() -> bool:
    """Whether this CPU has the pinned code: x86-64 only (elsewhere ATen would warn about the value and ignore it)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def pin_cpu_kernels() -> None:
    """Where :func:`pins_apply`, pin the CPU kernels (:data:`PINNED_KERNELS`) the environment does not choose."""
    if not pins_apply():
        return
    for name, value in PINNED_KERNELS.items():
        os.environ.setdefault(name, value)


def kernels_in_force() -> dict[str, str | None]:
    """For a run record: each pinning variable as the environment has it (None: unset, the CPU's own choice) and
    the vectorised code ATen runs (``cpu_capability``)."""
    import torch

    return {**{name: os.environ.get(name) for name in PINNED_KERNELS},
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
