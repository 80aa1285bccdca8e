"""Folded (multi-query) self attention: VNAttention's function with its projections folded into
the queries and the output map. The derivation is in docs/design.md ("Folded attention").

Axes: b batch, n points, c coordinate axis, d channels, h heads, e head channels, p fused maps.

With per-head maps Wq, Wk, Wv (dim_head x dim), Wo (dim x dim_head) and epsilon biases,
    q_i . k_j = sum_c x_ic (Wq^T Wk) x_jc + (Wk^T bq) . s_j + (terms constant along j),
    Wo (sum_j a_ij (Wv x_j + bv)) + bo = (Wo Wv) sum_j a_ij x_j + (Wo bv + bo),
with s_j = sum_c x_jc: keys and values are x itself, shared by every head, and each head needs two
(dim x dim) maps computed from the weights per call. For L2 attention the tied biases cancel.

A low-rank input (``embed=(w, b)``: the layer's input is s @ w^T + b, with s the narrow input of the
encoder's input embedding) composes w and b into the maps and runs on s itself.

Tied L2 attention with 2 dim_head < 3 dim runs written out instead (``Attend.tied_l2``): q = Wq x and
y = (Wo Wv) x per head, head-major (``head_linear``), scores q q^T, every head's attention summed
over y in one GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vnt.fast import plan
from vnt.fast.attend import Attend
from vnt.fast.ops import head_linear


def folds(*, dim: int, dim_head: int) -> bool:
    """Whether self attention over ``dim`` channels runs folded under the current plan: where its
    inner products over (c, dim) are no wider than the projected form's (c, dim_head)."""
    fold = plan.current().fold
    return dim <= dim_head if fold is None else fold


def folds_low_rank(*, rank: int, dim_head: int) -> bool:
    """Whether self attention on a rank-``rank`` input runs folded on its factor (unless the plan
    turns folding off)."""
    return plan.current().fold is not False and rank <= dim_head


def folded_attention(x: Tensor, *, attend: Attend, heads: int, dim_head: int, tied: bool, qkv_weight: Tensor,
                     qkv_bias: Tensor | None, out_weight: Tensor, out_bias: Tensor | None,
                     mask: Tensor | None = None, embed: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
    """VNAttention's output for input x (b, n, c, d), or for the input x @ w^T + b when
    ``embed=(w, b)`` (then d = w's columns). ``qkv_weight`` / ``qkv_bias``: the fused projection's rows
    (q, k, v, or q, v when ``tied``) and epsilon biases; ``out_weight`` / ``out_bias`` the output map's."""
    b, n, c, d = x.shape
    h, parts = heads, 2 if tied else 3
    w_qkv, bias = qkv_weight, qkv_bias
    if embed is not None:
        w_in, b_in = embed
        if b_in is not None:
            bias = w_qkv @ b_in if bias is None else bias + w_qkv @ b_in
        w_qkv = w_qkv @ w_in
    w = rearrange(w_qkv, "(p h e) d -> p h e d", h=h, p=parts)
    w_q, w_k, w_v = (w[0], w[0], w[1]) if tied else w
    w_o = rearrange(out_weight, "d (h e) -> h e d", h=h)
    dim = w_o.shape[-1]
    # tied L2 written out: the scores q q^T with q = Wq x, when cheaper than the folded x (Wq^T Wq) x^T:
    # 2 dim_head < 3 d (per score, the folded form runs 3 GEMMs of width d on the key side, this one 2 of dim_head)
    written_out = tied and 2 * dim_head < 3 * d and attend.tied_written_out(scores=b * h * n * n, device=x.device)
    qk_map = None if written_out else w_q.transpose(-1, -2) @ w_k     # (h, d, d): q.k = (x qk_map) . x
    vo_map = w_v.transpose(-1, -2) @ w_o                              # (h, d, dim): x vo_map = Wo Wv x
    key_bias = k_sq = None
    if bias is not None:
        per_map = rearrange(bias, "(p h e) -> p h e", h=h, p=parts)
        b_q, b_v = (per_map[0], per_map[1]) if tied else (per_map[0], per_map[2])
        if not tied:  # (Wk^T bq) . s_j per head; the other bias terms are constant along j
            u = torch.einsum("h e, h e d -> h d", b_q, w_k)
            key_bias = rearrange(x.sum(dim=-2) @ u.transpose(0, 1), "b n h -> b h n")
        out_bias = torch.einsum("h e, h e d -> d", b_v, w_o) + (0 if out_bias is None else out_bias)
    if written_out:  # q and y = Wo Wv x written head-major; the heads' attention summed over y in one GEMM
        xs = rearrange(x, "b n c d -> b (n c) d")
        q = head_linear(xs, w_q.transpose(-1, -2)).view(b, h, n, c * dim_head)
        y = head_linear(xs, vo_map).view(b, h, n, c * dim)
        out = attend.tied_l2(q, y, mask=mask, scale=(c * dim_head) ** -0.5, sum_heads=True).view(b, n, c, dim)
        return out if out_bias is None else out + out_bias
    if tied:  # L2 attention: |q_j|^2 = sum_c x_jc qk_map x_jc = <qk_map, x_j^T x_j>, per head
        gram = torch.matmul(x.transpose(-1, -2), x)                   # (b, n, d, d)
        k_sq = rearrange(F.linear(rearrange(gram, "b n d e -> b n (d e)"),
                                  rearrange(qk_map, "h d e -> h (d e)")), "b n h -> b h n")
    # r extra coordinate rows (zero in x, hence zero in q) leave Attend room for its augmentation
    # slots, so q is not copied; (c + r) d a multiple of 8 for the fused kernels
    slots = attend.augment_slots(heads=h, key_term=key_bias is not None, scores=b * h * n * n, device=x.device,
                                 keys=n, width=c * d)
    r = next(r for r in range(1, slots + 9) if r * d >= slots and (c + r) * d % 8 == 0) if slots else 0
    q_map = rearrange(qk_map, "h d e -> d (h e)")
    # every head's map in one GEMM (one x, all heads' columns), then heads outer for the kernel: a
    # broadcast batched matmul would copy x per head and run h thin GEMMs instead
    x_rows = rearrange(F.pad(x, (0, 0, 0, r)) if r else x, "b n c d -> (b n c) d")
    q = rearrange(x_rows @ q_map, "(b n c) (h e) -> b h n (c e)", b=b, c=c + r, h=h).contiguous()
    kv = rearrange(x, "b n c d -> b 1 n (c d)")
    out = attend(q, kv, kv, mask=mask, scale=(c * dim_head) ** -0.5, key_bias=key_bias, k_sq=k_sq,
                 q_spare=r * d)                                       # (b, h, n, (c + r) d): r spare rows
    # the output maps of all heads, summed over heads, as one GEMM over (head, channel) columns
    out = rearrange(out, "b h n (c d) -> b n c (h d)", c=c + r).contiguous() @ rearrange(vo_map, "h d e -> (h d) e")
    out = out[:, :, :c]
    return out if out_bias is None else out + out_bias
