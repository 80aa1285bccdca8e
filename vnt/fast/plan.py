"""The kernel plan: every threshold and switch of the speed layer, in one place.

A plan says *how* the model's function is computed, never *what* it computes: every setting
here gives the same outputs and gradients (tests compare them), so a plan is process state, not a
model hyper-parameter, and checkpoints do not record it.

The defaults come from the environment once, at import: ``VNT_KERNELS="key=value,..."`` with the
field names below (``VNT_KERNELS="fold=false,l2_written_out_max_scores=0"``), and the older
``VNT_FUSED_KERNELS=0``. In code: ``vnt.fast.configure(**changes)``, for the process or, as a
context manager, for a block::

    with vnt.fast.configure(fold=False):
        out = model(coors)        # the projected (reference) attention
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, fields

ENV = "VNT_KERNELS"
FUSED_ENV = "VNT_FUSED_KERNELS"


@dataclass(frozen=True)
class KernelPlan:
    # folded (multi-query) self attention: None = where dim <= dim_head; True / False force it. The
    # encoder's first layer runs on the input embedding's low-rank factor unless fold is False.
    fold: bool | None = None
    # fused CPU kernels (vnt.fast.kernels) for VN-ReLU and the layer norm's residual sum
    fused_kernels: bool = True
    # below this many elements the eager passes run (small tensors are bound by per-op overhead, and a
    # process that only sees them never pays the compilation); the README example's feed-forward has 8.8M
    fused_min_numel: int = 2 ** 20
    # tied L2 attention on a CPU runs written out up to this many scores (batch x heads x n x n; 8 MiB
    # in float32), beyond it on the SDPA kernels (memory O(n), not O(n^2)); 0: always SDPA
    l2_written_out_max_scores: int = 2 ** 21
    # the "sdpa" backend on a CPU runs written out (the "math" backend's path) up to this many scores
    # (batch x heads x i x j), and at any size while the keys number at most q's feature width (then
    # the score matrix is no larger than q, and CPU flash saves more than that for its backward):
    # torch's CPU flash kernel is slower than the written-out GEMMs at VN head widths ((3 + f) x d
    # features per head). Beyond both, the SDPA kernels (memory O(n)); 0: always SDPA
    sdpa_written_out_max_scores: int = 2 ** 21
    # q q^T on a CPU from this many rows: the blocks on and above the diagonal only
    symmetric_gram_min_rows: int = 256
    # SDPA kernels to try, in order; the first one that accepts the inputs runs
    sdpa_kernels: tuple[str, ...] = ("flash", "efficient", "math")

    def __post_init__(self):
        if self.fold not in (None, True, False):
            raise ValueError(f"fold must be None (automatic), True or False, got {self.fold!r}")
        for name in ("fused_min_numel", "l2_written_out_max_scores", "sdpa_written_out_max_scores",
                     "symmetric_gram_min_rows"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        kernels = tuple(self.sdpa_kernels)
        unknown = [k for k in kernels if k not in SDPA_KERNEL_NAMES]
        if unknown or not kernels:
            raise ValueError(f"sdpa_kernels must be a non-empty subset of {SDPA_KERNEL_NAMES}, got {self.sdpa_kernels!r}")
        object.__setattr__(self, "sdpa_kernels", kernels)


SDPA_KERNEL_NAMES = ("flash", "efficient", "math", "cudnn")


def _parse(text: str) -> dict:
    """``key=value,...`` -> KernelPlan changes (ValueError naming the variable on a bad entry)."""
    types = typing.get_type_hints(KernelPlan)
    changes: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in types:
            raise ValueError(f"{ENV}: unknown setting {key!r} (settings: {', '.join(f.name for f in fields(KernelPlan))})")
        if key == "fold":
            changes[key] = {"none": None, "true": True, "false": False}[value.lower()]
        elif key == "fused_kernels":
            changes[key] = value.lower() in ("1", "true")
        elif key == "sdpa_kernels":
            changes[key] = tuple(v for v in value.split("+") if v)
        else:
            changes[key] = int(value)
    return changes


def _from_environment() -> KernelPlan:
    changes = _parse(os.environ.get(ENV, ""))
    if os.environ.get(FUSED_ENV, "1") == "0":
        changes.setdefault("fused_kernels", False)
    return KernelPlan(**changes)


_plan = _from_environment()


def current() -> KernelPlan:
    """The plan in force."""
    return _plan


class _Configured:
    """What ``configure`` returns: the change is already in force; as a context manager it is undone
    at the block's end."""

    def __init__(self, previous: KernelPlan):
        self.previous = previous

    def __enter__(self) -> KernelPlan:
        return _plan

    def __exit__(self, *exc) -> None:
        global _plan
        _plan = self.previous


def configure(**changes) -> _Configured:
    """Change the plan (KernelPlan's fields): for the process, or within a ``with`` block."""
    global _plan
    previous = _plan
    _plan = dataclasses.replace(_plan, **changes)
    return _Configured(previous)


def use(plan: KernelPlan) -> _Configured:
    """Put ``plan`` in force (undone at the end of a ``with`` block): an activation-checkpointed layer
    recomputes in the backward pass under the plan its forward ran under."""
    global _plan
    previous, _plan = _plan, plan
    return _Configured(previous)


def planned(module, **changes):
    """``module`` (returned) with every forward run under ``configure(**changes)``, by forward hooks:
    e.g. ``planned(model, fold=False)`` is the model in its projected (reference) form."""
    if not changes:
        return module
    KernelPlan(**{**current().__dict__, **changes})  # a bad change fails here, not in the first forward
    active = []
    module.register_forward_pre_hook(lambda m, args: active.append(configure(**changes)))
    module.register_forward_hook(lambda m, args, out: active.pop().__exit__(None, None, None))
    return module
