"""The main job's task: backbone denoising. Imports neither deepspeed nor the trainer.

Gaussian noise of ``sigma`` Angstrom is added to every backbone atom; a translation-invariant
VN-Transformer (residue x atom-type tokens as early-fused features) predicts the displacement
back, so the denoiser noisy + f(noisy) is rotation and translation equivariant. Loss: mean
squared displacement error over valid atoms (A^2).

Axes: b batch, L residues, a backbone atoms per residue (N, CA, C, O), n = L * a points.
"""
from __future__ import annotations

import dataclasses
import json
import math
import zlib
from pathlib import Path
from typing import Literal

import torch
from einops import rearrange

from vnt import layers
from vnt.data import NUM_ATOMS, NUM_RESIDUE_TOKENS
from vnt.model import VNTransformer, VNTransformerConfig, VNTransformerEncoder, centered, remap_proj_in


def default_model_config() -> VNTransformerConfig:
    return VNTransformerConfig(dim=32, depth=2, dim_head=16, heads=4, dim_feat=16,
                               num_tokens=NUM_RESIDUE_TOKENS * NUM_ATOMS, translation_invariant=True,
                               attn_backend="sdpa")


def backbone_points(batch: dict):
    """Residues x atoms flattened into points: (coords (b, n, 3), tokens (b, n), mask (b, n)), Angstrom."""
    coords = rearrange(batch["coords"], "b L a c -> b (L a) c")
    mask = rearrange(batch["atom_mask"], "b L a -> b (L a)")
    tokens = rearrange(batch["tokens"][..., None] * NUM_ATOMS + torch.arange(NUM_ATOMS), "b L a -> b (L a)")
    return coords, tokens, mask


def model_inputs(batch: dict, *, sigma: float, generator: torch.Generator | None = None,
                 seeds: list[int] | None = None):
    """``backbone_points`` with noise added. Returns (noisy, clean, tokens, mask), Angstrom.

    The noise comes from ``generator`` for the whole batch, or, with ``seeds`` (one per example), from
    each example's own seed, whatever batch it sits in (``validation_seeds``).
    """
    clean, tokens, mask = backbone_points(batch)
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


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What the denoiser is made of besides the VNTransformer's own hyper-parameters (``model``)."""

    network: Literal["vnt", "vn-transformer-0.1.0", "en-transformer", "equiformer"] = "vnt"  # the equivariant network (peers: vnt.peers)
    points: Literal["atom", "residue"] = "residue"  # vnt's points: a residue with its 4 atoms as 4 vector channels, or an atom (peers: atoms)
    en_neighbors: int = 32              # en-transformer and equiformer: nearest neighbours each point attends to

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class BackboneDenoiser(torch.nn.Module):
    """Invariant per-atom features -> an equivariant network (early fusion) -> displacement.

    Features: an embedding of (residue type x backbone atom type) plus sinusoids of the residue
    index, so attention can find sequence neighbours (dot products of sinusoids depend on the
    index difference). The network is vnt's VNTransformer (``cfg``), or a peer (``task.network``,
    vnt.peers) built from the same width, depth and heads. vnt's output projection starts at zero:
    the denoiser starts as the identity.
    """

    def __init__(self, cfg: VNTransformerConfig, task: TaskConfig = TaskConfig()):
        super().__init__()
        if not cfg.dim_feat or cfg.dim_feat % 2:
            raise ValueError(f"the denoiser needs an even model dim_feat, got {cfg.dim_feat}")
        if not cfg.translation_invariant:
            raise ValueError("the denoiser predicts displacements: set model translation_invariant=True")
        self.config, self.task_config = cfg, task
        self.token_emb = torch.nn.Embedding(cfg.num_tokens or NUM_RESIDUE_TOKENS * NUM_ATOMS, cfg.dim_feat)
        if task.network == "vnt" and task.points == "residue":  # (the peers take one point per atom)
            self.residues = ResidueVNTransformer(cfg)
        elif task.network == "vnt":
            self.vnt = VNTransformer.from_config(dataclasses.replace(cfg, num_tokens=None))
            torch.nn.init.zeros_(self.vnt.proj_out.weight)
        else:
            from vnt import peers
            shape = dict(dim=cfg.dim, depth=cfg.depth, dim_head=cfg.dim_head, heads=cfg.heads, dim_feat=cfg.dim_feat)
            if task.network == "en-transformer":
                self.peer = peers.EnTransformer(**shape, neighbors=task.en_neighbors)
            elif task.network == "equiformer":
                self.peer = peers.Equiformer(**shape, neighbors=task.en_neighbors)
            else:
                self.peer = peers.OriginalVNTransformer(**shape, bias_epsilon=cfg.bias_epsilon,
                                                        attn_backend=cfg.attn_backend)
        half = cfg.dim_feat // 2
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(half) / half), persistent=False)

    def checkpoint_layers(self, layers=None) -> None:
        """Activation checkpointing of vnt's encoder layers (``VNTransformerEncoder.checkpoint_layers``:
        None, every layer). The peers have none: ValueError."""
        if self.task_config.network != "vnt":
            raise ValueError(f"activation checkpointing is vnt's (its encoder layers); the peer "
                             f"{self.task_config.network!r} has none")
        (self.residues if self.task_config.points == "residue" else self.vnt).encoder.checkpoint_layers(layers)

    def forward(self, coors, *, tokens, mask):
        residue_index = torch.arange(coors.shape[1], device=coors.device) // NUM_ATOMS
        angles = residue_index[:, None].float() * self.freqs
        pos = torch.cat((angles.sin(), angles.cos()), dim=-1)
        feats = (self.token_emb(tokens) + pos).to(coors.dtype)
        if self.task_config.network != "vnt":
            return self.peer(coors, feats=feats, mask=mask)
        if self.task_config.points == "residue":
            return self.residues(coors, feats=feats, mask=mask)
        return self.vnt(coors, feats=feats, mask=mask)[0]


class ResidueVNTransformer(torch.nn.Module):
    """vnt's encoder on one point per residue: its 4 backbone atoms are 4 vector channels.

    Per residue, the VN feature has the 4 atoms' centred coordinates, each with its atom's invariant
    features fused early below them, as its 4 input channels (c = 3 + dim_feat rows): the encoder's
    ``proj_in`` maps 4 -> dim channels, ``proj_out`` dim -> 4 displacements (starting at zero). The same
    function class as the per-atom model (rotations act on the 3 coordinate rows only; centring
    makes it translation invariant), on a sequence 4 times shorter: attention costs 16 times less.
    Axes: b batch, L residues, a atoms (4), c coordinate rows, d channels.
    """

    def __init__(self, cfg: VNTransformerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = VNTransformerEncoder(dataclasses.replace(cfg, num_tokens=None), dim_in=NUM_ATOMS)
        self._register_load_state_dict_pre_hook(remap_proj_in, with_module=True)
        self.out_norm = layers.VNLayerNorm(cfg.dim, subtract_mean=cfg.norm_subtract_mean)
        self.proj_out = layers.VNLinear(cfg.dim, NUM_ATOMS, bias_epsilon=cfg.bias_epsilon)
        torch.nn.init.zeros_(self.proj_out.weight)

    def forward(self, coors, *, feats, mask):
        coors, _ = centered(coors.masked_fill(~mask[..., None], 0.0), mask)
        x = torch.cat((coors, feats.masked_fill(~mask[..., None], 0.0)), dim=-1)       # (b, L a, 3 + f)
        x = rearrange(x, "b (L a) c -> b L c a", a=NUM_ATOMS)
        residue_mask = rearrange(mask, "b (L a) -> b L a", a=NUM_ATOMS).any(dim=-1)
        x = self.encoder(x, mask=residue_mask)
        out = self.proj_out(self.out_norm(x))[:, :, :3]                                 # (b, L, 3, a)
        return rearrange(out, "b L c a -> b (L a) c")


@torch.no_grad()
def denoised_batches(model, batches, *, sigma: float, seed: int, scale: float, device):
    """Per batch: (noisy, clean, denoised, mask), points (b, n, 3) and (b, n), with each example's
    validation noise (``validation_seeds``)."""
    for batch in batches:
        noisy, clean, tokens, mask = model_inputs(batch, sigma=sigma, seeds=validation_seeds(batch, seed))
        noisy, clean, tokens, mask = (t.to(device) for t in (noisy, clean, tokens, mask))
        yield noisy, clean, denoise(model, noisy, tokens, mask, scale=scale), mask


def validation_sums(model, batches, *, sigma: float, seed: int, scale: float, device, weights=None) -> torch.Tensor:
    """float64 [sum of squared errors noisy, sum denoised, valid atoms] over ``batches`` (each weighted
    by ``weights``, default 1), with each example's validation noise (``validation_seeds``)."""
    sums = torch.zeros(3, dtype=torch.float64)
    pairs = denoised_batches(model, batches, sigma=sigma, seed=seed, scale=scale, device=device)
    for k, (noisy, clean, pred, mask) in enumerate(pairs):
        sums += (1.0 if weights is None else weights[k]) * rmsd_sums(noisy, clean, pred, mask)
    return sums


def rmsd_sums(noisy, clean, pred, mask) -> torch.Tensor:
    """float64 [sum of squared errors noisy, sum denoised, valid atoms] of one batch."""
    m = mask[..., None]
    return torch.tensor([(((noisy - clean) ** 2) * m).sum().item(), (((pred - clean) ** 2) * m).sum().item(),
                         mask.sum().item()], dtype=torch.float64)


def rmsd_summary(sums: torch.Tensor) -> dict:
    """The validation numbers of ``validation_sums`` (pooled over every valid held-out atom)."""
    atoms = max(sums[2].item(), 1)
    noisy, denoised = math.sqrt(sums[0].item() / atoms), math.sqrt(sums[1].item() / atoms)
    return {"val_rmsd_noisy": noisy, "val_rmsd_denoised": denoised,
            "val_rmsd_ratio": denoised / noisy if noisy else float("nan"), "val_atoms": int(sums[2].item())}


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


# ------------------------------------------------------------------------------------------------
# trained models


def load_denoiser(path, *, step: int | None = None, device="cpu") -> BackboneDenoiser:
    """The trained denoiser of a run directory (its latest checkpoint, or ``step``), with float32
    weights, in eval mode; or the model in a file written by ``python -m vnt.denoise --export``.

    Any ZeRO stage: a ZeRO-0 checkpoint holds the whole model (in bf16, with the float32 master
    weights in DeepSpeed's optimizer state, which are used); under ZeRO >= 1 the float32 masters are
    partitioned over the ranks and DeepSpeed's own ``zero_to_fp32`` consolidates them (this imports
    deepspeed; an exported file needs none). The
    checkpoint is verified against its manifest first (``vnt.checkpoint``).
    """
    from vnt import checkpoint

    path = Path(path)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        cfg, state, task = VNTransformerConfig.from_dict(blob["model_config"]), blob["state_dict"], blob["task"]
        task_cfg = TaskConfig(**blob.get("task_config", {}))
    else:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise checkpoint.CheckpointError(f"{path} is not a run directory (no config.json) nor an exported model")
        saved = json.loads(config_file.read_text())["config"]
        cfg, task_cfg = VNTransformerConfig.from_dict(saved["model"]), TaskConfig(**saved.get("task", {}))
        task = {"coord_scale": saved["run"]["coord_scale"], "max_length": saved["data"]["max_length"],
                "sigma": saved["run"]["sigma"]}
        ckpt_dir = path / "checkpoints"
        manifest = checkpoint.choose(ckpt_dir, resume_from=None if step is None else checkpoint.tag_for(step))
        if manifest is None:
            raise checkpoint.CheckpointError(f"{ckpt_dir} holds no checkpoint")
        tag = manifest["tag"]
        if manifest["partitioned_optimizer"]:
            import contextlib
            import sys

            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout is the caller's (JSON)
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        else:
            blob = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
            state = blob["module"]
            # bf16 without ZeRO: the module holds bf16 weights, DeepSpeed's optimizer the float32 masters, in order
            masters = [t for group in (blob.get("optimizer") or {}).get("fp32_groups") or [] for t in group]
            if masters and any(v.dtype != torch.float32 for v in state.values()):
                if [tuple(t.shape) for t in masters] != [tuple(v.shape) for v in state.values()]:
                    raise checkpoint.CheckpointError(f"{ckpt_dir / tag}: the float32 master weights do not match the "
                                                     f"model's parameters")
                state = dict(zip(state, masters))
    model = BackboneDenoiser(cfg, task_cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.task = task  # what inference needs of the run: coord_scale, the window (max_length), sigma
    return model.to(device).eval()


def export_denoiser(model: "BackboneDenoiser", path) -> None:
    """A plain ``torch.save`` of the model's config, float32 state dict and task settings (coord_scale,
    window, sigma): ``load_denoiser`` reads it without DeepSpeed."""
    torch.save({"model_config": model.config.to_dict(), "task_config": model.task_config.to_dict(),
                "task": model.task, "format": "vnt.denoiser/1",
                "state_dict": {k: v.float() for k, v in model.state_dict().items()}}, path)
