"""VN-Transformer (Assaad et al. 2022) with the public API of the ``VN-transformer`` package.

Axes: b batch, n points, c coordinate axis (dim_coor, plus dim_feat with early fusion), d channels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from einops import rearrange
from torch import Tensor, nn

from vnt.attend import BACKENDS, DEFAULT_SDPA_KERNELS, L2_WRITTEN_OUT_MAX_SCORES, Backend, resolve_backend
from vnt.layers import RELU_K_NORM_FLOOR, VNLayerNorm, VNLinear, VNTransformerEncoder


# the paper's (and the original package's) VN-LayerNorm and VN-ReLU: VNTransformer(..., **PAPER_NORMS)
PAPER_NORMS = {"norm_subtract_mean": True, "relu_k_norm_floor": 0.0}


@dataclass(frozen=True)
class VNTransformerConfig:
    """Every hyper-parameter of a VNTransformer, resolved: checkpoints and reports record this, and
    the blocks take it (``vnt.layers``). The original package's ``l2_dist_attn`` / ``flash_attn`` are
    resolved into ``attn_backend`` at the public edge (``VNTransformer``, ``from_dict``, ``vnt.compat``)."""

    dim: int                              # channels of every VN feature
    depth: int                            # encoder layers
    num_tokens: int | None = None         # token ids as feats: embedding size (dim_feat wide)
    dim_feat: int | None = None           # early fusion: feature channels joined to the coordinates
    dim_head: int = 64                    # channels per attention head
    heads: int = 8                        # attention heads
    dim_coor: int = 3                     # width of the coordinates
    reduce_dim_out: bool = True           # project the channels back to one vector per point
    bias_epsilon: float = 0.0             # norm of the VN linear biases: epsilon-approximate equivariance
    translation_equivariance: bool = False  # centre the input, add the centre back to the output
    translation_invariant: bool = False   # centre the input only
    attn_backend: Backend = "math"        # attention: sdpa is the original's flash_attn, l2 its l2_dist_attn
    sdpa_kernels: tuple[str, ...] = DEFAULT_SDPA_KERNELS  # SDPA kernels to try, in order
    l2_written_out_max_scores: int = L2_WRITTEN_OUT_MAX_SCORES  # l2 on a CPU: written out up to b*h*n*n scores
    attn_fold: bool | None = None         # folded (multi-query) attention; None: when dim <= dim_head
    ff_mult: float = 4                    # feed-forward hidden width / dim
    relu_negative_slope: float = 0.0      # VN-LeakyReLU slope
    relu_k_norm_floor: float = RELU_K_NORM_FLOOR  # VNReLU; 0: the exact projection for every k (paper)
    norm_subtract_mean: bool = False      # VNLayerNorm; True: the paper's (discontinuous) VN-LayerNorm
    final_norm: bool = False              # a VN layer norm after the last layer

    def __post_init__(self):
        for name in ("dim", "depth", "dim_head", "heads", "dim_coor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.translation_equivariance and self.translation_invariant:
            raise ValueError("translation_equivariance and translation_invariant are mutually exclusive")
        if self.bias_epsilon < 0:
            raise ValueError(f"bias_epsilon must be >= 0, got {self.bias_epsilon}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {self.attn_backend!r}")
        if int(self.l2_written_out_max_scores) < 0:
            raise ValueError(f"l2_written_out_max_scores must be >= 0, got {self.l2_written_out_max_scores}")
        if self.attn_fold not in (None, True, False):
            raise ValueError(f"attn_fold must be None (automatic), True or False, got {self.attn_fold!r}")
        if self.num_tokens is not None and self.dim_feat is None:
            object.__setattr__(self, "dim_feat", self.dim)  # token embeddings are dim_feat wide
        object.__setattr__(self, "sdpa_kernels", tuple(self.sdpa_kernels))

    @property
    def dim_coor_total(self) -> int:
        return self.dim_coor + (self.dim_feat or 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VNTransformerConfig":
        """From ``to_dict`` output, or a dict with the original's ``flash_attn`` / ``l2_dist_attn``
        (configs written before they were resolved into ``attn_backend``)."""
        d = dict(d)
        flags = {k: bool(d.pop(k, False)) for k in ("flash_attn", "l2_dist_attn")}
        if any(flags.values()) or d.get("attn_backend") is None:
            d["attn_backend"] = resolve_backend(attn_backend=d.get("attn_backend"), **flags)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown VNTransformerConfig keys: {sorted(unknown)}")
        return cls(**d)


def centered(coors: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(coors - center, center): the center is the mean of each sample's own valid points; padding
    stays zero. coors (b, n, ..., 3), mask (b, n) or None."""
    if mask is None:
        center = coors.flatten(1, -2).mean(dim=1)
    else:
        valid = mask.reshape(*mask.shape, *([1] * (coors.ndim - 2))).to(coors.dtype)
        points = valid.expand(*coors.shape[:-1], 1).flatten(1, -2).sum(dim=1)
        center = (coors * valid).flatten(1, -2).sum(dim=1) / points.clamp(min=1)
    center = center.reshape(coors.shape[0], *([1] * (coors.ndim - 2)), coors.shape[-1])
    out = coors - center
    if mask is not None:
        out = out.masked_fill(~mask.reshape(*mask.shape, *([1] * (coors.ndim - 2))), 0.0)
    return out, center


class VNTransformer(nn.Module):
    """Drop-in replacement for ``VN_transformer.VNTransformer``.

    forward(coors (b, n, dim_coor), *, feats=None, mask=None) -> coors_out, or (coors_out, feats_out)
    when feats are given. ``feats`` are floats (b, n, dim_feat), fused early as extra coordinate
    components, or token ids (b, n) with ``num_tokens``. The original's ``flash_attn`` /
    ``l2_dist_attn`` are resolved here into ``attn_backend``; every other keyword is a
    ``VNTransformerConfig`` field.
    """

    # forward passes proj_in's weights to the first attention layer (``VNLinear.factors``): a ZeRO-3
    # trainer gathers them for this module's forward (vnt.train registers them as external parameters)
    uses_child_weights = ("proj_in",)

    def __init__(self, *, dim: int, depth: int, flash_attn: bool = False, l2_dist_attn: bool = False,
                 attn_backend: str | None = None, **kwargs):
        super().__init__()
        backend = resolve_backend(attn_backend=attn_backend, flash_attn=flash_attn, l2_dist_attn=l2_dist_attn)
        self._build(VNTransformerConfig(dim=dim, depth=depth, attn_backend=backend, **kwargs))

    @classmethod
    def from_config(cls, cfg: VNTransformerConfig) -> "VNTransformer":
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._build(cfg)
        return model

    def _build(self, cfg: VNTransformerConfig) -> None:
        self.config = cfg
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim_feat) if cfg.num_tokens is not None else None
        self.proj_in = VNLinear(1, cfg.dim, bias_epsilon=cfg.bias_epsilon)
        self.encoder = VNTransformerEncoder(cfg)
        if cfg.reduce_dim_out:
            self.out_norm = VNLayerNorm(cfg.dim, subtract_mean=cfg.norm_subtract_mean)
            self.proj_out = VNLinear(cfg.dim, 1, bias_epsilon=cfg.bias_epsilon)

    def _check_inputs(self, coors: Tensor, feats: Tensor | None, mask: Tensor | None) -> None:
        cfg = self.config
        if coors.ndim != 3 or coors.shape[-1] != cfg.dim_coor:
            raise ValueError(f"coors must have shape (batch, points, {cfg.dim_coor}), got {tuple(coors.shape)}")
        if not coors.is_floating_point():
            raise ValueError(f"coors must be a floating point tensor, got dtype {coors.dtype}")
        b, n = coors.shape[:2]
        if feats is not None:
            if feats.is_floating_point():
                if cfg.dim_feat is None:
                    raise ValueError("feats were given but the model was built without dim_feat")
                if feats.shape != (b, n, cfg.dim_feat):
                    raise ValueError(f"float feats must have shape (batch, points, dim_feat) = "
                                     f"{(b, n, cfg.dim_feat)}, got {tuple(feats.shape)}")
            elif feats.dtype in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
                if self.token_emb is None:
                    raise ValueError("integer feats are token ids: build the model with num_tokens=... "
                                     "(and dim_feat for the embedding width)")
                if feats.shape != (b, n):
                    raise ValueError(f"token ids must have shape (batch, points) = {(b, n)}, got {tuple(feats.shape)}")
            else:
                raise ValueError(f"feats must be float features or integer token ids, got dtype {feats.dtype}")
        if cfg.dim_feat is not None and feats is None:
            raise ValueError(f"the model was built with dim_feat={cfg.dim_feat}: pass feats of shape "
                             f"(batch, points, {cfg.dim_feat}) or token ids (batch, points)")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor (True = valid point), got dtype {mask.dtype}")
            if mask.shape != (b, n):
                raise ValueError(f"mask must have shape (batch, points) = {(b, n)}, got {tuple(mask.shape)}")

    def forward(self, coors: Tensor, *, feats: Tensor | None = None, mask: Tensor | None = None,
                return_concatted_coors_and_feats: bool = False):
        self._check_inputs(coors, feats, mask)
        cfg = self.config
        valid = None if mask is None else rearrange(mask, "b n -> b n 1")
        if valid is not None:
            coors = coors.masked_fill(~valid, 0.0)  # garbage (even NaN) in padding never reaches the model

        center = None
        if cfg.translation_equivariance or cfg.translation_invariant:
            coors, center = centered(coors, mask)

        x = coors
        if feats is not None:
            if not feats.is_floating_point():
                feats = self.token_emb(feats.long())
            feats = feats.to(coors.dtype)
            if valid is not None:
                feats = feats.masked_fill(~valid, 0.0)
            x = torch.cat((x, feats), dim=-1)

        s = rearrange(x, "b n c -> b n c 1")
        x = self.encoder(self.proj_in(s), mask=mask, factors=self.proj_in.factors(s))

        if cfg.reduce_dim_out:
            x = rearrange(self.proj_out(self.out_norm(x)), "b n c 1 -> b n c")
        else:
            x = rearrange(x, "b n c d -> b n d c")  # the original's (b, n, dim, c) output layout

        coors_out, feats_out = x[..., :cfg.dim_coor], x[..., cfg.dim_coor:]
        if cfg.translation_equivariance:
            coors_out = coors_out + (center if cfg.reduce_dim_out else rearrange(center, "b 1 c -> b 1 1 c"))
        if feats is None:
            return coors_out
        if return_concatted_coors_and_feats:
            return torch.cat((coors_out, feats_out), dim=-1)
        return coors_out, feats_out
