"""Backbone denoising with data-parallel DeepSpeed: ``python -m vnt.train --help``.

Task (``vnt.denoiser``): Gaussian noise of ``sigma`` Angstrom on every backbone atom; a
translation-invariant VN-Transformer predicts the displacement back. Validation reports the RMSD
of the noisy input and of the denoised output on the held-out split, and their ratio.

One source of truth: ``vnt.config.TrainConfig`` (model, data, optim, run dataclasses). The command
line, the DeepSpeed config, ``config.json`` and the summary are all derived from it.

Every ZeRO stage (0-3), float32 or bf16. Checkpoints (``vnt.checkpoint``) carry a manifest and
resume on any number of processes: optimizer steps and the LR schedule continue from the
checkpoint's step; the data continue at the first batch of the job's batch sequence that no rank
has consumed (``vnt.data.ShardedBatchSampler``); the micro batch and accumulation stay, so the
global batch scales with the number of processes. Optimizer state partitioned over the ranks
(ZeRO >= 1) is re-partitioned through DeepSpeed's universal checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vnt import checkpoint, cli, faults
from vnt.config import OptimConfig, RunConfig, TrainConfig
from vnt.data import (DataConfig, DataError, DownloadUnavailable, ProteinBatches, ShardedBatchSampler, load_proteins,
                      over_budget)
from vnt.denoiser import BackboneDenoiser, TaskConfig
from vnt.model import VNTransformerConfig, zero3_external_parameters
from vnt.training import Checkpointer, MetricsLog, Process, Validator, comms_summary, resumed_horizon, train_step

# ----------------------------------------------------------------------------------------------
# the command line, derived from the config dataclasses (vnt.cli): --model-dim, --data-max-length, ...

_SECTIONS = {"model": VNTransformerConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig,
             "task": TaskConfig}
_FLAGS = {"run": {"run_dir": ["--run-dir", "--run-run-dir"], "max_steps": ["--max-steps", "--run-max-steps"]}}
_RENAMED = {"--model-flash-attn": "--model-attn-backend sdpa", "--model-l2-dist-attn": "--model-attn-backend l2",
            # the kernel plan (vnt.fast.plan) left the model config: it is process state, not the function
            "--model-sdpa-kernels": "VNT_KERNELS=sdpa_kernels=flash+math in the environment",
            "--model-l2-written-out-max-scores": "VNT_KERNELS=l2_written_out_max_scores=N in the environment",
            "--model-attn-fold": "VNT_KERNELS=fold=false in the environment"}


def build_parser() -> tuple[cli.Parser, dict[str, dict[str, str]]]:
    p = cli.Parser(prog="python -m vnt.train", description=__doc__)
    defaults = TrainConfig()
    dests = {section: cli.add_options(p, cls, getattr(defaults, section), prefix=f"{section}-",
                                      flags=_FLAGS.get(section), title=section)
             for section, cls in _SECTIONS.items()}
    cli.add_renamed(p, _RENAMED)
    p.add_argument("--check", action="store_true",
                   help="check the options, build the model and the DeepSpeed config, load the data, and exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return p, dests


def config_from_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    p, dests = build_parser()
    args = p.parse_args(argv)
    overrides = {section: cli.given(args, d) for section, d in dests.items()}
    explicit = frozenset((s, n) for s, o in overrides.items() for n in o)
    try:
        defaults = TrainConfig()
        cfg = TrainConfig(**{s: dataclasses.replace(getattr(defaults, s), **o) for s, o in overrides.items()})
        cfg = cfg.with_ds_config(explicit)
        if os.environ.get("WORLD_SIZE"):  # in a rank: the global batch can be checked against the world size
            cfg.deepspeed_config(world_size=int(os.environ["WORLD_SIZE"]))
        if args.check:  # before any process starts: every construction error, the data, a bad --run-resume-from
            cfg.deepspeed_config(world_size=1 if cfg.run.ds_config is None else _json_world(cfg))
            check_model(cfg)
            load_proteins(cfg.data, progress=False)
            if cfg.run.run_dir:  # the checkpoint a launch would resume, and whether it leaves steps to train
                chosen = checkpoint.choose(Path(cfg.run.run_dir) / "checkpoints", resume_from=cfg.run.resume_from)
                if chosen is not None:
                    resumed_horizon(cfg.run, step=int(chosen["step"]),
                                    saved_max_steps=int(chosen.get("max_steps", cfg.run.max_steps)))
    except (ValueError, TypeError, ImportError, checkpoint.CheckpointError, DataError, DownloadUnavailable) as err:
        cli.fail(p, err)
    return cfg, args


# A model whose attention alone holds more parameters than this is built on the meta device by
# --check (no memory, no init). Smaller ones are built on the CPU: ~0.02 s for the default, where the
# meta device costs 1.6-2.3 s per check (torch imports torch._dynamo for the first meta op).
META_CHECK_PARAMETERS = 2 ** 24


def check_model(cfg: TrainConfig) -> torch.device:
    """Build the model as the ranks will (every construction error raises here); returns the device
    it was built on: meta for large models, cpu otherwise."""
    m = cfg.model
    attention_params = 4 * m.depth * m.dim * m.heads * m.dim_head
    device = torch.device("meta" if attention_params > META_CHECK_PARAMETERS else "cpu")
    with device, torch.no_grad():
        model = BackboneDenoiser(m, cfg.task)
        if cfg.run.activation_checkpointing:
            model.checkpoint_layers(cfg.run.checkpoint_layers or None)
    return next(model.parameters()).device


def _json_world(cfg: TrainConfig) -> int:
    """A world size that a DeepSpeed JSON's fixed train_batch_size allows (checked again in each rank)."""
    batch = json.loads(Path(cfg.run.ds_config).read_text()).get("train_batch_size", "auto")
    per_process = cfg.data.batch_size * cfg.optim.grad_accum
    return batch // per_process if isinstance(batch, int) and batch % per_process == 0 else 1


# ----------------------------------------------------------------------------------------------
# the trainer: its parts (vnt.training) around one loop


class Trainer:
    """Data-parallel training of the backbone denoiser for ``cfg``: a process (device, process group),
    the data shard of this rank, a DeepSpeed engine, a checkpointer, a validator and a metrics log.
    Construction raises (on every rank) for a checkpoint that cannot be resumed."""

    TIME_BUDGET_CALIBRATION = 20  # steps timed before a time budget sets the horizon

    def __init__(self, cfg: TrainConfig):
        import deepspeed

        self.cfg, run = cfg, cfg.run
        self.proc = proc = Process(run)
        # rank 0 decides what every rank must agree on: the run dir, and which checkpoint to resume
        self.run_dir = Path(run.run_dir or proc.broadcast(f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}"))
        if proc.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.faults = faults.Faults.from_environment()  # tests inject failures here, never through the config
        self.ckpt = Checkpointer(proc, self.run_dir / "checkpoints", run, self.faults)

        torch.manual_seed(run.seed)  # same initial weights on every rank
        data = load_proteins(cfg.data, progress=proc.is_main and run.progress) if proc.is_main else None
        proc.barrier()  # rank 0 builds the cache once; the others read it
        if data is None:
            data = load_proteins(cfg.data, progress=False)
        self.data_summary = data.summary()
        train = data.split("train")
        sampler = ShardedBatchSampler([len(e) for e in train], batch_size=cfg.data.batch_size,
                                      max_length=cfg.data.max_length, bucket=cfg.data.bucket,
                                      seed=cfg.data.seed, rank=proc.rank, world_size=proc.world,
                                      max_tokens=cfg.data.max_tokens)
        if over := over_budget(sampler.lengths, cfg.data.max_tokens):
            proc.log(f"{over} training chains are longer than --data-max-tokens {cfg.data.max_tokens}: each "
                     f"trains in a batch of its own, over the budget (longest {max(sampler.lengths)} residues)")
        self.batches = ProteinBatches(train, sampler, max_length=cfg.data.max_length)

        self.ds_config = self.ckpt.prepare(cfg.deepspeed_config(proc.world))
        model = BackboneDenoiser(cfg.model, cfg.task)
        if run.activation_checkpointing:
            model.checkpoint_layers(run.checkpoint_layers or None)
        if self.ds_config["zero_optimization"]["stage"] == 3:  # blocks that compute with their children's weights
            for module, param in zero3_external_parameters(model):
                deepspeed.zero.register_external_parameter(module, param)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                                 config=self.ds_config)
        if run.compile:
            if self.engine.zero_optimization_stage() == 3:
                raise ValueError("--run-compile true needs ZeRO 0-2")
            self.engine.compile()  # DeepSpeed's: torch.compile on the wrapped module
        self.validator = Validator(proc, cfg, data.split("valid"), self.run_dir)
        self.metrics = MetricsLog(proc, self.engine, self.run_dir, grad_accum=cfg.optim.grad_accum)
        self.step, self.consumed = 0, 0  # optimizer steps; global batches of the job's sequence consumed (all ranks)
        self.max_steps = run.max_steps  # a time budget (run.time_budget_s) may shorten it
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True

    def fit(self) -> dict:
        run, proc = self.cfg.run, self.proc
        self.step, self.consumed, self.max_steps = self.ckpt.load(self.engine, self.scheduler, max_steps=self.max_steps)
        self._write_config()
        self.metrics.start(self.step)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not (proc.is_main and run.progress),
                   desc="train", dynamic_ncols=True)
        stream = self.batches.stream(start=self.consumed)
        step_times: list[float] = []  # micro-steps since the start or the resume
        first = self.step
        self._fit_start = time.perf_counter()
        while self.step < self.max_steps:
            if proc.any(self.stop_requested):
                proc.log(f"SIGTERM: saving at step {self.step} and exiting")
                self.save()
                bar.close()
                return {"stopped_by_signal": True, "step": self.step}
            for _ in range(self.cfg.optim.grad_accum):
                batch = next(stream)
                self.consumed += proc.world
                self._maybe_crash()
                t0 = time.perf_counter()
                out = train_step(self.engine, proc, batch, run=run, step=self.step, ckpt_dir=self.ckpt.dir,
                                 nan_step=self.faults.nan_step)
                step_times.append(dt := time.perf_counter() - t0)
                self.metrics.add(out, dt)
            self.step += 1
            bar.update(1)
            if run.time_budget_s and self.step - first == self.TIME_BUDGET_CALIBRATION:
                self._fit_time_budget(step_times, bar)
            if self.step % run.log_every == 0 or self.step == self.max_steps:
                self.metrics.write(self.step, out)
                bar.set_postfix(loss=f"{out['loss']:.4f}")
            if run.val_every and self.step % run.val_every == 0 and self.step < self.max_steps:
                self.validate()
            if self.step % run.ckpt_every == 0 or self.step == self.max_steps or self.step == run.stop_after:
                self.save()
            if self.step == run.stop_after:
                proc.log(f"stop_after: stopping at step {self.step}; rerun with the same run dir to resume")
                bar.close()
                return {"stopped": True, "step": self.step}
        bar.close()
        return self._summarize(self.validate())

    def save(self) -> None:
        self.ckpt.save(self.engine, step=self.step, consumed=self.consumed, max_steps=self.max_steps)

    def validate(self) -> dict:
        """validate(), to validation.csv and the monitors; printed, except after the last step."""
        result = self.validator.record(self.engine, step=self.step, train_time_s=self.metrics.total_time,
                                       wall_s=time.perf_counter() - self._fit_start,
                                       log=self.step < self.max_steps)
        self.metrics.monitor(self.step, {f"val/{k.removeprefix('val_')}": v for k, v in result.items()})
        return result

    def _maybe_crash(self) -> None:
        if self.step + 1 == self.faults.crash_step and self.proc.rank == self.faults.rank:
            raise RuntimeError(f"{faults.ENV} crash_step: rank {self.proc.rank} crashes at step {self.step + 1}")

    def _fit_time_budget(self, step_times: list[float], bar) -> None:
        """Sets the horizon (and the LR schedule's) to the steps that fit in run.time_budget_s at the
        median micro-step time so far (the slowest rank's) times the accumulation, at most run.max_steps."""
        median = self.proc.max(sorted(step_times)[len(step_times) // 2] * self.cfg.optim.grad_accum)
        fit = int(self.cfg.run.time_budget_s / median)
        self.max_steps = max(self.step, min(self.cfg.run.max_steps, fit))
        self.scheduler.total_num_steps = self.max_steps
        bar.total = self.max_steps
        self.proc.log(f"time budget {self.cfg.run.time_budget_s:g} s at {median:.3f} s/step: {self.max_steps} steps")

    def _write_config(self) -> None:
        """config.json in the run dir: the whole config, the DeepSpeed config, versions, argv."""
        if self.proc.is_main:
            (self.run_dir / "config.json").write_text(json.dumps({
                "config": self.cfg.to_dict(), "deepspeed": self.ds_config, "world_size": self.proc.world,
                "data_summary": self.data_summary, "torch": torch.__version__,
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv}, indent=2, default=str))

    def _summarize(self, last_val: dict) -> dict:
        """summary.json: the run's outcome (final loss, RMSDs, throughput, equivariance error)."""
        run = self.cfg.run
        summary = {"world_size": self.proc.world, "steps": self.step, "final_loss": self.metrics.loss, **last_val,
                   "train_time_s": self.metrics.total_time, "time_budget_s": run.time_budget_s,
                   "tokens_per_s": self.metrics.tokens_per_s(), "tokens": "backbone atoms", "sigma_A": run.sigma,
                   "device": str(self.proc.device), "zero_stage": self.engine.zero_optimization_stage(),
                   "bf16": self.engine.bfloat16_enabled(), "data": self.data_summary["source"],
                   "run_dir": str(self.run_dir)}
        summary.update(self.validator.equivariance(self.engine))
        if run.comms_log and self.proc.is_main:
            (self.run_dir / "comms.json").write_text(json.dumps(comms_summary(), indent=1))
        if self.proc.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.proc.log(json.dumps(summary))
        return summary


def main(argv=None) -> int:
    cfg, args = config_from_args(argv)
    if args.check:
        print(json.dumps(cfg.to_dict(), default=str))
        return 0
    try:
        trainer = Trainer(cfg)
    except checkpoint.CheckpointError as err:
        import torch.distributed as dist
        if dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        return 2
    trainer.fit()
    trainer.proc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
