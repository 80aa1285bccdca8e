"""Custom autograd functions of the speed layer: the same functions as the plain-op formulas they
replace (tests compare values and gradients), with fewer passes or copies.

- ``ones_column_linear``: ``F.linear`` with the bias riding in the GEMM as a ones column.
- ``head_linear``: every head's map of one input, written head-major without a layout copy.
- ``vn_relu``: the VN-ReLU nonlinearity on projected [q | k] with a hand-written backward, on fused
  CPU kernels for large tensors.
- ``rms_norm_residual``: residual + RMS VN layer norm, as fused CPU kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vnt.fast import kernels

class _OnesColumnLinear(torch.autograd.Function):
    """x (m, k) @ w^T + b as one GEMM over [x | 1] and [w | b] (k + 1 columns), with dw computed as
    (x^T g)^T.

    What it saves over ``F.linear`` on a CPU, for a wide output (the feed-forward's 2 dim_inner columns):
    addmm writes the broadcast bias into the output and then reads it back, and the bias gradient is
    one more pass over g. Here the bias rides in the GEMM (the ones column: a copy of x, which is
    narrow) and its gradient is the last row of [x | 1]^T g. Autograd's dw = g^T x (rows = output
    width) runs slower in MKL than its transpose x^T g (rows = input width). Without autocast
    (``ones_column_linear`` takes F.linear there)."""

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

    On a CPU in float32/float64, from the plan's ``fused_min_numel`` elements of [q | k] on, the forward
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
    the residual sum."""

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




def vn_relu(qk: Tensor, *, negative_slope: float, k_norm_floor: float, eps: float) -> Tensor:
    """VN-(leaky) ReLU on projected [q | k] (..., c, 2d) -> (..., c, d) (``vnt.layers.VNReLU``'s
    formula), with the hand-written backward of ``_VNReLUActivation``."""
    return _VNReLUActivation.apply(qk, negative_slope, k_norm_floor, eps)


def rms_norm_residual(x: Tensor, residual: Tensor, gamma: Tensor, eps: float) -> Tensor | None:
    """residual + x gamma / sqrt(mean_d |x_d|^2 + eps^2) on fused CPU kernels, or None where they do
    not apply (then the caller runs its eager formula)."""
    if not (kernels.usable(x, residual, gamma) and residual.dtype == x.dtype):
        return None
    return _RMSNormResidual.apply(x, residual, gamma, eps)
