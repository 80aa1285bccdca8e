"""Fused CPU kernels, compiled on first use with torch.compile (inductor's C++/OpenMP backend).

The VN-ReLU nonlinearity is memory-bound: eager PyTorch makes about ten passes over (..., c, d)
tensors per forward+backward (each reduction over c and each multiply-add is its own pass), where
one reduction pass and one elementwise pass suffice. A compiled function fuses them. Only that
region is compiled, not the model: its GEMMs stay on the eager BLAS calls, and nothing else changes.

Use: on a CPU, in float32 and float64, on tensors of at least ``MIN_NUMEL`` elements, in eager mode
(a model under ``torch.compile`` traces the eager formulas and its compiler fuses them itself; under a
dispatch mode, FlopCounterMode say, the eager ops run, so that the mode sees them). The first call per dtype compiles (about 5-15 s;
inductor caches the result on disk, so later processes load it in about a second); shapes are
dynamic, so new lengths and batch sizes do not recompile. Where compilation fails (no C++ compiler,
say), vnt warns once and runs the eager code from then on. ``VNT_FUSED_KERNELS=0`` in the
environment, or ``vnt.kernels.set_enabled(False)``, turns them off.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

ENV = "VNT_FUSED_KERNELS"
_DTYPES = (torch.float32, torch.float64)
# below this many elements (the first tensor a caller checks) the eager passes run: small tensors
# stay in cache and are bound by per-op overhead, not memory traffic, and a process that only ever
# sees them (tests, the main job's short crops) never pays the compilation. The README example's
# feed-forward has 8.8M.
MIN_NUMEL = 2 ** 20
_enabled = os.environ.get(ENV, "1") != "0"


def set_enabled(enabled: bool) -> None:
    """Turn the fused kernels on or off for this process (the default comes from ``VNT_FUSED_KERNELS``)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


def usable(*tensors: Tensor, min_numel: int | None = None) -> bool:
    """Whether a fused kernel should run on these tensors: enabled, eager (not traced by torch.compile,
    and no dispatch mode such as FlopCounterMode watching the ops), CPU, float32/float64, and the first
    tensor at least ``min_numel`` elements (default ``MIN_NUMEL``)."""
    min_numel = MIN_NUMEL if min_numel is None else min_numel
    return (_enabled and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()
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
                              f"running the eager code (set {ENV}=0 to skip the attempt)", stacklevel=2)
        return self.fn(*args)
