"""Vector Neuron building blocks.

Layout: every VN feature is a tensor ``(..., c, d)`` with the coordinate axis ``c`` ahead of the
channel axis ``d`` (the original package used ``(..., d, c)``). With channels last, every VN linear
map is one ``F.linear`` GEMM over a contiguous buffer, and its epsilon bias is that GEMM's bias.

Axes: b batch, n points, m latents, h heads, c coordinate axis (3, or 3 + dim_feat with early
fusion), d channels.

A rotation acts on ``c``; every op here either mixes only ``d`` (linear maps) or reduces ``c`` with
an inner product (norms, projections), hence is equivariant.

These are vnt's fast blocks; ``vnt.VNLinear`` etc. (``vnt.compat``) wrap them in the original
package's ``(..., d, c)`` layout and keywords. The composite blocks (``VNFeedForward``,
``VNAttention``, ``VNTransformerEncoder``) take the resolved model config (``VNTransformerConfig``,
or any object with its fields), the way nanoGPT's blocks take ``config``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vnt import kernels
from vnt.attend import Attend

if TYPE_CHECKING:
    from vnt.model import VNTransformerConfig


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

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x, weight, bias): ``self(x)`` in factored form, for a block that can run on the narrower x
        (``VNAttention``'s ``factors``). A module that passes them on from its forward reads this
        layer's weights outside its forward: under ZeRO-3 it lists it in ``uses_child_weights``."""
        return x, self.weight, self.effective_bias()

    def split(self, x: Tensor, parts: int) -> tuple[Tensor, ...]:
        """Same as ``self(x).chunk(parts, dim=-1)``, computed as ``parts`` GEMMs."""
        bias = self.effective_bias()
        weights = self.weight.chunk(parts, dim=0)
        biases = bias.chunk(parts) if bias is not None else (None,) * parts
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))


class _OnesColumnLinear(torch.autograd.Function):
    """x (m, k) @ w^T + b as one GEMM over [x | 1] and [w | b] (k + 1 columns), with dw computed as
    (x^T g)^T.

    What it saves over ``F.linear`` on a CPU, for a wide output (the feed-forward's 2 dim_inner columns):
    addmm writes the broadcast bias into the output and then reads it back, and the bias gradient is
    one more pass over g. Here the bias rides in the GEMM (the ones column: a copy of x, which is
    narrow) and its gradient is the last row of [x | 1]^T g. Autograd's dw = g^T x (rows = output
    width) runs slower in MKL than its transpose x^T g (rows = input width). Measured with the
    feed-forward's shapes (17152 x 64 -> 512, forward+backward, in isolation): 20.4 -> 15.9 ms with a
    bias, 16.0 -> 15.2 ms without. Without autocast (``ones_column_linear`` takes F.linear there)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.has_bias = b is not None
        if b is None:
            ctx.save_for_backward(x, w)
            return torch.mm(x, w.t())
        xa = x.new_empty((x.shape[0], x.shape[1] + 1))
        xa[:, :-1] = x
        xa[:, -1] = 1.0
        ctx.save_for_backward(xa, w)
        return torch.mm(xa, torch.cat((w, b[:, None]), dim=1).t())

    @staticmethod
    def backward(ctx, g: Tensor):
        xa, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, w)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            dwa = torch.mm(xa.t(), g).t()      # (out, k [+ 1]): the bias gradient is the ones column's
            dw = dwa[:, :w.shape[1]]
            db = dwa[:, -1] if ctx.has_bias else None
        return dx, dw, db


def ones_column_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for x (..., k), computed by ``_OnesColumnLinear`` on a CPU without
    autocast (the same function; F.linear elsewhere)."""
    if x.device.type != "cpu" or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    out = _OnesColumnLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class _HeadLinear(torch.autograd.Function):
    """x (b, m, d) @ w (h, d, e) -> (b, h, m, e): every head's map of the same x, written head-major.

    One GEMM x @ [w_1 | ... | w_h] writes (b, m, h, e), and attention then needs a copy to (b, h, m, e)
    (and its backward another one back): per head, per sample GEMMs write the head-major layout
    directly, and the backward reads it in place, dx = sum_h g_h w_h^T (accumulated GEMMs) and
    dw_h = sum_b x_b^T g_bh. Without autocast (head_linear takes the broadcast matmul under autocast)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.w_dtype = w.dtype
        w = w.to(x.dtype)
        ctx.save_for_backward(x, w)
        b, m, _ = x.shape
        out = x.new_empty((b, w.shape[0], m, w.shape[-1]))
        for i in range(b):  # the heads share x_i: a stride-0 batch, no copy
            torch.bmm(x[i].expand(w.shape[0], -1, -1), w, out=out[i])
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx = sum_h g_h w_h^T, one batched GEMM over samples per head, accumulated
            dx = x.new_empty(x.shape)
            g_heads = g.unbind(1)
            w_t = [w_h.expand(g.shape[0], -1, -1) for w_h in w.transpose(-1, -2).unbind(0)]
            torch.bmm(g_heads[0], w_t[0], out=dx)
            for g_h, w_h in zip(g_heads[1:], w_t[1:]):
                torch.baddbmm(dx, g_h, w_h, out=dx)
        if ctx.needs_input_grad[1]:  # dw_h = sum_i x_i^T g_ih, every head in one batched GEMM per sample
            dw = w.new_zeros(w.shape)
            for x_i, g_i in zip(x.unbind(0), g.unbind(0)):
                torch.baddbmm(dw, x_i.transpose(0, 1).expand(w.shape[0], -1, -1), g_i, out=dw)
            dw = dw.to(ctx.w_dtype)
        return dx, dw


def head_linear(x: Tensor, weight: Tensor) -> Tensor:
    """(b, m, d) x (h, d, e) -> (b, h, m, e), head-major without a layout copy (see _HeadLinear)."""
    if x.ndim != 3 or weight.ndim != 3 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"head_linear expects x (batch, rows, d) and weight (heads, d, e) with the same d, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        # autocast (bf16/fp16): one GEMM over every head's columns on the library's low-precision kernels
        # (oneDNN/AMX on a CPU), then the head-major copy, which 16-bit storage halves; its backward sums
        # the heads inside one GEMM, where _HeadLinear's per-head accumulation would round to 16 bits per head
        out = x @ rearrange(weight, "h d e -> d (h e)")
        return rearrange(out, "b m (h e) -> b h m e", h=weight.shape[0]).contiguous()
    return _HeadLinear.apply(x.contiguous(), weight)


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
        return _VNReLUActivation.apply(qk, self.negative_slope, self.k_norm_floor, self.eps)


def _relu_denominators(k_sq: Tensor, k_norm_floor: float, eps: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """VN-ReLU's projection denominators from |k|^2 (..., 1, d): den = max(|k|^2, rho^2 mean_d |k_d|^2)
    (or |k|^2 without a floor), den_c = den clamped at eps^2, and the floor (None without one)."""
    floor = k_sq.mean(dim=-1, keepdim=True) * k_norm_floor ** 2 if k_norm_floor > 0 else None
    den = k_sq if floor is None else torch.maximum(k_sq, floor)
    return den, den.clamp(min=eps ** 2), floor


def _relu_small_grads(g_k_dot: Tensor, dot: Tensor, k_sq: Tensor, coef: Tensor, negative_slope: float,
                      k_norm_floor: float, eps: float) -> tuple[Tensor, Tensor]:
    """The (..., 1, d) factors of VN-ReLU's gradient, from g_k_dot = sum_c g k: d/d<q, k> and d/d|k|^2."""
    den, den_c, floor = _relu_denominators(k_sq, k_norm_floor, eps)
    g_dot = -g_k_dot * (1.0 - negative_slope) * (dot < 0) / den_c
    g_den = g_k_dot * coef / den_c * (den > eps ** 2)
    if floor is None:
        return g_dot, g_den
    below = k_sq < floor  # den = max(k_sq, rho^2 mean_d k_sq)
    return g_dot, g_den * ~below + (g_den * below).sum(dim=-1, keepdim=True) * k_norm_floor ** 2 / k_sq.shape[-1]


def _relu_coef(dot: Tensor, k_sq: Tensor, negative_slope: float, k_norm_floor: float, eps: float) -> Tensor:
    """out = q - coef k: coef = (1 - alpha) min(<q, k>, 0) / den_c, 0 where <q, k> >= 0."""
    return dot.clamp(max=0.0) / _relu_denominators(k_sq, k_norm_floor, eps)[1] * (1.0 - negative_slope)


def _relu_forward_plain(qk: Tensor, negative_slope: float, k_norm_floor: float, eps: float):
    """VN-ReLU forward on (points, c, 2d) in plain ops, what ``vnt.kernels`` compiles into one reduction
    and one elementwise pass: (out, <q, k>, |k|^2, coef)."""
    q, k = qk.chunk(2, dim=-1)
    dot, k_sq = (q * k).sum(dim=-2, keepdim=True), (k * k).sum(dim=-2, keepdim=True)
    coef = _relu_coef(dot, k_sq, negative_slope, k_norm_floor, eps)
    return q - coef * k, dot, k_sq, coef


def _relu_backward_plain(g: Tensor, qk: Tensor, dot: Tensor, k_sq: Tensor, coef: Tensor, negative_slope: float,
                         k_norm_floor: float, eps: float) -> Tensor:
    """The gradient of [q | k] in plain ops (compiled by ``vnt.kernels``; traced under torch.compile)."""
    q, k = qk.chunk(2, dim=-1)
    g_dot, g_k_sq = _relu_small_grads((g * k).sum(dim=-2, keepdim=True), dot, k_sq, coef, negative_slope,
                                      k_norm_floor, eps)
    return torch.cat((g + g_dot * k, g_dot * q - coef * g + 2 * g_k_sq * k), dim=-1)


def _points(t: Tensor) -> Tensor:
    """(..., c, e) -> (points, c, e), detached from any view base (which the compiler would guard on):
    no size-1 batch axis for the fused kernels to specialise on, so new batch sizes do not recompile."""
    return t.detach().reshape(-1, *t.shape[-2:]).detach()


_relu_forward_fused = kernels.Fused(_relu_forward_plain, "VN-ReLU forward")
_relu_backward_fused = kernels.Fused(_relu_backward_plain, "VN-ReLU backward")


class _VNReLUActivation(torch.autograd.Function):
    """VNReLU.activate with a hand-written backward: out = q - coef k, coef = (1 - alpha)
    min(<q, k>, 0) / max(|k|^2, rho^2 mean_d |k_d|^2, eps^2), reductions over c.

    On a CPU in float32/float64, from ``vnt.kernels.MIN_NUMEL`` elements of [q | k] on, the forward
    and backward run as fused kernels (``vnt.kernels``: one reduction and one elementwise pass each).
    Otherwise every pass over the (..., c, d) tensors is a fused reduction or multiply-add
    (torch.linalg.vecdot, addcmul) and the gradient of [q | k] is written in place: about half the
    memory traffic of autograd through the written-out products. All three are the same function
    (tests compare them, values and gradients)."""

    @staticmethod
    def forward(ctx, qk: Tensor, negative_slope: float, k_norm_floor: float, eps: float) -> Tensor:
        ctx.constants = (negative_slope, k_norm_floor, eps)
        ctx.fused = kernels.usable(qk)
        if ctx.fused:
            out, dot, k_sq, coef = _relu_forward_fused(_points(qk), negative_slope, k_norm_floor, eps)
            dot, k_sq, coef = (t.view(*qk.shape[:-2], 1, -1) for t in (dot, k_sq, coef))
            ctx.save_for_backward(qk, dot, k_sq, coef)
            return out.view(*qk.shape[:-1], out.shape[-1])
        q, k = qk.chunk(2, dim=-1)
        dot = torch.linalg.vecdot(q, k, dim=-2).unsqueeze(-2)         # (..., 1, d)
        k_sq = torch.linalg.vecdot(k, k, dim=-2).unsqueeze(-2)
        coef = _relu_coef(dot, k_sq, negative_slope, k_norm_floor, eps)
        ctx.save_for_backward(qk, dot, k_sq, coef)
        return torch.addcmul(q, coef, k, value=-1.0)

    @staticmethod
    def backward(ctx, g: Tensor):
        qk, dot, k_sq, coef = ctx.saved_tensors
        if ctx.fused and kernels.usable(g, min_numel=0):
            grad = _relu_backward_fused(*(_points(t) for t in (g, qk, dot, k_sq, coef)), *ctx.constants)
            return grad.view(qk.shape), None, None, None
        if torch.compiler.is_compiling():  # a trace takes no out= into strided halves; the compiler fuses instead
            return _relu_backward_plain(g, qk, dot, k_sq, coef, *ctx.constants), None, None, None
        q, k = qk.chunk(2, dim=-1)
        g_dot, g_k_sq = _relu_small_grads(torch.linalg.vecdot(g, k, dim=-2).unsqueeze(-2), dot, k_sq, coef,
                                          *ctx.constants)
        grad = torch.empty_like(qk)
        g_q, g_k = grad.chunk(2, dim=-1)
        torch.addcmul(g, g_dot, k, out=g_q)                              # d/dq: g + g_dot k
        torch.mul(g, -coef, out=g_k)                                     # d/dk: -coef g + g_dot q + 2 g_k_sq k
        g_k.addcmul_(g_dot, q).addcmul_(2 * g_k_sq, k)
        return grad, None, None, None


def _rms_norm_residual_plain(a: Tensor, res: Tensor, gamma: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """res + VNLayerNorm(a) (the RMS norm) on (points, c, d) in plain ops, what ``vnt.kernels`` compiles into
    one reduction and one elementwise pass: (out, r), r = 1 / sqrt(mean_d |a_d|^2 + eps^2) per point."""
    r = torch.rsqrt((a * a).sum(dim=(-2, -1), keepdim=True) / a.shape[-1] + eps * eps)
    return res + a * (gamma * r), r


def _rms_norm_backward_plain(g: Tensor, a: Tensor, gamma: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of a and gamma of a gamma r (dr/da = -r^3 a / d), on (points, c, d)."""
    t = (g * a * gamma).sum(dim=(-2, -1), keepdim=True)
    return g * (gamma * r) - a * (t * r ** 3 / a.shape[-1]), (g * a * r).sum(dim=(0, 1))


_rms_norm_residual_fused = kernels.Fused(_rms_norm_residual_plain, "VN layer norm + residual")
_rms_norm_backward_fused = kernels.Fused(_rms_norm_backward_plain, "VN layer norm backward")


class _RMSNormResidual(torch.autograd.Function):
    """res + a gamma r as fused CPU kernels (forward: one reduction and one elementwise pass; backward the
    same, plus gamma's reduction): eager autograd runs about ten passes over (..., c, d) for the norm and
    the residual sum. Measured at the README example (2 x 128 x 67 x 64, forward+backward, in isolation):
    2.46 -> 1.91 ms; at n 512: 5.19 -> 3.45 ms."""

    @staticmethod
    def forward(ctx, a: Tensor, res: Tensor, gamma: Tensor, eps: float) -> Tensor:
        a_pts = _points(a)
        out, r = _rms_norm_residual_fused(a_pts, _points(res), gamma.detach(), eps)
        ctx.save_for_backward(a_pts, gamma, r)
        return out.view(a.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        a_pts, gamma, r = ctx.saved_tensors
        d_a, d_gamma = _rms_norm_backward_fused(_points(g), a_pts, gamma.detach(), r)
        return d_a.view(g.shape), g, d_gamma.to(gamma.dtype), None


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
        """The norm of x, plus ``residual`` (same shape) when given: with the RMS norm on a CPU, from
        ``vnt.kernels.MIN_NUMEL`` elements, that sum runs fused with the norm (``_RMSNormResidual``)."""
        check_features(x, self.gamma.shape[0], "VNLayerNorm")
        if residual is None:
            return self._norm(x)
        if residual.shape != x.shape:
            raise ValueError(f"VNLayerNorm: residual must have the shape of x, {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        if not self.subtract_mean and kernels.usable(x, residual, self.gamma) and residual.dtype == x.dtype:
            return _RMSNormResidual.apply(x, residual, self.gamma, self.eps)
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
    """VNLinear -> VNReLU -> VNLinear, hidden width ``dim * ff_mult``.

    The VN-ReLU's own maps [W; U] act right after the first VNLinear L, so forward applies the
    composed map [W; U] L (and bias [W; U] b) in one GEMM: the same function and parameters (the
    gradients reach L, W and U through the product), with 2*dim instead of dim + 2*dim_inner
    multiply-adds per hidden unit. That GEMM is ``ones_column_linear`` (the bias rides in it as a ones
    column of x: no broadcast copy of the bias into the wide output, no extra pass for its gradient).
    """

    # forward computes with its children's weights, not only through their forward: a ZeRO-3
    # trainer gathers them for this module (vnt.train registers them as external parameters)
    uses_child_weights = True

    def __init__(self, cfg: "VNTransformerConfig"):
        super().__init__()
        dim_inner = int(cfg.dim * cfg.ff_mult)
        self.proj_in = VNLinear(cfg.dim, dim_inner, bias_epsilon=cfg.bias_epsilon)
        self.act = VNReLU(dim_inner, negative_slope=cfg.relu_negative_slope, k_norm_floor=cfg.relu_k_norm_floor)
        self.proj_out = VNLinear(dim_inner, cfg.dim, bias_epsilon=cfg.bias_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, self.proj_in.weight.shape[1], "VNFeedForward")
        weight = self.act.weight @ self.proj_in.weight           # (2 dim_inner, dim)
        bias = self.proj_in.effective_bias()
        if bias is not None:
            bias = self.act.weight @ bias
        return self.proj_out(self.act.activate(ones_column_linear(x, weight, bias)))


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

    q, k, v come from one fused projection; each head attends over the flattened (c, d_head)
    features, whose inner products are rotation invariant. ``num_latents`` turns it into
    perceiver-style cross attention from pooled latents (b, m, c, d) to the sequence.

    ``cfg.dim_coor_total`` is c, the width of the coordinate axis (3, or 3 + dim_feat with early
    fusion). It sets the initial scale of L2 attention's tied query/key map: a point's squared
    distance to itself is 0 and to another point about 2 e var(q), e = c * dim_head, so at fan-in
    scale the softmax (scale e^-1/2) favours each point itself by about 2 sqrt(e) nats (tens:
    saturated, a near-identity map whose outputs stay parallel and whose gradients vanish). The
    tied map starts at (2 sqrt(e))^-1/2 times the fan-in scale, which makes that margin about one
    nat for unit-variance features.

    Folded form (self attention, ``dim <= dim_head``; same parameters, same function): with per-head
    maps Wq, Wk, Wv (dim_head x dim), Wo (dim x dim_head) and epsilon biases bq, bk, bv, bo (added to
    every coordinate component),
        q_i . k_j = sum_c x_ic (Wq^T Wk) x_jc + (Wk^T bq) . s_j + (terms constant along j),
        Wo (sum_j a_ij (Wv x_j + bv)) + bo = (Wo Wv) sum_j a_ij x_j + (Wo bv + bo),
    with s_j = sum_c x_jc (the bias term that breaks equivariance) and sum_j a_ij = 1. So each head
    needs two (dim x dim) maps computed from the weights per call, a key bias (Attend's key term)
    and a constant; keys and values are x itself, shared by every head. That skips the key and
    output projections and all head split/merge copies; the attention's inner products run over
    (c, dim) instead of (c, dim_head) features, hence the ``dim <= dim_head`` condition. For L2
    attention the tied biases cancel in |q_i - q_j|^2. ``cfg.attn_fold=False`` forces the projected
    form (tests compare the two).

    Low-rank input (``forward(x, factors=(s, w, b))``, x = s w^T + b): the models' first layer gets
    ``proj_in``'s output, whose r input channels (1 for VNTransformer: the coordinates and fused
    features are one channel; 4 for the residue denoiser's atoms) make x rank r over the channels.
    With w and b composed into to_qkv's maps and bias, the folded form runs on s itself: inner
    products over c * r features instead of c * dim_head, an output map of (h r) x dim, so the first
    layer's attention costs about r / dim_head of a later one's. Same function and parameters (tested
    against the projected form with the other layers); ``attn_fold=False`` switches it off too.

    Tied L2 attention written out (``Attend.tied_written_out``, and 2 dim_head < 3 dim) skips the fold
    of the queries: q = Wq x and y = (Wo Wv) x are written head-major per head (``head_linear``), the
    scores are q q^T, and Attend sums every head's attention over y in one GEMM (``sum_heads``): no
    copy between the (c, h d) channel layout and the head-major one, forward or backward.
    """

    uses_child_weights = True  # the folded maps and VNLinear.split read to_qkv / to_out weights (see VNFeedForward)

    def __init__(self, cfg: "VNTransformerConfig", *, num_latents: int | None = None):
        super().__init__()
        dim, dim_head, heads, c = cfg.dim, cfg.dim_head, cfg.heads, cfg.dim_coor_total
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        dim_inner = dim_head * heads
        if cfg.attn_fold and num_latents is not None:
            raise ValueError("attn_fold=True needs self attention (num_latents=None)")
        self.fold = num_latents is None and (dim <= dim_head if cfg.attn_fold is None else cfg.attn_fold)
        # a low-rank input (``factors``): folded on its factor whatever dim, unless the fold is switched off
        self.fold_factors = num_latents is None and cfg.attn_fold is not False
        self.last_input_rank: int | None = None   # the factor rank the latest forward ran on (None: x itself)
        self.attend = Attend(backend=cfg.attn_backend, sdpa_kernels=cfg.sdpa_kernels,
                             l2_written_out_max_scores=cfg.l2_written_out_max_scores)
        self.to_latents = (VNWeightedPool(dim, num_pooled_tokens=num_latents, squeeze_out_pooled_dim=False)
                           if num_latents is not None else None)
        # L2-distance attention ties queries to keys (self attention only)
        self.tied_qk = cfg.attn_backend in ("l2", "l2_math") and num_latents is None
        eps = cfg.bias_epsilon
        if num_latents is None:
            parts = 2 if self.tied_qk else 3
            self.to_qkv = VNLinear(dim, parts * dim_inner, bias_epsilon=eps, maps=parts)
            if self.tied_qk:  # see the class docstring: the self-distance must not saturate the softmax
                with torch.no_grad():
                    self.to_qkv.weight[:dim_inner].mul_((2 * math.sqrt(c * dim_head)) ** -0.5)
        else:
            self.to_q = VNLinear(dim, dim_inner, bias_epsilon=eps)
            self.to_kv = VNLinear(dim, 2 * dim_inner, bias_epsilon=eps, maps=2)
        self.to_out = VNLinear(dim_inner, dim, bias_epsilon=eps)

    def forward(self, x: Tensor, *, mask: Tensor | None = None,
                factors: tuple[Tensor, Tensor, Tensor | None] | None = None) -> Tensor:
        """x (b, n, c, dim). ``factors`` = (s, w, bias) says that x = s @ w^T + bias, with s (b, n, c, r),
        w (dim, r), bias (dim,) or None: a rank-r embedding (the model's ``proj_in`` output, r = its input
        channels). Self attention then runs folded on s, with the maps composed with w and the bias
        folded into theirs: the same function, on features r/dim as wide (see the class docstring)."""
        check_features(x, self.dim, "VNAttention", ndim=4)
        self.last_input_rank = None
        if factors is not None and self.fold_factors:
            s, w_in, b_in = factors
            r = w_in.shape[-1]
            if s.shape != (*x.shape[:-1], r) or w_in.shape != (self.dim, r) or (b_in is not None and b_in.shape != (self.dim,)):
                raise ValueError(f"VNAttention factors must be s (batch, points, coordinate axis, r), w ({self.dim}, r) "
                                 f"and bias ({self.dim},) or None for x {tuple(x.shape)}, got s {tuple(s.shape)}, "
                                 f"w {tuple(w_in.shape)}, bias {None if b_in is None else tuple(b_in.shape)}")
            if r <= self.dim_head:
                self.last_input_rank = r
                return self._forward_folded(s, mask=mask, w_in=w_in, b_in=b_in)
        if self.fold:
            return self._forward_folded(x, mask=mask)
        # q, k, v share one parameter tensor; each is its own GEMM on a weight slice so that the
        # backward pass accumulates into grad x instead of concatenating three large gradients
        split = "b n c (h d) -> b h n (c d)"
        if self.to_latents is None:
            qkv = self.to_qkv.split(x, 2 if self.tied_qk else 3)
            q, k, v = (qkv[0], qkv[0], qkv[1]) if self.tied_qk else qkv
        else:
            q = self.to_q(self.to_latents(x, mask=mask))
            k, v = self.to_kv.split(x, 2)
        if self.tied_qk:  # one tensor: Attend sees that the keys are the queries (k is q)
            q, v = (rearrange(t, split, h=self.heads) for t in (q, v))
            k = q
        else:
            q, k, v = (rearrange(t, split, h=self.heads) for t in (q, k, v))
        c = x.shape[-2]
        out = self.attend(q, k, v, mask=mask)
        return self.to_out(rearrange(out, "b h n (c d) -> b n c (h d)", c=c))

    def _forward_folded(self, x: Tensor, *, mask: Tensor | None, w_in: Tensor | None = None,
                        b_in: Tensor | None = None) -> Tensor:
        """The folded form on x (b, n, c, d); with w_in (dim, d) and b_in, on the factor x of the input
        x @ w_in^T + b_in: to_qkv's map and bias composed with them."""
        b, n, c, d = x.shape
        h, parts = self.heads, 2 if self.tied_qk else 3
        w_qkv, bias = self.to_qkv.weight, self.to_qkv.effective_bias()
        if w_in is not None:
            if b_in is not None:
                bias = w_qkv @ b_in if bias is None else bias + w_qkv @ b_in
            w_qkv = w_qkv @ w_in
        w = rearrange(w_qkv, "(p h e) d -> p h e d", h=h, p=parts)
        w_q, w_k, w_v = (w[0], w[0], w[1]) if self.tied_qk else w
        w_o = rearrange(self.to_out.weight, "d (h e) -> h e d", h=h)
        # tied L2 attention written out: the scores are q q^T with q = Wq x itself (Attend runs their
        # backward as one GEMM), when that is cheaper than the folded x (Wq^T Wq) x^T: 2 dim_head < 3 dim
        # (per score, the folded form runs 3 GEMMs of width dim on the key side, this one 2 of dim_head)
        tied = (self.tied_qk and 2 * self.dim_head < 3 * d
                and self.attend.tied_written_out(scores=b * h * n * n, device=x.device))
        qk_map = None if tied else w_q.transpose(-1, -2) @ w_k     # (h, d, d): q.k = (x qk_map) . x
        vo_map = w_v.transpose(-1, -2) @ w_o                       # (h, d, d): x vo_map = Wo Wv x
        out_bias = self.to_out.effective_bias()
        key_bias = k_sq = None
        if bias is not None:
            per_map = rearrange(bias, "(p h e) -> p h e", h=h, p=parts)
            b_q, b_v = (per_map[0], per_map[1]) if self.tied_qk else (per_map[0], per_map[2])
            if not self.tied_qk:  # (Wk^T bq) . s_j per head; the other bias terms are constant along j
                u = torch.einsum("h e, h e d -> h d", b_q, w_k)
                key_bias = rearrange(x.sum(dim=-2) @ u.transpose(0, 1), "b n h -> b h n")
            out_bias = torch.einsum("h e, h e d -> d", b_v, w_o) + out_bias
        if tied:  # q = Wq x (the keys are the queries) and y = Wo Wv x per head, both written head-major;
            # Attend sums the heads' attention over y in one GEMM over (head, key): no layout copies
            xs = rearrange(x, "b n c d -> b (n c) d")
            q = head_linear(xs, w_q.transpose(-1, -2)).view(b, h, n, c * self.dim_head)
            y = head_linear(xs, vo_map).view(b, h, n, c * self.dim)
            out = self.attend(q, q, y, mask=mask, scale=(c * self.dim_head) ** -0.5, sum_heads=True).view(b, n, c, self.dim)
            return out if out_bias is None else out + out_bias
        if self.tied_qk:  # L2 attention: |q_j|^2 = sum_c x_jc qk_map x_jc = <qk_map, x_j^T x_j>, per head
            gram = torch.matmul(x.transpose(-1, -2), x)               # (b, n, d, d)
            k_sq = rearrange(F.linear(rearrange(gram, "b n d e -> b n (d e)"),
                                      rearrange(qk_map, "h d e -> h (d e)")), "b n h -> b h n")
        # r extra coordinate rows (zero in x, hence zero in q) leave Attend room for its augmentation
        # slots, so q is not copied; (c + r) d a multiple of 8 for the fused kernels
        slots = self.attend.augment_slots(heads=h, key_term=key_bias is not None)
        r = next(r for r in range(1, slots + 9) if r * d >= slots and (c + r) * d % 8 == 0) if slots else 0
        q_map = rearrange(qk_map, "h d e -> d (h e)")
        # every head's map in one GEMM (one x, all heads' columns), then heads outer for the kernel: a
        # broadcast batched matmul would copy x per head and run h thin GEMMs instead
        x_rows = rearrange(F.pad(x, (0, 0, 0, r)) if r else x, "b n c d -> (b n c) d")
        q = rearrange(x_rows @ q_map, "(b n c) (h e) -> b h n (c e)", b=b, c=c + r, h=h).contiguous()
        kv = rearrange(x, "b n c d -> b 1 n (c d)")
        out = self.attend(q, kv, kv, mask=mask, scale=(c * self.dim_head) ** -0.5, key_bias=key_bias,
                          k_sq=k_sq, q_spare=r * d)                 # (b, h, n, (c + r) d): r spare rows
        # the output maps of all heads, summed over heads, as one GEMM over (head, channel) columns
        out = rearrange(out, "b h n (c d) -> b n c (h d)", c=c + r).contiguous() @ rearrange(vo_map, "h d e -> (h d) e")
        out = out[:, :, :c]
        return out if out_bias is None else out + out_bias


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


class VNTransformerEncoder(nn.Module):
    """depth x [x + LN(attn(x)), x + LN(ff(x))] on (b, n, c, d), post-norm as in the original.
    c = ``cfg.dim_coor_total`` (3, or 3 + dim_feat with early fusion)."""

    def __init__(self, cfg: "VNTransformerConfig"):
        super().__init__()
        self.dim, self.dim_coor = cfg.dim, cfg.dim_coor_total
        self.layers = nn.ModuleList([
            nn.ModuleList([
                VNAttention(cfg),
                VNLayerNorm(cfg.dim, subtract_mean=cfg.norm_subtract_mean),
                VNFeedForward(cfg),
                VNLayerNorm(cfg.dim, subtract_mean=cfg.norm_subtract_mean),
            ])
            for _ in range(cfg.depth)
        ])
        self.norm = VNLayerNorm(cfg.dim, subtract_mean=cfg.norm_subtract_mean) if cfg.final_norm else nn.Identity()

    def forward(self, x: Tensor, *, mask: Tensor | None = None,
                factors: tuple[Tensor, Tensor, Tensor | None] | None = None) -> Tensor:
        """``factors`` (s, w, bias): x = s @ w^T + bias, a rank-r embedding; the first attention layer runs
        on s (``VNAttention.forward``). The models pass their ``proj_in`` input and weights."""
        if x.ndim != 4 or x.shape[-2:] != (self.dim_coor, self.dim):
            raise ValueError(f"expected x of shape (batch, points, dim_coor, dim) = (batch, points, {self.dim_coor}, "
                             f"{self.dim}), got {tuple(x.shape)}")
        for k, (attn, attn_norm, ff, ff_norm) in enumerate(self.layers):
            x = attn_norm(attn(x, mask=mask, factors=factors if k == 0 else None), residual=x)
            x = ff_norm(ff(x), residual=x)
        return self.norm(x)

    def attention_kernels(self) -> list[str | None]:
        """The kernel each attention layer ran in its latest forward."""
        return [layer[0].attend.last_kernel for layer in self.layers]
