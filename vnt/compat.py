"""The original ``VN-transformer`` package's building blocks, in its layout and with its keywords.

``from VN_transformer import VNAttention`` -> ``from vnt import VNAttention``: these blocks take and
return the original's ``(..., channels, coordinate axis)`` features, with its constructor keywords
and defaults, and keep vnt's fixes (README, "Differences"). Each is vnt's channels-last block
(``vnt.layers``, ``vnt.model``, which ``VNTransformer`` uses inside) with one transpose in and one out; the
original's keywords are resolved here, once, into the block's own keywords.

``from_original_state_dict`` maps weights saved from the original package onto these blocks (or
onto ``VNTransformer``): ``block.load_state_dict(from_original_state_dict(original.state_dict()))``.

Axes: b batch, n points, m latents, c coordinate axis, d channels.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from einops import rearrange
from torch import Tensor

from vnt import layers, model
from vnt.fast import resolve_backend
from vnt.layers import RELU_K_NORM_FLOOR
from vnt.model import VNTransformerConfig

__all__ = ["VNLinear", "VNReLU", "VNLayerNorm", "VNFeedForward", "VNAttention", "VNWeightedPool",
           "VNTransformerEncoder", "VNInvariant", "from_original_state_dict"]


def _ours(x: Tensor, dim: int, block: str, *, ndim: int | None = None) -> Tensor:
    """(..., d, c) -> (..., c, d), or ValueError naming the expected (original) layout."""
    if (ndim is not None and x.ndim != ndim) or x.ndim < 2 or x.shape[-2] != dim:
        lead = "batch, points, " if ndim == 4 else "..., "
        raise ValueError(f"{block} expects features of shape ({lead}{dim}, coordinate axis), the original "
                         f"package's layout (vnt.layers.{block} takes the channels last), got {tuple(x.shape)}")
    return x.transpose(-1, -2)


def _theirs(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


class VNLinear(layers.VNLinear):
    """(..., dim_in, c) -> (..., dim_out, c); ``bias_epsilon > 0`` adds a bias of norm epsilon."""

    def __init__(self, dim_in: int, dim_out: int, bias_epsilon: float = 0.0):
        super().__init__(dim_in, dim_out, bias_epsilon=bias_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return _theirs(super().forward(_ours(x, self.weight.shape[1], "VNLinear")))


class VNReLU(layers.VNReLU):
    """(..., d, c) -> (..., d, c): the Vector Neurons ReLU (README difference 1; ``k_norm_floor``, 10)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, negative_slope: float = 0.0,
                 k_norm_floor: float = RELU_K_NORM_FLOOR):
        super().__init__(dim, negative_slope=negative_slope, k_norm_floor=k_norm_floor, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return _theirs(super().forward(_ours(x, self.dim, "VNReLU")))


class VNLayerNorm(layers.VNLayerNorm):
    """(..., d, c) -> (..., d, c). ``subtract_mean=True`` is the paper's and the original's map
    (README difference 10)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, subtract_mean: bool = False):
        super().__init__(dim, subtract_mean=subtract_mean, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return _theirs(super().forward(_ours(x, self.gamma.shape[0], "VNLayerNorm")))


class VNFeedForward(layers.VNFeedForward):
    """(..., dim, c) -> (..., dim, c): VNLinear -> VNReLU -> VNLinear (the original returned an
    ``nn.Sequential`` of the three; ``from_original_state_dict`` maps its weights)."""

    def __init__(self, dim: int, mult: float = 4, bias_epsilon: float = 0.0, *, relu_negative_slope: float = 0.0,
                 relu_k_norm_floor: float = RELU_K_NORM_FLOOR):
        super().__init__(dim, mult=mult, bias_epsilon=bias_epsilon, relu_negative_slope=relu_negative_slope,
                         relu_k_norm_floor=relu_k_norm_floor)

    def forward(self, x: Tensor) -> Tensor:
        return _theirs(super().forward(_ours(x, self.proj_in.weight.shape[1], "VNFeedForward")))


class VNAttention(layers.VNAttention):
    """(b, n, dim, c) -> (b, n, dim, c), or (b, num_latents, dim, c) with perceiver-style latents.

    The original's keywords; ``flash`` / ``l2_dist_attn`` mean ``attn_backend="sdpa"`` / ``"l2"``
    (vnt's own keyword ``attn_backend`` names any backend).
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, dim_coor: int = 3, bias_epsilon: float = 0.0,
                 l2_dist_attn: bool = False, flash: bool = False, num_latents: int | None = None, *,
                 attn_backend: str | None = None):
        super().__init__(dim, dim_head=dim_head, heads=heads, dim_coor=dim_coor, bias_epsilon=bias_epsilon,
                         backend=resolve_backend(attn_backend=attn_backend, flash_attn=flash, l2_dist_attn=l2_dist_attn),
                         num_latents=num_latents)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return _theirs(super().forward(_ours(x, self.dim, "VNAttention", ndim=4), mask=mask))


class VNWeightedPool(layers.VNWeightedPool):
    """(b, n, dim, c) -> (b, num_pooled_tokens, dim_out, c), or (b, dim_out, c) when one token is
    pooled and squeezed."""

    def __init__(self, dim: int, dim_out: int | None = None, num_pooled_tokens: int = 1,
                 squeeze_out_pooled_dim: bool = True):
        super().__init__(dim, dim_out=dim_out, num_pooled_tokens=num_pooled_tokens,
                         squeeze_out_pooled_dim=squeeze_out_pooled_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return _theirs(super().forward(_ours(x, self.weight.shape[1], "VNWeightedPool", ndim=4), mask=mask))


class VNTransformerEncoder(model.VNTransformerEncoder):
    """(b, n, dim, dim_coor) -> (b, n, dim, dim_coor). The original's keywords; vnt's model options
    (``attn_backend``, ``relu_k_norm_floor``, ``norm_subtract_mean``, ...) as further keywords."""

    def __init__(self, dim: int, *, depth: int, dim_head: int = 64, heads: int = 8, dim_coor: int = 3,
                 ff_mult: float = 4, final_norm: bool = False, bias_epsilon: float = 0.0, l2_dist_attn: bool = False,
                 flash_attn: bool = False, attn_backend: str | None = None, **options):
        super().__init__(VNTransformerConfig(
            dim=dim, depth=depth, dim_head=dim_head, heads=heads, dim_coor=dim_coor, ff_mult=ff_mult,
            final_norm=final_norm, bias_epsilon=bias_epsilon,
            attn_backend=resolve_backend(attn_backend=attn_backend, flash_attn=flash_attn, l2_dist_attn=l2_dist_attn),
            **options))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[-2:] != (self.dim, self.dim_coor):
            raise ValueError(f"VNTransformerEncoder expects x of shape (batch, points, dim, dim_coor) = "
                             f"(batch, points, {self.dim}, {self.dim_coor}), got {tuple(x.shape)}")
        return _theirs(super().forward(x.transpose(-1, -2), mask=mask))


class VNInvariant(layers.VNInvariant):
    """(b, n, dim, c) -> (b, n, dim, dim_coor): invariants per channel (README difference 3; the
    original returned their sum over the channels, (b, n, dim_coor): ``.sum(dim=-2)``)."""

    def __init__(self, dim: int, dim_coor: int = 3):
        super().__init__(dim, dim_coor=dim_coor)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(_ours(x, self.frame[0].weight.shape[1], "VNInvariant", ndim=4))


# ------------------------------------------------------------------------------------------------
# weights trained with the original package


def from_original_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The original package's parameters, renamed and fused the way vnt stores them.

    Works on the state dict of a ``VN_transformer`` ``VNTransformer`` or of any of its blocks; load
    the result into the vnt module of the same configuration. The mapping:

    - attention ``to_q``, ``to_k``, ``to_v`` -> one ``to_qkv`` (rows q, k, v; q, v when L2 attention
      ties k to q); with latents ``to_q`` stays and ``to_k``, ``to_v`` -> ``to_kv``; ``to_q_input``
      (m, d, e) -> ``to_latents`` ((m e), d); the same for biases;
    - VN-ReLU ``W``, ``U`` -> ``weight`` = [W; U];
    - the feed-forward ``nn.Sequential`` ``0``, ``1``, ``2`` -> ``proj_in``, ``act``, ``proj_out``;
    - VN layer norm ``ln.gamma`` -> ``gamma`` (its ``ln.beta`` is a zero buffer and is dropped);
    - ``VNWeightedPool.weight`` (m, d, e) -> ((m e), d);
    - ``VNTransformer``: ``vn_proj_in.1`` -> ``encoder.proj_in``, ``vn_proj_out.0`` -> ``out_norm``,
      ``vn_proj_out.1`` -> ``proj_out``; ``VNInvariant``: ``mlp`` -> ``frame``.
    """
    sd = dict(state_dict)
    out: dict[str, Tensor] = {}
    for key in sorted(k for k in sd if k.endswith("to_q.weight")):
        p = key[: -len("to_q.weight")]
        latents = f"{p}to_q_input.weight" in sd
        tied = not latents and torch.equal(sd[f"{p}to_q.weight"], sd[f"{p}to_k.weight"])
        for kind in ("weight", "bias"):
            q, k, v = (sd.pop(f"{p}to_{t}.{kind}", None) for t in "qkv")
            if q is None:
                continue
            if latents:
                out[f"{p}to_q.{kind}"], out[f"{p}to_kv.{kind}"] = q, torch.cat((k, v))
            else:
                out[f"{p}to_qkv.{kind}"] = torch.cat((q, v) if tied else (q, k, v))
        if latents:
            out[f"{p}to_latents.weight"] = rearrange(sd.pop(f"{p}to_q_input.weight"), "m d e -> (m e) d")
    for key in sorted(k for k in sd if k.endswith("W") and (k == "W" or k.endswith(".W"))):
        p = key[:-1]
        out[f"{p}weight"] = torch.cat((sd.pop(key), sd.pop(f"{p}U")))
    for key, value in sd.items():
        if key.endswith("ln.beta"):
            if value.abs().max() > 0:
                raise ValueError(f"{key} is not zero; vnt's VN layer norm has no beta")
            continue
        if value.ndim == 3 and key.endswith("weight"):  # VNWeightedPool (m, d, e)
            value = rearrange(value, "m d e -> (m e) d")
        out[key] = value
    renamed = {}
    for key, value in out.items():
        key = re.sub(r"(^|\.)ln\.gamma$", r"\1gamma", key)
        key = re.sub(r"^vn_proj_in\.1\.", "encoder.proj_in.", key)
        key = re.sub(r"^vn_proj_out\.0\.", "out_norm.", key)
        key = re.sub(r"^vn_proj_out\.1\.", "proj_out.", key)
        key = re.sub(r"^mlp\.", "frame.", key)
        # the feed-forward Sequential: in an encoder layer (slot 2) or on its own
        key = re.sub(r"(^|layers\.\d+\.2\.)0\.", r"\1proj_in.", key)
        key = re.sub(r"(^|layers\.\d+\.2\.)1\.", r"\1act.", key)
        key = re.sub(r"(^|layers\.\d+\.2\.)2\.", r"\1proj_out.", key)
        renamed[key] = value
    return renamed
