"""The main job's task: backbone denoising. Imports neither deepspeed nor the trainer.

Gaussian noise of ``sigma`` Angstrom is added to every backbone atom; a translation-invariant
VN-Transformer (residue x atom-type tokens as early-fused features) predicts the displacement
back, so the denoiser noisy + f(noisy) is rotation and translation equivariant. Loss: mean
squared displacement error over valid atoms (A^2).

Axes: b batch, L residues, a backbone atoms per residue (N, CA, C, O), n = L * a points.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import torch
from einops import rearrange

from vnt.data import NUM_ATOMS, NUM_RESIDUE_TOKENS
from vnt.model import VNTransformer, VNTransformerConfig


def default_model_config() -> VNTransformerConfig:
    return VNTransformerConfig(dim=32, depth=2, dim_head=16, heads=4, dim_feat=16,
                               num_tokens=NUM_RESIDUE_TOKENS * NUM_ATOMS, translation_invariant=True,
                               attn_backend="sdpa")


def model_inputs(batch: dict, *, sigma: float, generator: torch.Generator | None = None,
                 seeds: list[int] | None = None):
    """Flatten residues x atoms into points; add noise. Returns (noisy, clean, tokens, mask), Angstrom.

    The noise comes from ``generator`` for the whole batch, or, with ``seeds`` (one per example), from
    each example's own seed, whatever batch it sits in (``validation_seeds``).
    """
    clean = rearrange(batch["coords"], "b L a c -> b (L a) c")
    mask = rearrange(batch["atom_mask"], "b L a -> b (L a)")
    tokens = rearrange(batch["tokens"][..., None] * NUM_ATOMS + torch.arange(NUM_ATOMS), "b L a -> b (L a)")
    if seeds is None:
        noise = torch.randn(clean.shape, generator=generator)
    else:
        noise = torch.zeros(clean.shape)
        for i, (seed, (start, stop)) in enumerate(zip(seeds, batch["windows"], strict=True)):
            n = (stop - start) * NUM_ATOMS
            noise[i, :n] = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    noisy = (clean + noise * sigma).masked_fill(~mask[..., None], 0.0)
    return noisy, clean, tokens, mask


def validation_seeds(batch: dict, seed: int) -> list[int]:
    """Noise seeds of a validation batch's examples, from (run seed, chain name, window start): the
    validation RMSD is the same whatever the number of processes or the batching."""
    return [zlib.crc32(f"{seed}:{name}:{start}".encode()) for name, (start, _) in zip(batch["names"], batch["windows"])]


class BackboneDenoiser(torch.nn.Module):
    """Invariant per-atom features -> VNTransformer (early fusion) -> displacement.

    Features: an embedding of (residue type x backbone atom type) plus sinusoids of the residue
    index, so attention can find sequence neighbours (dot products of sinusoids depend on the
    index difference). The output projection starts at zero: the denoiser starts as the identity.
    """

    def __init__(self, cfg: VNTransformerConfig):
        super().__init__()
        if not cfg.dim_feat or cfg.dim_feat % 2:
            raise ValueError(f"the denoiser needs an even model dim_feat, got {cfg.dim_feat}")
        if not cfg.translation_invariant:
            raise ValueError("the denoiser predicts displacements: set model translation_invariant=True")
        self.config = cfg
        self.token_emb = torch.nn.Embedding(cfg.num_tokens or NUM_RESIDUE_TOKENS * NUM_ATOMS, cfg.dim_feat)
        self.vnt = VNTransformer.from_config(dataclasses.replace(cfg, num_tokens=None))
        torch.nn.init.zeros_(self.vnt.proj_out.weight)
        half = cfg.dim_feat // 2
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(half) / half), persistent=False)

    def forward(self, coors, *, tokens, mask):
        residue_index = torch.arange(coors.shape[1], device=coors.device) // NUM_ATOMS
        angles = residue_index[:, None].float() * self.freqs
        pos = torch.cat((angles.sin(), angles.cos()), dim=-1)
        feats = self.token_emb(tokens) + pos
        return self.vnt(coors, feats=feats.to(coors.dtype), mask=mask)[0]


def denoise(model, noisy: torch.Tensor, tokens, mask, *, scale: float) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    disp = model((noisy * scale).to(dtype), tokens=tokens, mask=mask)
    return noisy + disp.float() / scale


def masked_mse(pred, target, mask) -> torch.Tensor:
    sq = ((pred - target) ** 2).sum(-1) * mask
    return sq.sum() / mask.sum().clamp(min=1) / 3.0


def displacement_call(denoiser, coors, tokens, mask):
    """``vnt.equivariance_error``'s call for the denoiser: its token ids go in as ``feats``."""
    return denoiser(coors, tokens=tokens, mask=mask)
