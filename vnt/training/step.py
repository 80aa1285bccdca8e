"""One optimizer micro-step of the denoiser under a DeepSpeed engine."""
from __future__ import annotations

from pathlib import Path

import torch

from vnt.config import RunConfig
from vnt.denoiser import denoise, masked_mse, model_inputs
from vnt.training.process import Process


def unclipped_grad_norm(engine) -> float | None:
    """DeepSpeed reports the global grad norm itself except for float32 without ZeRO, where it
    clips the (already all-reduced) gradients and drops the norm: computed here, before clipping."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


def train_step(engine, proc: Process, batch: dict, *, run: RunConfig, step: int, ckpt_dir: Path,
               nan_step: int = -1) -> dict:
    """Forward, backward and ``engine.step()`` on one micro batch, with noise seeded by (seed, rank,
    step). A non-finite loss on any rank stops every rank before the backward (FloatingPointError),
    so that no checkpoint of a broken state is written: the last good one stays in ``ckpt_dir``.
    ``nan_step`` (``vnt.faults``) makes the loss of step ``nan_step`` NaN. Returns loss, atoms,
    samples, grad_norm, and the LR this step applied."""
    gen = torch.Generator().manual_seed(hash((run.seed, proc.rank, step)) % 2 ** 63)
    noisy, clean, tokens, mask = model_inputs(batch, sigma=run.sigma, generator=gen)
    noisy, clean, tokens, mask = (t.to(proc.device) for t in (noisy, clean, tokens, mask))
    pred = denoise(engine, noisy, tokens, mask, scale=run.coord_scale)
    loss = masked_mse(pred, clean, mask)
    if step + 1 == nan_step:
        loss = loss * float("nan")
    if proc.any(not torch.isfinite(loss).item()):
        raise FloatingPointError(f"non-finite loss at step {step + 1} (rank {proc.rank}: {loss.item()}); stopping "
                                 f"without a checkpoint, the last good one is kept in {ckpt_dir}")
    engine.backward(loss)
    grad_norm = unclipped_grad_norm(engine) if engine.is_gradient_accumulation_boundary() else None
    lr = engine.get_lr()[0]  # the rate this step applies
    engine.step()
    if grad_norm is None:
        reported = engine.get_global_grad_norm()
        grad_norm = float(reported) if reported is not None else float("nan")
    return {"loss": loss.item(), "atoms": int(mask.sum()), "samples": int(batch["tokens"].shape[0]),
            "grad_norm": grad_norm, "lr": lr}
