"""Fused CPU kernels, compiled on first use with torch.compile (inductor's C++/OpenMP backend).

VN-ReLU and the layer norm's residual sum are memory-bound: eager PyTorch makes about ten passes
over (..., c, d) tensors per forward+backward (each reduction over c and each multiply-add is its
own pass), where one reduction pass and one elementwise pass suffice. A compiled function fuses
them. Only that region is compiled, not the model: its GEMMs stay on the eager BLAS calls.

Use: on a CPU, in float32 and float64, on tensors of at least the plan's ``fused_min_numel``
elements, in eager mode (a model under ``torch.compile`` traces the eager formulas and its compiler
fuses them itself; under a dispatch mode, FlopCounterMode say, the eager ops run, so that the mode
sees them). The first call per dtype compiles (inductor caches the result on disk); shapes are
dynamic, so new lengths and batch sizes do not recompile. Where compilation fails (no C++
compiler, say), vnt warns once and runs the eager code from then on. The plan's ``fused_kernels``
(``VNT_FUSED_KERNELS=0`` in the environment) turns them off.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from vnt.fast import plan

_DTYPES = (torch.float32, torch.float64)


def usable(*tensors: Tensor, min_numel: int | None = None) -> bool:
    """Whether a fused kernel should run on these tensors: enabled in the plan, eager (not traced by
    torch.compile, and no dispatch mode such as FlopCounterMode watching the ops), CPU,
    float32/float64, and the first tensor at least ``min_numel`` elements (default: the plan's)."""
    p = plan.current()
    min_numel = p.fused_min_numel if min_numel is None else min_numel
    return (p.fused_kernels and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()
            and bool(tensors) and tensors[0].numel() >= min_numel
            and all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors))


class Fused:
    """``fn`` compiled on its first call (dynamic shapes); on any compilation error, a warning and
    ``fn`` itself for the rest of the process."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.compiled: Callable | None = None
        self.error: str | None = None

    def __call__(self, *args):
        if self.error is None:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 (any compiler failure: fall back, say why once)
                self.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                warnings.warn(f"vnt: the fused {self.name} kernel could not be compiled ({self.error}); "
                              f"running the eager code (set {plan.FUSED_ENV}=0 to skip the attempt)", stacklevel=2)
        return self.fn(*args)
