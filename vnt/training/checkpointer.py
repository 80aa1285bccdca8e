"""The trainer's checkpoint protocol on top of ``vnt.checkpoint`` (manifests, ``latest``, fallback):
which checkpoint every rank resumes, its conversion to DeepSpeed's universal format when the
number of processes changed, the save, and the load with the LR schedule's horizon."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from vnt import checkpoint, faults
from vnt.config import RunConfig
from vnt.training.process import Process


def resumed_horizon(run: RunConfig, *, step: int, saved_max_steps: int) -> int:
    """The steps a run resumed at ``step`` trains to: ``run.max_steps`` (a larger one extends the run
    and the LR schedule's horizon); with a time budget, the horizon the budget fitted, at most
    ``run.max_steps``. CheckpointError (a usage error: one line), naming both values, when that leaves
    nothing to train."""
    horizon = min(run.max_steps, saved_max_steps) if run.time_budget_s else run.max_steps
    if horizon <= step:
        raise checkpoint.CheckpointError(
            f"--max-steps {run.max_steps} leaves nothing to train: the checkpoint to resume is at "
            f"step {step}; pass --max-steps > {step} to train on, or a new --run-dir")
    return horizon


class Checkpointer:
    """Checkpoints of one run in ``ckpt_dir``. Built before the engine: rank 0 chooses the checkpoint
    to resume (``vnt.checkpoint.choose``, warnings printed), every rank gets its manifest, and a bad
    choice or nothing left to train raises on every rank (none waits for the others)."""

    def __init__(self, proc: Process, ckpt_dir: Path, run: RunConfig, fault: faults.Faults):
        self.proc, self.dir, self.run, self.faults = proc, Path(ckpt_dir), run, fault
        resume = None
        if proc.is_main:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    resume = checkpoint.choose(self.dir, resume_from=run.resume_from)
                for w in caught:
                    print(f"warning: {w.message}", file=sys.stderr, flush=True)
            except checkpoint.CheckpointError as err:
                resume = err
        self.resume = proc.broadcast(resume)
        if isinstance(self.resume, checkpoint.CheckpointError):
            raise self.resume
        if self.resume is not None:
            resumed_horizon(run, step=int(self.resume["step"]),
                            saved_max_steps=int(self.resume.get("max_steps", run.max_steps)))
        self.tag = None  # the tag the engine loads, set by prepare()

    def prepare(self, ds_config: dict) -> dict:
        """The DeepSpeed config to build the engine with. When the checkpoint to resume has optimizer
        state partitioned over another number of processes, it is first converted to DeepSpeed's
        universal format (once, by rank 0) and the engine loads that."""
        if self.resume is None:
            return ds_config
        tag, saved_world = self.resume["tag"], self.resume["world_size"]
        if saved_world == self.proc.world or not self.resume["partitioned_optimizer"]:
            self.tag = tag
            return ds_config
        self.tag = f"{tag}_universal_from{saved_world}"
        if self.proc.is_main and not (self.dir / self.tag / checkpoint.MANIFEST).is_file():
            self.proc.log(f"resume: {tag} was saved by {saved_world} processes with partitioned "
                          f"optimizer state; converting it to DeepSpeed's universal checkpoint for {self.proc.world}")
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            checkpoint.remove(self.dir, self.tag)  # an interrupted earlier conversion
            ds_to_universal(argparse.Namespace(
                input_folder=str(self.dir / tag), output_folder=str(self.dir / self.tag),
                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=False))
            checkpoint.write_manifest(self.dir, self.tag, {**self.resume, "converted_from": tag})
        self.proc.barrier()
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}

    def load(self, engine, scheduler, *, max_steps: int) -> tuple[int, int, int]:
        """(step, consumed batches, horizon) to go on from: the checkpoint's, loaded into ``engine``,
        with the LR schedule's horizon moved to ``resumed_horizon``; (0, 0, max_steps) for a fresh run."""
        if self.tag is None:
            return 0, 0, max_steps
        path, _ = engine.load_checkpoint(str(self.dir), tag=self.tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / self.tag}")
        step, consumed = int(self.resume["step"]), int(self.resume["consumed"])
        saved = int(self.resume.get("max_steps", max_steps))
        horizon = resumed_horizon(self.run, step=step, saved_max_steps=saved)
        if horizon != saved:
            self.proc.log(f"resume: the LR schedule's horizon moves from {saved} to {horizon} steps (warm-up "
                          f"and cosine are the same functions of step / horizon, now over {horizon} steps)")
        scheduler.total_num_steps = horizon
        self.proc.log(f"resumed from {path} at step {step} ({consumed} batches consumed, saved by "
                      f"{self.resume['world_size']} processes, now {self.proc.world})")
        return step, consumed, horizon

    def save(self, engine, *, step: int, consumed: int, max_steps: int) -> None:
        """Every rank writes its files, then rank 0 writes the manifest and moves ``latest``."""
        proc, tag = self.proc, checkpoint.tag_for(step)
        if proc.is_main and (self.dir / tag).exists():  # a stale or partial save of this step
            checkpoint.remove(self.dir, tag)
        from deepspeed.checkpoint import constants as ds

        # the universal-checkpoint marker lets DeepSpeed's ds_to_universal re-partition it (elastic resume)
        universal = {ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False, client_state={
            "step": step, "consumed": consumed, ds.UNIVERSAL_CHECKPOINT_INFO: universal})
        if step == self.faults.crash_in_save and proc.rank == self.faults.rank:
            print(f"{faults.ENV} crash_in_save: rank {proc.rank} dies in the save of step {step}", flush=True)
            os._exit(13)
        proc.barrier()  # every rank has written its files
        if proc.is_main:
            # optimizer state split over the ranks (ZeRO >= 1): files of their own, re-partitioned to resume elsewhere
            partitioned = any("zero_pp_rank" in p.name and "optim_states" in p.name for p in (self.dir / tag).iterdir())
            checkpoint.commit(self.dir, tag, {
                "step": step, "consumed": consumed, "world_size": proc.world,
                "zero_stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled(),
                "max_steps": max_steps, "partitioned_optimizer": partitioned,
            }, keep_last=self.run.keep_last)
            proc.log(f"checkpoint: step {step} -> {self.dir / tag}")
        proc.barrier()
