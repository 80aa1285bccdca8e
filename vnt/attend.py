"""One attention module that owns the kernel choice.

Axes: b batch, h heads, i query points, j key points, e flattened (coordinate x channel) features.

Backends (named, chosen at construction):
  "math"     dot-product attention written out (einsum + softmax): the reference path.
  "sdpa"     dot-product attention through ``F.scaled_dot_product_attention``, with the kernel
             (flash, memory-efficient, math) selected explicitly via ``torch.nn.attention.sdpa_kernel``.
  "l2"       L2-distance attention, sim = -scale * |q_i - k_j|^2, run on the SDPA kernels by
             augmenting q and k with one extra feature (the -|q_i|^2 term is constant along j and
             cancels in the softmax), so it gets the fused kernels too.
  "l2_math"  the same L2-distance attention written out; the reference for "l2".
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("math", "sdpa", "l2", "l2_math")

# preference order when a backend uses SDPA; the first kernel that accepts the inputs runs
DEFAULT_SDPA_KERNELS = ("flash", "efficient", "math")
_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def resolve_backend(*, attn_backend: str | None, flash_attn: bool, l2_dist_attn: bool) -> str:
    """Map the original package's flags onto one backend name; contradictions raise ValueError."""
    if flash_attn and l2_dist_attn:
        raise ValueError("flash_attn=True and l2_dist_attn=True are incompatible: pick one "
                         "(l2_dist_attn already runs on the fused SDPA kernels as attn_backend='l2')")
    implied = "sdpa" if flash_attn else "l2" if l2_dist_attn else None
    if attn_backend is None:
        return implied or "math"
    if attn_backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
    if implied is not None and implied != attn_backend and not (implied == "l2" and attn_backend == "l2_math"):
        raise ValueError(f"attn_backend={attn_backend!r} contradicts "
                         f"{'flash_attn' if flash_attn else 'l2_dist_attn'}=True (which means {implied!r})")
    return attn_backend


class Attend(nn.Module):
    """softmax attention over (b, h, n, e) tensors with a key-padding mask (b, j).

    ``last_kernel`` names the kernel that ran in the latest forward ("einsum" for the written-out
    paths, else "flash" / "efficient" / "math" / "cudnn" for SDPA), so callers can check that the
    kernel they asked for is the one they got.
    """

    def __init__(self, *, backend: str = "math", sdpa_kernels: tuple[str, ...] = DEFAULT_SDPA_KERNELS):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        unknown = [k for k in sdpa_kernels if k not in _KERNELS]
        if unknown or not sdpa_kernels:
            raise ValueError(f"sdpa_kernels must be a non-empty subset of {tuple(_KERNELS)}, got {sdpa_kernels!r}")
        self.backend = backend
        self.sdpa_kernels = tuple(sdpa_kernels)
        self.last_kernel: str | None = None
        self._kernel_cache: dict[tuple, str] = {}

    @property
    def uses_sdpa(self) -> bool:
        return self.backend in ("sdpa", "l2")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """q (b h i e), k/v (b h j e), mask (b j) bool with True = keep. Returns (b h i e)."""
        scale = q.shape[-1] ** -0.5
        if mask is not None:
            # a sample with no valid key would give softmax over nothing (NaN); let it attend to all of
            # its (zeroed) points instead so outputs and gradients stay finite. No host sync.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
            mask = rearrange(mask, "b j -> b 1 1 j")

        if self.backend in ("math", "l2_math"):
            self.last_kernel = "einsum"
            sim = torch.einsum("b h i e, b h j e -> b h i j", q, k)
            if self.backend == "l2_math":
                q_sq = q.pow(2).sum(-1, keepdim=True)
                k_sq = rearrange(k.pow(2).sum(-1), "b h j -> b h 1 j")
                sim = 2 * sim - q_sq - k_sq
            sim = sim * scale
            if mask is not None:
                sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
            attn = sim.softmax(dim=-1)
            return torch.einsum("b h i j, b h j e -> b h i e", attn.to(v.dtype), v)

        if self.backend == "l2":
            # sim_ij = scale * (2 q.k - |k|^2)  ==  -scale |q - k|^2 + (term constant in j)
            k_sq = k.pow(2).sum(-1, keepdim=True)
            e = q.shape[-1] + 1
            pad = (-e) % 8  # fused CUDA kernels want the head dim a multiple of 8
            q = torch.cat((2 * q, torch.full_like(q[..., :1], -1.0)), dim=-1)
            k = torch.cat((k, k_sq), dim=-1)
            # fused kernels want q, k, v of one head dim (a multiple of 8): pad with zeros, slice after
            e_v = v.shape[-1]
            q, k, v = F.pad(q, (0, pad)), F.pad(k, (0, pad)), F.pad(v, (0, e + pad - e_v))
            return self._sdpa(q, k, v, mask=mask, scale=scale)[..., :e_v]
        return self._sdpa(q, k, v, mask=mask, scale=scale)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float) -> Tensor:
        key = (q.device.type, q.dtype, q.shape[-1], v.shape[-1], mask is not None,
               torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        cached = self._kernel_cache.get(key)
        candidates = (cached,) if cached is not None else self.sdpa_kernels
        for name in candidates:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch warns why each refused kernel was refused
                    with sdpa_kernel([_KERNELS[name]]):
                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            except RuntimeError as err:
                if "No available kernel" not in str(err) and "No viable backend" not in str(err):
                    raise
                continue
            self._kernel_cache[key] = name
            self.last_kernel = name
            return out
        raise RuntimeError(f"none of the SDPA kernels {candidates} can run these inputs "
                           f"(q {tuple(q.shape)} {q.dtype} on {q.device.type}, mask={mask is not None}); "
                           f"add 'math' to sdpa_kernels")
