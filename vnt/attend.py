"""One attention module that owns the kernel choice.

Axes: b batch, h heads, i query points, j key points, e flattened (coordinate x channel) features.

Backends (named, chosen at construction):
  "math"     dot-product attention written out (einsum + softmax): the reference path.
  "sdpa"     dot-product attention through ``F.scaled_dot_product_attention``, with the kernel
             (flash, memory-efficient, math) selected explicitly via ``torch.nn.attention.sdpa_kernel``.
  "l2"       L2-distance attention, sim = -scale * |q_i - k_j|^2, run on the SDPA kernels by
             augmenting q and k with one extra feature per head (the -|q_i|^2 term is constant along
             j and cancels in the softmax), so it gets the fused kernels too.
  "l2_math"  the same L2-distance attention written out; the reference for "l2".

Keys and values may be shared by all heads (multi-query form, head axis of size 1): VNAttention
folds its projections into the queries and the output map, so its keys and values are the input
itself. The heads are then folded into the query rows, so no head-sized copy of k or v is made.
"""
from __future__ import annotations

import inspect
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


_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6


def _sdpa_kernel(backends: list[SDPBackend]):
    """``sdpa_kernel`` with the list's order as the dispatcher's priority, where torch supports it."""
    if len(backends) > 1 and _SET_PRIORITY:
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)


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


def _key_mask(mask: Tensor | None) -> Tensor | None:
    """(b j) keep-mask -> (b 1 1 j). A sample with no valid key would give softmax over nothing (NaN):
    it attends to all of its (zeroed) points instead, so outputs and gradients stay finite. No host sync."""
    if mask is None:
        return None
    return rearrange(mask | ~mask.any(dim=-1, keepdim=True), "b j -> b 1 1 j")


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

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
                scale: float | None = None, k_sq: Tensor | None = None) -> Tensor:
        """q (b h i e); k, v (b h j e), or (b 1 j e) shared by every head (multi-query form, no copy:
        the heads are folded into the query rows); mask (b j) bool, True = keep. Returns (b h i e_v).

        scale defaults to e ** -0.5. For the L2 backends, ``k_sq`` (b h j) or (b 1 j) gives the
        squared key norms |k_j|^2 when q.k is a bilinear form that k alone does not determine
        (VNAttention's folded projections); by default they are computed from k.
        """
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if self.backend not in ("l2", "l2_math"):
            return self.dot_product(q, k, v, mask=mask, scale=scale)
        if k_sq is None:
            k_sq = k.pow(2).sum(-1)
        if self.backend == "l2_math":
            # -|q_i - k_j|^2 up to -|q_i|^2, which is constant along j and cancels in the softmax
            return self._written_out(q, k, v, mask=mask, scale=scale, key_bias=k_sq)
        # sim_ij = 2 scale (q.k - |k_j|^2 / 2) == -scale |q_i - k_j|^2 + (term constant in j): augment q
        # with -1 in the slot that holds its head's |k_j|^2 / 2, and zero-pad q, k, v to one head dim
        # that is a multiple of 8 (what the fused kernels want); the padding is sliced off after
        b, h, i, _ = q.shape
        e_v = v.shape[-1]
        per_head_sq = k.shape[1] == 1 and k_sq.shape[1] > 1  # shared keys, one metric per head
        q_extra = -torch.eye(h, dtype=q.dtype, device=q.device) if per_head_sq else q.new_full((1, 1), -1.0)
        k_extra = rearrange(k_sq, "b h j -> b 1 j h" if per_head_sq else "b h j -> b h j 1").to(k.dtype) / 2
        e = q.shape[-1] + q_extra.shape[-1]
        width = e + (-e) % 8
        q = torch.cat((q, rearrange(q_extra, "h s -> 1 h 1 s").expand(b, h, i, -1),
                       q.new_zeros(()).expand(b, h, i, width - e)), dim=-1)
        k = torch.cat((k, k_extra, k.new_zeros(()).expand(*k.shape[:-1], width - e)), dim=-1)
        v = F.pad(v, (0, width - e_v))
        return self.dot_product(q, k, v, mask=mask, scale=2 * scale)[..., :e_v]

    def dot_product(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
                    scale: float | None = None) -> Tensor:
        """softmax(scale q.k) v on this backend's kernels (einsum for the written-out backends, SDPA
        otherwise), whatever the backend's similarity: for callers that already put their
        similarity in dot-product form (VNAttention's L2 attention with folded projections)."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if self.backend in ("math", "l2_math"):
            return self._written_out(q, k, v, mask=mask, scale=scale)
        b, h, i, _ = q.shape
        shared = k.shape[1] == 1 and h > 1
        if shared:
            q = rearrange(q, "b h i e -> b 1 (h i) e")
        out = self._sdpa(q, k, v, mask=_key_mask(mask), scale=scale)
        return out.view(b, h, i, v.shape[-1]) if shared else out

    def _written_out(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float,
                     key_bias: Tensor | None = None) -> Tensor:
        """softmax(scale (q.k - key_bias_j)) v with key_bias (b h j) or (b 1 j); q.k doubled when
        key_bias is given (the L2 form 2 q.k - |k|^2)."""
        self.last_kernel = "einsum"
        b, h, i, _ = q.shape
        j = k.shape[-2]
        heads_as_rows = "b h i e -> b 1 (h i) e" if k.shape[1] == 1 and h > 1 else "b h i e -> b h i e"
        sim = torch.matmul(rearrange(q, heads_as_rows), k.transpose(-1, -2)).view(b, h, i, j)
        if key_bias is not None:
            sim = 2 * sim - rearrange(key_bias, "b h j -> b h 1 j")
        sim = sim * scale
        mask = _key_mask(mask)
        if mask is not None:
            sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
        attn = rearrange(sim.softmax(dim=-1).to(v.dtype), heads_as_rows)
        return torch.matmul(attn, v).view(b, h, i, v.shape[-1])

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float) -> Tensor:
        key = (q.device.type, q.dtype, q.shape[-1], v.shape[-1], mask is not None,
               torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        cached = self._kernel_cache.get(key)
        if torch.compiler.is_compiling():
            # a torch.compile trace cannot probe (try/except): it gets the known kernel, or the
            # preference order with the dispatcher taking the first kernel that can run (then
            # last_kernel is None: no eager call has found it yet)
            names = (cached,) if cached is not None else self.sdpa_kernels
            with _sdpa_kernel([_KERNELS[name] for name in names]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            self.last_kernel = cached
            return out
        # eager: the kernel that served these inputs before goes first; the rest in preference order
        names = self.sdpa_kernels if cached is None else (cached, *(n for n in self.sdpa_kernels if n != cached))
        for name in names:
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
        raise RuntimeError(f"none of the SDPA kernels {self.sdpa_kernels} can run these inputs "
                           f"(q {tuple(q.shape)} {q.dtype} on {q.device.type}, mask={mask is not None}); "
                           f"add 'math' to sdpa_kernels")
