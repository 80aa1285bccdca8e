"""Vector Neuron building blocks: the reference model, read like the papers.

Layout: every VN feature is a tensor ``(..., c, d)`` with the coordinate axis ``c`` ahead of the
channel axis ``d`` (the original package used ``(..., d, c)``). With channels last, every VN linear
map is one ``F.linear`` GEMM over a contiguous buffer, and its epsilon bias is that GEMM's bias.

Axes: b batch, n points, m latents, h heads, c coordinate axis (3, or 3 + dim_feat with early
fusion), d channels.

A rotation acts on ``c``; every op here either mixes only ``d`` (linear maps) or reduces ``c`` with
an inner product (norms, projections), hence is equivariant.

Each block takes its own sizes as keywords. Where a faster form of the same function exists it is
one named call into ``vnt.fast`` (the speed layer), whose tests compare it with the formula here.
``vnt.VNLinear`` etc. (``vnt.compat``) wrap these blocks in the original package's ``(..., d, c)``
layout and keywords; the encoder and the model are in ``vnt.model``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vnt import fast
from vnt.fast import Attend

# VNReLU's default k_norm_floor (its docstring says why); the model config and every block take it from here
RELU_K_NORM_FLOOR = 0.2

def _fan_in_normal_(weight: Tensor, fan_in: int) -> Tensor:
    """N(0, 1/fan_in): keeps activations O(1) through depth (the original used unscaled randn)."""
    with torch.no_grad():
        return weight.normal_(0.0, 1.0 / math.sqrt(fan_in))


def check_features(x: Tensor, dim: int, block: str, *, ndim: int | None = None) -> None:
    """ValueError unless x is VN features (..., coordinate axis, dim channels): the original
    package's blocks took (..., channels, coordinate axis), so a switched caller learns it here."""
    if (ndim is not None and x.ndim != ndim) or x.ndim < 2 or x.shape[-1] != dim:
        lead = "batch, points, " if ndim == 4 else "..., "
        raise ValueError(f"{block} expects VN features of shape ({lead}coordinate axis, {dim}) with the channels "
                         f"last (the original package put them before the coordinate axis), got {tuple(x.shape)}")


class VNLinear(nn.Module):
    """(..., c, dim_in) -> (..., c, dim_out). ``bias_epsilon > 0`` adds a bias of norm epsilon to
    every coordinate component (the paper's epsilon-approximate equivariance). A VNLinear that fuses
    ``maps`` linear maps (stacked rows, e.g. attention's q, k, v) normalises each map's bias on its
    own: every map's bias has norm epsilon, as if they were separate layers."""

    def __init__(self, dim_in: int, dim_out: int, *, bias_epsilon: float = 0.0, maps: int = 1):
        super().__init__()
        if bias_epsilon < 0:
            raise ValueError(f"bias_epsilon must be >= 0, got {bias_epsilon}")
        if dim_out % maps:
            raise ValueError(f"dim_out {dim_out} does not split into {maps} maps")
        self.weight = nn.Parameter(_fan_in_normal_(torch.empty(dim_out, dim_in), dim_in))
        self.bias_epsilon = bias_epsilon
        self.maps = maps
        self.bias = nn.Parameter(torch.randn(dim_out)) if bias_epsilon > 0 else None

    def effective_bias(self) -> Tensor | None:
        if self.bias is None:
            return None
        return (F.normalize(self.bias.view(self.maps, -1), dim=-1) * self.bias_epsilon).view(-1)

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, self.weight.shape[1], "VNLinear")
        return F.linear(x, self.weight, self.effective_bias())

    def split(self, x: Tensor, parts: int) -> tuple[Tensor, ...]:
        """Same as ``self(x).chunk(parts, dim=-1)``, computed as ``parts`` GEMMs."""
        bias = self.effective_bias()
        weights = self.weight.chunk(parts, dim=0)
        biases = bias.chunk(parts) if bias is not None else (None,) * parts
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))


class VNReLU(nn.Module):
    """Vector Neuron (leaky) ReLU on (..., c, d).

    q = W x, k = U x (one fused GEMM). Where <q, k> < 0, q is replaced by its projection onto the
    plane orthogonal to k: q - <q, k/|k|> k/|k|. ``negative_slope`` alpha mixes in q itself:
    out = alpha q + (1 - alpha) relu_vn(q, k)  (Deng et al. 2021, eq. 8).

    ``k_norm_floor`` rho: a k shorter than rho times the RMS norm of its point's k vectors (over the
    d channels) projects as if it had that length, q - <q, k> k / (rho^2 mean_d |k_d|^2). The
    projection direction k/|k| of a near-zero k is rounding noise, and the exact map jumps from q to
    its projection as k passes through zero; with the floor the map is continuous at k = 0 and its
    sensitivity to k's direction is bounded by 1/rho, while every k of at least that length (~99%
    of them at rho = 0.2 for isotropic 3-vectors) gets the exact projection, orthogonal to k.
    ``k_norm_floor=0`` is the exact projection everywhere (the Vector Neurons formula).
    """

    def __init__(self, dim: int, *, negative_slope: float = 0.0, k_norm_floor: float = RELU_K_NORM_FLOOR,
                 eps: float = 1e-6):
        super().__init__()
        if not 0.0 <= negative_slope < 1.0:
            raise ValueError(f"negative_slope must be in [0, 1), got {negative_slope}")
        if not 0.0 <= k_norm_floor < 1.0:
            raise ValueError(f"k_norm_floor must be in [0, 1), got {k_norm_floor}")
        self.dim = dim
        self.negative_slope = negative_slope
        self.k_norm_floor = k_norm_floor
        self.eps = eps
        self.weight = nn.Parameter(_fan_in_normal_(torch.empty(2 * dim, dim), dim))  # [W; U]

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, self.dim, "VNReLU")
        return self.activate(F.linear(x, self.weight))

    def activate(self, qk: Tensor) -> Tensor:
        """The nonlinearity on already-projected [q | k] (..., c, 2d) -> (..., c, d)."""
        return fast.vn_relu(qk, negative_slope=self.negative_slope, k_norm_floor=self.k_norm_floor, eps=self.eps)


class VNLayerNorm(nn.Module):
    """Normalisation of the per-channel vector norms; directions are kept. (..., c, d).

    Default (``subtract_mean=False``): x_d gamma_d / sqrt(mean_d |x_d|^2), an RMS norm over the d
    channel norms of a point. It is continuous in x: a short channel vector stays short.
    ``subtract_mean=True`` is the paper's VN-LayerNorm, x_d / |x_d| LayerNorm(|x_1|, ..., |x_D|)
    (the original package's): it gives every channel a unit-order length whatever its own, so a
    channel vector near zero comes out unit-order along its direction, which is rounding noise; the
    map is discontinuous at the zero vector and amplifies float32 rounding by up to (typical norm /
    shortest norm) per layer (README, "Numerics").
    """

    def __init__(self, dim: int, *, subtract_mean: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.subtract_mean = subtract_mean
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, *, residual: Tensor | None = None) -> Tensor:
        """The norm of x, plus ``residual`` (same shape) when given: with the RMS norm on a CPU, that sum
        runs fused with the norm where the plan allows (``vnt.fast.rms_norm_residual``)."""
        check_features(x, self.gamma.shape[0], "VNLayerNorm")
        if residual is None:
            return self._norm(x)
        if residual.shape != x.shape:
            raise ValueError(f"VNLayerNorm: residual must have the shape of x, {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        if not self.subtract_mean:
            fused = fast.rms_norm_residual(x, residual, self.gamma, self.eps)
            if fused is not None:
                return fused
        return self._norm(x) + residual

    def _norm(self, x: Tensor) -> Tensor:
        sq = torch.linalg.vecdot(x, x, dim=-2).unsqueeze(-2)            # (..., 1, d)
        if not self.subtract_mean:
            return x * (self.gamma * torch.rsqrt(sq.mean(dim=-1, keepdim=True) + self.eps ** 2))
        # smooth norm: finite gradient at the zero vector (padding, empty samples); the layer norm's
        # own eps is F.layer_norm's default, as in the original package
        norms = (sq + self.eps ** 2).sqrt()
        normed = F.layer_norm(norms, norms.shape[-1:], self.gamma, None)
        return x * (normed / norms)


class VNFeedForward(nn.Module):
    """VNLinear -> VNReLU -> VNLinear, hidden width ``dim * mult``.

    The VN-ReLU's own maps [W; U] act right after the first VNLinear L, so forward applies the
    composed map [W; U] L (and bias [W; U] b) in one GEMM: the same function and parameters (the
    gradients reach L, W and U through the product), with 2*dim instead of dim + 2*dim_inner
    multiply-adds per hidden unit (``vnt.fast.ones_column_linear``).
    """

    def __init__(self, dim: int, *, mult: float = 4, bias_epsilon: float = 0.0, relu_negative_slope: float = 0.0,
                 relu_k_norm_floor: float = RELU_K_NORM_FLOOR):
        super().__init__()
        dim_inner = int(dim * mult)
        self.proj_in = VNLinear(dim, dim_inner, bias_epsilon=bias_epsilon)
        self.act = VNReLU(dim_inner, negative_slope=relu_negative_slope, k_norm_floor=relu_k_norm_floor)
        self.proj_out = VNLinear(dim_inner, dim, bias_epsilon=bias_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, self.proj_in.weight.shape[1], "VNFeedForward")
        weight = self.act.weight @ self.proj_in.weight           # (2 dim_inner, dim)
        bias = self.proj_in.effective_bias()
        if bias is not None:
            bias = self.act.weight @ bias
        return self.proj_out(self.act.activate(fast.ones_column_linear(x, weight, bias)))


class VNWeightedPool(nn.Module):
    """Masked mean over points, then ``num_pooled_tokens`` learned VN maps.
    (b, n, c, d) -> (b, m, c, dim_out), or (b, c, dim_out) when one token is pooled and squeezed."""

    def __init__(self, dim: int, *, dim_out: int | None = None, num_pooled_tokens: int = 1,
                 squeeze_out_pooled_dim: bool = True):
        super().__init__()
        dim_out = dim_out or dim
        self.num_pooled_tokens = num_pooled_tokens
        self.weight = nn.Parameter(_fan_in_normal_(torch.empty(num_pooled_tokens * dim_out, dim), dim))
        self.squeeze = num_pooled_tokens == 1 and squeeze_out_pooled_dim

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        check_features(x, self.weight.shape[1], "VNWeightedPool", ndim=4)
        if mask is None:
            pooled = x.mean(dim=1)
        else:
            w = rearrange(mask, "b n -> b n 1 1").to(x.dtype)
            pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        out = rearrange(F.linear(pooled, self.weight), "b c (m e) -> b m c e", m=self.num_pooled_tokens)
        return out[:, 0] if self.squeeze else out


class VNAttention(nn.Module):
    """Rotation-equivariant multi-head attention on (b, n, c, d).

    q, k, v come from one fused projection (``to_qkv``; q and v when L2 attention ties the keys to
    the queries); each head attends over the flattened (c, dim_head) features, whose inner products
    are rotation invariant. ``num_latents`` turns it into perceiver-style cross attention from pooled
    latents (b, m, c, d) to the sequence. ``backend``: "math", "sdpa", "l2" or "l2_math" (``Attend``).

    ``dim_coor`` is c, the width of the coordinate axis (3, or 3 + dim_feat with early fusion). It
    sets the initial scale of L2 attention's tied query/key map: a point's squared distance to itself
    is 0 and to another point about 2 e var(q), e = c * dim_head, so at fan-in scale the softmax
    (scale e^-1/2) favours each point itself by about 2 sqrt(e) nats (saturated: a near-identity map
    whose gradients vanish). The tied map starts at (2 sqrt(e))^-1/2 times the fan-in scale, which
    makes that margin about one nat for unit-variance features.

    Self attention runs folded where the kernel plan says (``vnt.fast.folds``; by default where
    dim <= dim_head): the same function with the projections folded into the queries and the output
    map (``vnt.fast.folded_attention``; docs/design.md).
    """

    def __init__(self, dim: int, *, dim_head: int = 64, heads: int = 8, dim_coor: int = 3, bias_epsilon: float = 0.0,
                 backend: str = "math", num_latents: int | None = None):
        super().__init__()
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        dim_inner = dim_head * heads
        self.attend = Attend(backend=backend)
        self.to_latents = (VNWeightedPool(dim, num_pooled_tokens=num_latents, squeeze_out_pooled_dim=False)
                           if num_latents is not None else None)
        self.tied_qk = backend in ("l2", "l2_math") and num_latents is None  # L2 self attention: keys = queries
        if num_latents is None:
            parts = 2 if self.tied_qk else 3
            self.to_qkv = VNLinear(dim, parts * dim_inner, bias_epsilon=bias_epsilon, maps=parts)
            if self.tied_qk:  # see the class docstring: the self-distance must not saturate the softmax
                with torch.no_grad():
                    self.to_qkv.weight[:dim_inner].mul_((2 * math.sqrt(dim_coor * dim_head)) ** -0.5)
        else:
            self.to_q = VNLinear(dim, dim_inner, bias_epsilon=bias_epsilon)
            self.to_kv = VNLinear(dim, 2 * dim_inner, bias_epsilon=bias_epsilon, maps=2)
        self.to_out = VNLinear(dim_inner, dim, bias_epsilon=bias_epsilon)

    def folded_maps(self) -> dict:
        """What ``vnt.fast.folded_attention`` needs of this layer (self attention only)."""
        return dict(attend=self.attend, heads=self.heads, dim_head=self.dim_head, tied=self.tied_qk,
                    qkv_weight=self.to_qkv.weight, qkv_bias=self.to_qkv.effective_bias(),
                    out_weight=self.to_out.weight, out_bias=self.to_out.effective_bias())

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """x (b, n, c, dim), mask (b, n) bool (True = valid) -> (b, n, c, dim), or (b, m, c, dim) with latents."""
        check_features(x, self.dim, "VNAttention", ndim=4)
        if self.to_latents is None and fast.folds(dim=self.dim, dim_head=self.dim_head):
            return fast.folded_attention(x, mask=mask, **self.folded_maps())
        # q, k, v share one parameter tensor; each is its own GEMM on a weight slice so that the
        # backward pass accumulates into grad x instead of concatenating three large gradients
        split = "b n c (h d) -> b h n (c d)"
        if self.to_latents is None:
            qkv = self.to_qkv.split(x, 2 if self.tied_qk else 3)
            q, k, v = (qkv[0], None, qkv[1]) if self.tied_qk else qkv
        else:
            q = self.to_q(self.to_latents(x, mask=mask))
            k, v = self.to_kv.split(x, 2)
        q, v = (rearrange(t, split, h=self.heads) for t in (q, v))
        if self.tied_qk:
            out = self.attend.tied_l2(q, v, mask=mask)
        else:
            out = self.attend(q, rearrange(k, split, h=self.heads), v, mask=mask)
        return self.to_out(rearrange(out, "b h n (c d) -> b n c (h d)", c=x.shape[-2]))

class VNInvariant(nn.Module):
    """Rotation-invariant features per point and channel: (b, n, c, d) -> (b, n, d, dim_coor).

    A learned equivariant frame F (c x dim_coor) per point; x^T F is invariant because both rotate
    together. (The original summed the channels away and returned dim_coor numbers per point.)
    """

    def __init__(self, dim: int, *, dim_coor: int = 3):
        super().__init__()
        self.frame = nn.Sequential(VNLinear(dim, dim_coor), VNReLU(dim_coor))

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, self.frame[0].weight.shape[1], "VNInvariant", ndim=4)
        return torch.einsum("b n c d, b n c o -> b n d o", x, self.frame(x))
