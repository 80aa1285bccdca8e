"""One attention module that owns the kernel choice, and the only place that knows how extra
similarity terms ride on a dot-product kernel.

Axes: b batch, h heads, i query points, j key points, e flattened (coordinate x channel) features.

Backends (named, chosen at construction):
  "math"     dot-product attention written out (einsum + softmax): the reference path.
  "sdpa"     dot-product attention through ``F.scaled_dot_product_attention``, with the kernel
             (flash, memory-efficient, math) selected explicitly via ``torch.nn.attention.sdpa_kernel``;
             on a CPU, written out within the plan's budget (below).
  "l2"       L2-distance attention, sim = -scale * |q_i - k_j|^2, on the SDPA kernels.
  "l2_math"  the same L2-distance attention written out; the reference for "l2".

Similarity: ``scale * (m q_i.k_j + t_j)`` with m = 1 and t = key_bias for the dot-product
backends, m = 2 and t = key_bias - |k_j|^2 for L2 (-|q_i|^2 is constant along j and cancels in the
softmax). A key term t_j (per head, or shared) rides on the SDPA kernels as one more feature: q gets
a 1 in a slot where k holds t_j / m, one slot per head when the keys are shared by every head. A
caller that leaves zero features at the end of q (``q_spare``) gets the slots written there, so q
is not copied. Keys and values may be shared by all heads (multi-query form, head axis of size 1):
VNAttention folds its projections into the queries and the output map, so its keys and values are
the input itself; the heads are then folded into the query rows, so no head-sized copy of k or v is
made.

On a CPU, "sdpa" runs written out while its scores (b h i j) number at most the plan's
``sdpa_written_out_max_scores``, or while the keys number at most q's feature width (the score
matrix is then no larger than q): torch's CPU flash kernel is slower than the written-out GEMMs at
VN head widths ((3 + f) x d features per head), and ``last_kernel`` then says "einsum". Beyond
both the SDPA kernels run (memory O(n), not O(n^2)); on CUDA they always do.

Tied L2 attention (the keys are the queries: VNAttention's L2 self attention) is its own call,
``Attend.tied_l2(q, v)``. On a CPU, while its scores (b h i j) number at most the plan's
``l2_written_out_max_scores``, it runs written out: the score matrix is q q^T, whose backward is one
GEMM, (g + g^T) q, where every fused kernel runs two (dq and dk), and |q_j|^2 is its diagonal.
Beyond the budget the SDPA kernels run (memory O(n), not O(n^2)). With ``sum_heads`` the values are
already mapped to the output per head: the output is sum_h attn_h v_h, one GEMM per sample over
(head, key) pairs, so no head-major output is written and copied back to the channel layout.
"""
from __future__ import annotations

import inspect
import typing
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vnt.fast import plan

Backend = Literal["math", "sdpa", "l2", "l2_math"]
BACKENDS: tuple[str, ...] = typing.get_args(Backend)

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


# q q^T from the plan's symmetric_gram_min_rows on (CPU): the upper block rows only, each block below
# the diagonal copied from its transpose (5/8 of the products at 4 blocks)
_GRAM_BLOCKS = 4


class _SelfGram(torch.autograd.Function):
    """q q^T over the last two axes, with a one-GEMM backward, (g + g^T) q: autograd on ``q @ q.mT``
    runs two, as it does not know that both factors are q. From the plan's ``symmetric_gram_min_rows``
    on a CPU the forward computes the blocks on and above the diagonal only (the rest are their transposes)."""

    @staticmethod
    def forward(ctx, q: Tensor) -> Tensor:
        ctx.save_for_backward(q)
        n = q.shape[-2]
        if n < plan.current().symmetric_gram_min_rows or q.device.type != "cpu":
            return torch.matmul(q, q.transpose(-1, -2))
        out = None
        step = -(-n // _GRAM_BLOCKS)
        for start in range(0, n, step):
            stop = min(start + step, n)
            block = torch.matmul(q[..., start:stop, :], q[..., start:, :].transpose(-1, -2))
            if out is None:  # the product's dtype (autocast may choose it)
                out = block.new_empty((*q.shape[:-1], n))
            out[..., start:stop, start:] = block
            out[..., stop:, start:stop] = block[..., stop - start:].transpose(-1, -2)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        q, = ctx.saved_tensors
        grad = grad.to(q.dtype)  # under autocast the scores' gradient may come in another dtype than q
        return torch.matmul(grad + grad.transpose(-1, -2), q)


class _SumHeads(torch.autograd.Function):
    """sum_h attn_h v_h: attn (b h i j), v (b h j e) -> (b i e), forward as one GEMM per sample over
    (head, key) pairs, K = h j. Its backward writes dv per head, attn_h^T g with g shared by the heads
    (a stride-0 batch): autograd's dv is one GEMM with the transposed (h j) x i attention as its left
    factor, which runs slower."""

    @staticmethod
    def forward(ctx, attn: Tensor, v: Tensor) -> Tensor:
        ctx.save_for_backward(attn, v)
        return torch.matmul(rearrange(attn, "b h i j -> b i (h j)"), rearrange(v, "b h j e -> b (h j) e"))

    @staticmethod
    def backward(ctx, g: Tensor):
        attn, v = ctx.saved_tensors
        g = g.to(v.dtype)
        b, h = attn.shape[:2]
        d_attn = d_v = None
        if ctx.needs_input_grad[0]:  # g v^T over every (head, key) column at once
            d_attn = rearrange(torch.matmul(g, rearrange(v, "b h j e -> b e (h j)")), "b i (h j) -> b h i j", h=h)
            d_attn = d_attn.to(attn.dtype)
        if ctx.needs_input_grad[1]:
            d_v = v.new_empty(v.shape)
            for s in range(b):
                torch.bmm(attn[s].transpose(-1, -2).to(v.dtype), g[s].expand(h, -1, -1), out=d_v[s])
        return d_attn, d_v


class Attend(nn.Module):
    """softmax attention over (b, h, n, e) tensors with a key-padding mask (b, j).

    ``sdpa_kernels``: this module's SDPA kernel preference (default: the plan's). ``last_kernel``
    names the kernel that ran in the latest forward ("einsum" for the written-out paths, else
    "flash" / "efficient" / "math" / "cudnn" for SDPA), so callers can check that the kernel they
    asked for is the one they got.
    """

    def __init__(self, *, backend: str = "math", sdpa_kernels: tuple[str, ...] | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if sdpa_kernels is not None:
            sdpa_kernels = plan.KernelPlan(sdpa_kernels=sdpa_kernels).sdpa_kernels  # validated
        self.backend = backend
        self._sdpa_kernels = sdpa_kernels
        self.last_kernel: str | None = None
        self._kernel_cache: dict[tuple, str] = {}

    @property
    def sdpa_kernels(self) -> tuple[str, ...]:
        return self._sdpa_kernels or plan.current().sdpa_kernels

    @property
    def uses_sdpa(self) -> bool:
        return self.backend in ("sdpa", "l2")

    def tied_written_out(self, *, scores: int, device: torch.device) -> bool:
        """Whether ``tied_l2`` with ``scores`` = b h i j runs written out: always for "l2_math"; for
        "l2" on a CPU within the plan's ``l2_written_out_max_scores``."""
        if self.backend == "l2_math":
            return True
        return self.backend == "l2" and device.type == "cpu" and scores <= plan.current().l2_written_out_max_scores

    def dot_written_out(self, *, scores: int, device: torch.device, keys: int = 0, width: int = 0) -> bool:
        """Whether ``forward`` with ``scores`` = b h i j, ``keys`` = j and q's feature ``width`` runs
        written out: always for "math" and "l2_math"; for "sdpa" on a CPU within the plan's
        ``sdpa_written_out_max_scores`` or while keys <= width (unless the budget is 0); never for
        "l2" (its tied form, ``tied_l2``, has its own budget)."""
        if self.backend in ("math", "l2_math"):
            return True
        budget = plan.current().sdpa_written_out_max_scores
        return (self.backend == "sdpa" and device.type == "cpu" and budget > 0
                and (scores <= budget or 0 < keys <= width))

    def augment_slots(self, *, heads: int, key_term: bool, scores: int | None = None,
                      device: torch.device | None = None, keys: int = 0, width: int = 0) -> int:
        """How many zero features a caller with keys shared by ``heads`` heads should leave at the end
        of q (``q_spare``) so that a key term rides on the SDPA kernel without copying q. Given the
        call's ``scores``, ``device``, ``keys`` and ``width``, none where ``forward`` will run written out."""
        if not self.uses_sdpa or not (key_term or self.backend == "l2"):
            return 0
        if scores is not None and device is not None and self.dot_written_out(
                scores=scores, device=device, keys=keys, width=width):
            return 0
        return heads

    def tied_l2(self, q: Tensor, v: Tensor, *, mask: Tensor | None = None, scale: float | None = None,
                sum_heads: bool = False) -> Tensor:
        """L2-distance attention whose keys are the queries: softmax(-scale |q_i - q_j|^2) v. q (b h i e),
        v (b h j e_v) or (b 1 j e_v); with ``sum_heads``, v holds every head's values already mapped to
        the output and the result is their sum over heads (b i e_v). Written out where
        ``tied_written_out`` says (scores q q^T with a one-GEMM backward), else ``forward(q, q, v)``."""
        if self.backend not in ("l2", "l2_math"):
            raise ValueError(f"tied_l2 needs an L2 backend, this Attend is {self.backend!r}")
        b, h, i, e = q.shape
        if sum_heads and v.shape[1] != h:
            raise ValueError(f"sum_heads=True needs values per head (batch, {h}, keys, features), got {tuple(v.shape)}")
        scale = e ** -0.5 if scale is None else scale
        if self.tied_written_out(scores=b * h * i * i, device=q.device):
            return self._written_out(q, q, v, mask=mask, scale=scale, m=2.0, tied=True, sum_heads=sum_heads)
        out = self(q, q, v, mask=mask, scale=scale)
        return out.sum(dim=1) if sum_heads else out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
                scale: float | None = None, key_bias: Tensor | None = None, k_sq: Tensor | None = None,
                q_spare: int = 0) -> Tensor:
        """q (b h i e); k, v (b h j e'), or (b 1 j e') shared by every head, e' = e - q_spare; mask (b j)
        bool, True = keep. Returns (b h i e_v); when the keys are the values (``v is k``, VNAttention's
        folded form) and q has spare features on the SDPA kernels, (b h i e): the last q_spare output
        features are then meaningless (the caller drops them after its output map; slicing here would
        copy). Written out (``dot_written_out``) the spare features are ignored: a caller that asks
        ``augment_slots`` with the call's scores reserves none there.

        scale defaults to e' ** -0.5. key_bias (b h j) or (b 1 j): added to q.k (see the module
        docstring). For the L2 backends, ``k_sq`` (b h j) or (b 1 j) gives the squared key norms
        |k_j|^2 when q.k is a bilinear form that k alone does not determine (VNAttention's folded
        projections); by default they are computed from k. q_spare: the last q_spare features of q
        are zero (the caller reserved them for the augmentation slots); they may be overwritten.
        """
        width = q.shape[-1] - q_spare
        scale = width ** -0.5 if scale is None else scale
        l2 = self.backend in ("l2", "l2_math")
        m = 2.0 if l2 else 1.0
        term = key_bias
        if l2:
            k_sq = k.pow(2).sum(-1) if k_sq is None else k_sq
            term = -k_sq if term is None else term - k_sq
        q_core = q[..., :width] if q_spare else q
        b, h, i, _ = q.shape
        if self.dot_written_out(scores=b * max(h, k.shape[1]) * i * k.shape[-2], device=q.device,
                                keys=k.shape[-2], width=width):
            return self._written_out(q_core, k, v, mask=mask, scale=scale, m=m, key_term=term)
        if term is None:
            return self._dot_product(q_core, k, v, mask=mask, scale=scale)
        return self._augmented(q, k, v, mask=mask, scale=scale, m=m, key_term=term, q_spare=q_spare)

    def _augmented(self, q: Tensor, k: Tensor, v: Tensor, *, mask, scale: float, m: float, key_term: Tensor,
                   q_spare: int) -> Tensor:
        """scale (m q.k + t_j) as the dot product m scale (q'.k'), q' = [q, 1], k' = [k, t_j / m]; a key
        term per head on shared keys takes one slot per head (q' one-hot per head). Widths are padded
        to a multiple of 8 (what the fused kernels want); the padding is sliced off the output."""
        b, h, i, e = q.shape
        width, e_v = e - q_spare, v.shape[-1]
        per_head = k.shape[1] == 1 and key_term.shape[1] > 1
        slots = h if per_head else 1
        q_extra = torch.eye(h, dtype=q.dtype, device=q.device) if per_head else q.new_ones((1, 1))
        k_extra = rearrange(key_term, "b h j -> b 1 j h" if per_head else "b h j -> b h j 1").to(k.dtype) / m
        if q_spare >= slots:  # write the slots into q's reserved zero features: no copy of q
            q[..., width:width + slots] = rearrange(q_extra, "h s -> 1 h 1 s")
            total = e
        else:
            total = width + slots + (-(width + slots)) % 8
            q = torch.cat((q[..., :width], rearrange(q_extra, "h s -> 1 h 1 s").expand(b, h, i, -1),
                           q.new_zeros(()).expand(b, h, i, total - width - slots)), dim=-1)
        k_aug = torch.cat((k, k_extra, k.new_zeros(()).expand(*k.shape[:-1], total - width - slots)), dim=-1)
        if v is k:  # shared kv stays one tensor; the output keeps q's width (see forward)
            return self._dot_product(q, k_aug, k_aug, mask=mask, scale=m * scale)[..., :e]
        return self._dot_product(q, k_aug, F.pad(v, (0, total - e_v)), mask=mask, scale=m * scale)[..., :e_v]

    def _dot_product(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float) -> Tensor:
        """softmax(scale q.k) v on SDPA; shared keys take the heads as query rows."""
        b, h, i, _ = q.shape
        shared = k.shape[1] == 1 and h > 1
        if shared:
            q = rearrange(q, "b h i e -> b 1 (h i) e")
        out = self._sdpa(q, k, v, mask=_key_mask(mask), scale=scale)
        return out.view(b, h, i, v.shape[-1]) if shared else out

    def _written_out(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float, m: float = 1.0,
                     key_term: Tensor | None = None, tied: bool = False, sum_heads: bool = False) -> Tensor:
        """softmax(scale (m q.k + key_term_j)) v, key_term (b h j) or (b 1 j), written out. tied (k is q,
        L2): the scores are q q^T (one-GEMM backward) and -|k_j|^2 is added from its diagonal.
        sum_heads: sum_h attn_h v_h (b i e_v), as attn (b i (h j)) @ v (b (h j) e_v)."""
        self.last_kernel = "einsum"
        b, h, i, _ = q.shape
        j = k.shape[-2]
        rows = "b h i e -> b 1 (h i) e"
        if tied:
            sim = _SelfGram.apply(q)
            sim = m * sim - rearrange(torch.diagonal(sim, dim1=-2, dim2=-1), "b h j -> b h 1 j")
        else:
            keys_as = rows if k.shape[1] == 1 and h > 1 else "b h i e -> b h i e"
            sim = torch.matmul(rearrange(q, keys_as), k.transpose(-1, -2)).view(b, h, i, j)
            if m != 1.0:
                sim = m * sim
        if key_term is not None:
            sim = sim + rearrange(key_term, "b h j -> b h 1 j")
        sim = sim * scale
        mask = _key_mask(mask)
        if mask is not None:
            sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
        attn = sim.softmax(dim=-1).to(v.dtype)
        if sum_heads:  # the attention map is small (b h i j): its copy to (b i (h j)) costs little
            return _SumHeads.apply(attn, v)
        values_as = rows if v.shape[1] == 1 and h > 1 else "b h i e -> b h i e"
        attn = rearrange(attn, values_as)
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
