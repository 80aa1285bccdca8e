"""Validation of the denoiser during and after training: held-out RMSD and the SE(3) check."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from vnt.config import TrainConfig
from vnt.data import validation_batches
from vnt.denoiser import BackboneDenoiser, displacement_call, model_inputs, rmsd_summary, validation_sums
from vnt.equivariance import equivariance_error, rounding_floor
from vnt.training.process import Process


class Validator:
    """RMSD of the noisy input and of the denoised output on the held-out proteins ``val``, pooled over
    all valid atoms of all ranks with fixed noise, written to ``run_dir/validation.csv``; and the
    equivariance error of the trained model."""

    def __init__(self, proc: Process, cfg: TrainConfig, val, run_dir: Path):
        self.proc, self.cfg, self.val, self.path = proc, cfg, val, Path(run_dir) / "validation.csv"
        self.batching = dict(max_length=cfg.data.max_length, batch_size=cfg.data.batch_size,
                             max_tokens=cfg.data.max_tokens)

    @torch.no_grad()
    def validate(self, engine) -> dict:
        """Every rank runs the same number of forward passes (ZeRO-3 gathers weights in each): a rank
        with fewer batches repeats one with zero weight."""
        run, proc = self.cfg.run, self.proc
        engine.eval()
        mine = list(validation_batches(self.val, rank=proc.rank, world_size=proc.world, **self.batching))
        count = int(proc.max(len(mine)))
        if run.val_max_batches:
            count = min(count, run.val_max_batches)
        filler = mine[0] if mine else next(iter(validation_batches(self.val, **self.batching)), None)
        batches = [mine[k] if k < len(mine) else filler for k in range(count)]
        sums = validation_sums(engine, batches, sigma=run.sigma, seed=run.seed, scale=run.coord_scale,
                               device=proc.device, weights=[1.0 if k < len(mine) else 0.0 for k in range(count)])
        engine.train()
        return rmsd_summary(proc.sum(sums))

    def record(self, engine, *, step: int, train_time_s: float, wall_s: float, log: bool = True) -> dict:
        """validate(), appended to validation.csv (step, training and wall time, RMSDs) and, when
        ``log``, printed."""
        result = self.validate(engine)
        if self.proc.is_main:
            fresh = not self.path.exists()
            with open(self.path, "a", newline="") as f:
                writer = csv.writer(f)
                if fresh:
                    writer.writerow(["step", "train_time_s", "wall_s", *result])
                writer.writerow([step, f"{train_time_s:.3f}", f"{wall_s:.3f}", *result.values()])
            if log:
                self.proc.log(f"step {step}: {json.dumps(result)}")
        return result

    def full_model(self, engine) -> torch.nn.Module:
        """The trained denoiser with all of its weights on this rank (in their training dtype). Under
        ZeRO-3 every rank gathers them (a collective) into a plain copy; otherwise the module itself."""
        module = engine.module
        if engine.zero_optimization_stage() < 3:
            return module
        import deepspeed

        copy = BackboneDenoiser(self.cfg.model, self.cfg.task).to(self.proc.device)
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            copy.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
        return copy.to(next(module.parameters()).dtype)

    @torch.no_grad()
    def equivariance(self, engine) -> dict:
        """SE(3) check of the trained denoiser on the first validation batch: 4 Haar-random rotations
        and a different random translation per protein (its displacement output must rotate and not
        move), in the model's dtype; and the same for exact arithmetic on inputs rounded to that dtype
        (``vnt.rounding_floor``), the part of the error the function itself forces. Every rank
        measures the same (no rank waits on another); rank 0 reports."""
        run = self.cfg.run
        model = self.full_model(engine)
        was_training = model.training
        model.eval()
        batch = next(iter(validation_batches(self.val, **self.batching)))
        noisy, _, tokens, mask = model_inputs(batch, sigma=run.sigma, generator=torch.Generator().manual_seed(run.seed))
        device = self.proc.device
        coors, tokens, mask = (noisy * run.coord_scale).to(device), tokens.to(device), mask.to(device)
        dtype = next(model.parameters()).dtype
        kw = dict(feats=tokens, mask=mask, num_rotations=4, translate=True, output_translates=False,
                  call=displacement_call)
        err = equivariance_error(model, coors, generator=torch.Generator().manual_seed(run.seed), **kw)
        floor = rounding_floor(model, coors, dtype=dtype, generator=torch.Generator().manual_seed(run.seed), **kw)
        model.train(was_training)
        return {"equiv_rel_err": err.rel, "equiv_rel_err_input_rounding_floor": floor.rel,
                "equiv_dtype": str(dtype).removeprefix("torch."), "equiv_points": int(mask.sum())}
