"""VN-Transformer (Assaad et al. 2022) with the public API of the ``VN-transformer`` package: its
config, the encoder and the model. The blocks are in ``vnt.layers``; the speed layer in ``vnt.fast``.

Axes: b batch, n points, c coordinate axis (dim_coor, plus dim_feat with early fusion), d channels,
r input channels of the encoder's embedding.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vnt import fast
from vnt.fast import BACKENDS, Backend, resolve_backend
from vnt.layers import RELU_K_NORM_FLOOR, VNAttention, VNFeedForward, VNLayerNorm, VNLinear


# the paper's (and the original package's) VN-LayerNorm and VN-ReLU: VNTransformer(..., **PAPER_NORMS)
PAPER_NORMS = {"norm_subtract_mean": True, "relu_k_norm_floor": 0.0}

# fields of configs saved before the kernel plan left the model config (vnt.fast.plan): from_dict
# drops them, since they chose kernels for the same function, not the function
KERNEL_PLAN_KEYS = ("sdpa_kernels", "l2_written_out_max_scores", "attn_fold")


@dataclass(frozen=True)
class VNTransformerConfig:
    """Every hyper-parameter of a VNTransformer, resolved: checkpoints and reports record this. The
    original package's ``l2_dist_attn`` / ``flash_attn`` are resolved into ``attn_backend`` at the
    public edge (``VNTransformer``, ``from_dict``, ``vnt.compat``). How the function is computed (which
    kernels, folded or not) is the kernel plan's (``vnt.fast.configure``), not a field here."""

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
        if self.num_tokens is not None and self.dim_feat is None:
            object.__setattr__(self, "dim_feat", self.dim)  # token embeddings are dim_feat wide

    @property
    def dim_coor_total(self) -> int:
        return self.dim_coor + (self.dim_feat or 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VNTransformerConfig":
        """From ``to_dict`` output, or a dict with the original's ``flash_attn`` / ``l2_dist_attn``
        (configs written before they were resolved into ``attn_backend``). Kernel-plan fields of older
        configs (``KERNEL_PLAN_KEYS``) are dropped."""
        d = {k: v for k, v in d.items() if k not in KERNEL_PLAN_KEYS}
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


class VNTransformerEncoder(nn.Module):
    """depth x [x + LN(attn(x)), x + LN(ff(x))] on (b, n, c, d), post-norm as in the original.

    With ``dim_in`` the encoder also owns the input embedding ``proj_in`` (dim_in -> dim channels)
    and takes its narrow input (b, n, c, dim_in): the first layer's input s w^T + b then has rank
    dim_in over the channels, and its attention runs folded on s (``vnt.fast.folded_attention(...,
    embed=)``, unless the kernel plan turns folding off), the same function at about dim_in /
    dim_head of a later layer's cost.
    """

    def __init__(self, cfg: VNTransformerConfig, *, dim_in: int | None = None):
        super().__init__()
        self.dim, self.dim_coor, self.dim_in = cfg.dim, cfg.dim_coor_total, dim_in
        self.proj_in = VNLinear(dim_in, cfg.dim, bias_epsilon=cfg.bias_epsilon) if dim_in is not None else None
        self.layers = nn.ModuleList([
            nn.ModuleList([
                VNAttention(cfg.dim, dim_head=cfg.dim_head, heads=cfg.heads, dim_coor=cfg.dim_coor_total,
                            bias_epsilon=cfg.bias_epsilon, backend=cfg.attn_backend),
                VNLayerNorm(cfg.dim, subtract_mean=cfg.norm_subtract_mean),
                VNFeedForward(cfg.dim, mult=cfg.ff_mult, bias_epsilon=cfg.bias_epsilon,
                              relu_negative_slope=cfg.relu_negative_slope, relu_k_norm_floor=cfg.relu_k_norm_floor),
                VNLayerNorm(cfg.dim, subtract_mean=cfg.norm_subtract_mean),
            ])
            for _ in range(cfg.depth)
        ])
        self.norm = VNLayerNorm(cfg.dim, subtract_mean=cfg.norm_subtract_mean) if cfg.final_norm else nn.Identity()
        self.checkpointed: frozenset[int] = frozenset()   # checkpoint_layers

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        width = self.dim if self.proj_in is None else self.dim_in
        if x.ndim != 4 or x.shape[-2:] != (self.dim_coor, width):
            raise ValueError(f"expected x of shape (batch, points, dim_coor, {'dim_in' if self.proj_in else 'dim'}) = "
                             f"(batch, points, {self.dim_coor}, {width}), got {tuple(x.shape)}")
        for i in range(len(self.layers)):
            if i in self.checkpointed and torch.is_grad_enabled():
                x = checkpoint(self._recomputed_layer, fast.current(), i, x, mask, use_reentrant=False)
            else:
                x = self._layer(i, x, mask)
        return self.norm(x)

    def _layer(self, i: int, x: Tensor, mask: Tensor | None) -> Tensor:
        """Layer i; layer 0 of an encoder with ``proj_in`` takes the narrow input and embeds it."""
        attn, attn_norm, ff, ff_norm = self.layers[i]
        if i == 0 and self.proj_in is not None:
            s, x = x, self.proj_in(x)
            if fast.folds_low_rank(rank=self.dim_in, dim_head=attn.dim_head):
                a = fast.folded_attention(s, mask=mask, embed=(self.proj_in.weight, self.proj_in.effective_bias()),
                                          **attn.folded_maps())
            else:
                a = attn(x, mask=mask)
        else:
            a = attn(x, mask=mask)
        x = attn_norm(a, residual=x)
        return ff_norm(ff(x), residual=x)

    def _recomputed_layer(self, plan, i: int, x: Tensor, mask: Tensor | None) -> Tensor:
        """Layer i under ``plan``: the backward pass recomputes it with the kernels its forward used."""
        with fast.plan.use(plan):
            return self._layer(i, x, mask)

    def checkpoint_layers(self, layers: Iterable[int] | None = None) -> None:
        """Activation checkpointing: these layers (0-based; None: every layer; empty: none) keep only
        their input for the backward pass and recompute the rest there (``torch.utils.checkpoint``,
        non-reentrant). The same function and gradients, every kernel and folded form included; a
        layer's activations cost one (b, n, c, dim) tensor instead of all its intermediates, for
        about one more forward of compute."""
        chosen = range(len(self.layers)) if layers is None else list(layers)
        bad = [i for i in chosen if not 0 <= int(i) < len(self.layers)]
        if bad:
            raise ValueError(f"checkpoint layers must be in [0, {len(self.layers)}) (the encoder's depth), got {bad}")
        self.checkpointed = frozenset(int(i) for i in chosen)

    def attention_kernels(self) -> list[str | None]:
        """The kernel each attention layer ran in its latest forward."""
        return [layer[0].attend.last_kernel for layer in self.layers]


def zero3_external_parameters(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """(module, parameter) pairs a ZeRO-3 trainer registers as external parameters
    (``deepspeed.zero.register_external_parameter``): ZeRO-3 gathers a module's own parameters for its
    forward, and these modules compute with their children's weights, not only through the
    children's forward (the composed feed-forward map, the folded attention maps, and the encoder's
    first layer folded with its input embedding)."""
    pairs = []
    for module in model.modules():
        if isinstance(module, (VNFeedForward, VNAttention)):
            children = list(module.children())
        elif isinstance(module, VNTransformerEncoder) and module.proj_in is not None:
            children = [module.proj_in, module.layers[0][0]]
        else:
            continue
        pairs += [(module, p) for child in children for p in child.parameters()]
    return pairs


def remap_proj_in(module, state_dict, prefix, *args) -> None:
    """State dicts saved before the encoder owned the input embedding: ``proj_in.*`` -> ``encoder.proj_in.*``."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}proj_in.")]:
        state_dict[f"{prefix}encoder.{key[len(prefix):]}"] = state_dict.pop(key)


class VNTransformer(nn.Module):
    """Drop-in replacement for ``VN_transformer.VNTransformer``.

    forward(coors (b, n, dim_coor), *, feats=None, mask=None) -> coors_out, or (coors_out, feats_out)
    when feats are given. ``feats`` are floats (b, n, dim_feat), fused early as extra coordinate
    components, or token ids (b, n) with ``num_tokens``. The original's ``flash_attn`` /
    ``l2_dist_attn`` are resolved here into ``attn_backend``; every other keyword is a
    ``VNTransformerConfig`` field.
    """

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
        self.encoder = VNTransformerEncoder(cfg, dim_in=1)   # the coordinates and features as one channel
        self._register_load_state_dict_pre_hook(remap_proj_in, with_module=True)
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

        x = self.encoder(rearrange(x, "b n c -> b n c 1"), mask=mask)

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
