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
import csv
import dataclasses
import datetime
import json
import os
import resource
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from vnt import checkpoint, cli, faults
from vnt.config import OptimConfig, RunConfig, TrainConfig
from vnt.data import (DataConfig, DataError, DownloadUnavailable, ProteinBatches, ShardedBatchSampler, load_proteins,
                      validation_batches)
from vnt.denoiser import (BackboneDenoiser, TaskConfig, denoise, displacement_call, masked_mse, model_inputs,
                          rmsd_summary, validation_sums)
from vnt.equivariance import equivariance_error, rounding_floor
from vnt.model import VNTransformerConfig, zero3_external_parameters

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
    return next(model.parameters()).device


def _json_world(cfg: TrainConfig) -> int:
    """A world size that a DeepSpeed JSON's fixed train_batch_size allows (checked again in each rank)."""
    batch = json.loads(Path(cfg.run.ds_config).read_text()).get("train_batch_size", "auto")
    per_process = cfg.data.batch_size * cfg.optim.grad_accum
    return batch // per_process if isinstance(batch, int) and batch % per_process == 0 else 1


# ----------------------------------------------------------------------------------------------


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


def resumed_horizon(run: RunConfig, *, step: int, saved_max_steps: int) -> int:
    """The steps a run resumed at ``step`` trains to: ``run.max_steps`` (a larger one extends the run
    and the LR schedule's horizon); with a time budget, the horizon the budget fitted, at most
    ``run.max_steps``. CheckpointError (a usage error: one line), naming both values, when that leaves
    nothing to train."""
    horizon = min(run.max_steps, saved_max_steps) if run.time_budget_s else run.max_steps
    if horizon <= step:
        raise checkpoint.CheckpointError(f"--max-steps {run.max_steps} leaves nothing to train: the checkpoint to resume is at "
                         f"step {step}; pass --max-steps > {step} to train on, or a new --run-dir")
    return horizon


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        run = cfg.run
        accel = get_accelerator()
        self.device = torch.device(accel.device_name(), int(os.environ.get("LOCAL_RANK", 0)))
        if self.device.type == "cpu":
            self.device = torch.device("cpu")
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)) or 1)
            torch.set_num_threads(run.threads or max(1, (os.cpu_count() or 1) // local))
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~40 s JIT build
        else:
            accel.set_device(self.device.index)
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(),
                                   timeout=datetime.timedelta(seconds=run.pg_timeout_s))
        import torch.distributed as dist
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        # rank 0 decides what every rank must agree on: the run dir, and which checkpoint to resume
        self.run_dir = Path(run.run_dir or self._broadcast(f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}"))
        self.ckpt_dir = self.run_dir / "checkpoints"
        resume = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    resume = checkpoint.choose(self.ckpt_dir, resume_from=run.resume_from)
                for w in caught:
                    print(f"warning: {w.message}", file=sys.stderr, flush=True)
            except checkpoint.CheckpointError as err:
                resume = err
        self.resume = self._broadcast(resume)
        if isinstance(self.resume, checkpoint.CheckpointError):
            raise self.resume  # on every rank: none waits for the others
        if self.resume is not None:  # nothing to train fails here, before the engine, on every rank
            resumed_horizon(run, step=int(self.resume["step"]),
                            saved_max_steps=int(self.resume.get("max_steps", run.max_steps)))

        torch.manual_seed(run.seed)  # same initial weights on every rank
        data = load_proteins(cfg.data, progress=self.is_main and run.progress) if self.is_main else None
        dist.barrier()  # rank 0 builds the cache once; the others read it
        if not self.is_main:
            data = load_proteins(cfg.data, progress=False)
        self.data_summary = data.summary()
        train = data.split("train")
        self.val = data.split("valid")
        sampler = ShardedBatchSampler([len(e) for e in train], batch_size=cfg.data.batch_size,
                                      max_length=cfg.data.max_length, bucket=cfg.data.bucket,
                                      seed=cfg.data.seed, rank=self.rank, world_size=self.world)
        self.batches = ProteinBatches(train, sampler, max_length=cfg.data.max_length)

        self.ds_config = cfg.deepspeed_config(self.world)
        self.resume_tag = self._prepare_resume()
        model = BackboneDenoiser(cfg.model, cfg.task)
        if self.ds_config["zero_optimization"]["stage"] == 3:  # blocks that compute with their children's weights
            for module, param in zero3_external_parameters(model):
                deepspeed.zero.register_external_parameter(module, param)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                                 config=self.ds_config)
        self.zero_stage = self.engine.zero_optimization_stage()
        if cfg.run.compile:
            if self.zero_stage == 3:
                raise ValueError("--run-compile true needs ZeRO 0-2")
            self.engine.compile()  # DeepSpeed's: torch.compile on the wrapped module
        self.step = 0
        self.max_steps = cfg.run.max_steps  # a time budget (run.time_budget_s) may shorten it
        self.consumed = 0  # global batches of the job's batch sequence consumed so far (all ranks)
        self.stop_requested = False
        self.faults = faults.Faults.from_environment()  # tests inject failures here, never through the config
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True

    def _broadcast(self, obj):
        """rank 0's ``obj`` on every rank."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def monitor(self, values: dict) -> None:
        """Events at this step to DeepSpeed's monitors (TensorBoard, CSV, W&B, ...) when any is enabled;
        DeepSpeed writes them on rank 0."""
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(name, float(value), self.step) for name, value in values.items()])

    # -- checkpoints ---------------------------------------------------------------------------

    def _prepare_resume(self) -> str | None:
        """The tag to load, after converting it to DeepSpeed's universal format when its optimizer
        state is partitioned over another number of processes (then the engine loads it universally)."""
        if self.resume is None:
            return None
        tag = self.resume["tag"]
        if self.resume["world_size"] == self.world or not self.resume["partitioned_optimizer"]:
            return tag
        universal = f"{tag}_universal_from{self.resume['world_size']}"
        if self.is_main and not (self.ckpt_dir / universal / checkpoint.MANIFEST).is_file():
            self.log(f"resume: {tag} was saved by {self.resume['world_size']} processes with partitioned "
                     f"optimizer state; converting it to DeepSpeed's universal checkpoint for {self.world}")
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            checkpoint.remove(self.ckpt_dir, universal)  # an interrupted earlier conversion
            ds_to_universal(argparse.Namespace(
                input_folder=str(self.ckpt_dir / tag), output_folder=str(self.ckpt_dir / universal),
                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=False))
            checkpoint.write_manifest(self.ckpt_dir, universal, {**self.resume, "converted_from": tag})
        self.dist.barrier()
        self.ds_config = {**self.ds_config, "checkpoint": {**self.ds_config.get("checkpoint", {}), "load_universal": True}}
        return universal

    def save(self) -> None:
        run = self.cfg.run
        tag = checkpoint.tag_for(self.step)
        if self.is_main and (self.ckpt_dir / tag).exists():  # a stale or partial save of this step
            checkpoint.remove(self.ckpt_dir, tag)
        from deepspeed.checkpoint import constants as ds

        # the universal-checkpoint marker lets DeepSpeed's ds_to_universal re-partition it (elastic resume)
        universal = {ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False, client_state={
            "step": self.step, "consumed": self.consumed, ds.UNIVERSAL_CHECKPOINT_INFO: universal})
        if self.step == self.faults.crash_in_save and self.rank == self.faults.rank:
            print(f"{faults.ENV} crash_in_save: rank {self.rank} dies in the save of step {self.step}", flush=True)
            os._exit(13)
        self.dist.barrier()  # every rank has written its files
        if self.is_main:
            # optimizer state split over the ranks (ZeRO >= 1): files of their own, re-partitioned to resume elsewhere
            partitioned = any("zero_pp_rank" in p.name and "optim_states" in p.name for p in (self.ckpt_dir / tag).iterdir())
            checkpoint.commit(self.ckpt_dir, tag, {
                "step": self.step, "consumed": self.consumed, "world_size": self.world,
                "zero_stage": self.zero_stage, "bf16": self.engine.bfloat16_enabled(), "max_steps": self.max_steps,
                "partitioned_optimizer": partitioned,
            }, keep_last=run.keep_last)
            self.log(f"checkpoint: step {self.step} -> {self.ckpt_dir / tag}")
        self.dist.barrier()

    def maybe_resume(self) -> None:
        if self.resume_tag is None:
            return
        path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=self.resume_tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.ckpt_dir / self.resume_tag}")
        self.step, self.consumed = int(self.resume["step"]), int(self.resume["consumed"])
        saved = int(self.resume.get("max_steps", self.max_steps))
        self.max_steps = resumed_horizon(self.cfg.run, step=self.step, saved_max_steps=saved)
        if self.max_steps != saved:
            self.log(f"resume: the LR schedule's horizon moves from {saved} to {self.max_steps} steps (warm-up "
                     f"and cosine are the same functions of step / horizon, now over {self.max_steps} steps)")
        self.scheduler.total_num_steps = self.max_steps
        self.log(f"resumed from {path} at step {self.step} ({self.consumed} batches consumed, saved by "
                 f"{self.resume['world_size']} processes, now {self.world})")

    # -- steps ---------------------------------------------------------------------------------

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (one tiny all-reduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def _unclipped_grad_norm(self) -> float | None:
        """DeepSpeed reports the global grad norm itself except for float32 without ZeRO, where it
        clips the (already all-reduced) gradients and drops the norm: computed here, before clipping."""
        if self.zero_stage > 0 or self.engine.bfloat16_enabled() or self.engine.fp16_enabled():
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()

    def train_step(self, batch) -> dict:
        run = self.cfg.run
        gen = torch.Generator().manual_seed(hash((run.seed, self.rank, self.step)) % 2 ** 63)
        noisy, clean, tokens, mask = model_inputs(batch, sigma=run.sigma, generator=gen)
        noisy, clean, tokens, mask = (t.to(self.device) for t in (noisy, clean, tokens, mask))
        pred = denoise(self.engine, noisy, tokens, mask, scale=run.coord_scale)
        loss = masked_mse(pred, clean, mask)
        if self.step + 1 == self.faults.nan_step:
            loss = loss * float("nan")
        if self._agree(not torch.isfinite(loss).item()):
            raise FloatingPointError(f"non-finite loss at step {self.step + 1} (rank {self.rank}: {loss.item()}); "
                                     f"stopping without a checkpoint, the last good one is kept in {self.ckpt_dir}")
        self.engine.backward(loss)
        grad_norm = self._unclipped_grad_norm() if self.engine.is_gradient_accumulation_boundary() else None
        lr = self.engine.get_lr()[0]  # the rate this step applies
        self.engine.step()
        if grad_norm is None:
            reported = self.engine.get_global_grad_norm()
            grad_norm = float(reported) if reported is not None else float("nan")
        return {"loss": loss.item(), "atoms": int(mask.sum()), "samples": int(batch["tokens"].shape[0]),
                "grad_norm": grad_norm, "lr": lr}

    @torch.no_grad()
    def validate(self) -> dict:
        """RMSD over all valid held-out atoms (pooled over this split, all ranks), fixed noise. Every
        rank runs the same number of forward passes (ZeRO-3 gathers weights in each): a rank with
        fewer batches repeats one with zero weight."""
        run = self.cfg.run
        self.engine.eval()
        kw = dict(max_length=self.cfg.data.max_length, batch_size=self.cfg.data.batch_size)
        mine = list(validation_batches(self.val, rank=self.rank, world_size=self.world, **kw))
        count = torch.tensor([len(mine)], device=self.device)
        self.dist.all_reduce(count, op=self.dist.ReduceOp.MAX)
        count = int(count.item())
        if run.val_max_batches:
            count = min(count, run.val_max_batches)
        filler = mine[0] if mine else next(iter(validation_batches(self.val, **kw)), None)
        batches = [mine[k] if k < len(mine) else filler for k in range(count)]
        sums = validation_sums(self.engine, batches, sigma=run.sigma, seed=run.seed, scale=run.coord_scale,
                               device=self.device, weights=[1.0 if k < len(mine) else 0.0 for k in range(count)])
        self.engine.train()
        t = sums.to(self.device)
        self.dist.all_reduce(t)
        return rmsd_summary(t.cpu())

    TIME_BUDGET_CALIBRATION = 20  # steps timed before a time budget sets the horizon

    def _fit_time_budget(self, step_times: list[float], bar) -> None:
        """Sets the horizon (and the LR schedule's) to the steps that fit in run.time_budget_s at the
        median step time so far (the slowest rank's), at most run.max_steps."""
        median = torch.tensor([sorted(step_times)[len(step_times) // 2] * self.cfg.optim.grad_accum],
                              device=self.device)
        self.dist.all_reduce(median, op=self.dist.ReduceOp.MAX)
        fit = int(self.cfg.run.time_budget_s / median.item())
        self.max_steps = max(self.step, min(self.cfg.run.max_steps, fit))
        self.scheduler.total_num_steps = self.max_steps
        bar.total = self.max_steps
        self.log(f"time budget {self.cfg.run.time_budget_s:g} s at {median.item():.3f} s/step: {self.max_steps} steps")

    def validate_and_record(self, train_time_s: float) -> dict:
        """validate(), to the monitors and to validation.csv (step, training and wall time, RMSDs)."""
        result = self.validate()
        self.monitor({f"val/{k.removeprefix('val_')}": v for k, v in result.items()})
        if self.is_main:
            path = self.run_dir / "validation.csv"
            fresh = not path.exists()
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if fresh:
                    writer.writerow(["step", "train_time_s", "wall_s", *result])
                writer.writerow([self.step, f"{train_time_s:.3f}", f"{time.perf_counter() - self._fit_start:.3f}",
                                 *result.values()])
            if self.step < self.max_steps:
                self.log(f"step {self.step}: {json.dumps(result)}")
        return result

    def full_model(self) -> torch.nn.Module:
        """The trained denoiser with all of its weights on this rank (in their training dtype). Under
        ZeRO-3 every rank gathers them (a collective) into a plain copy; otherwise the module itself."""
        module = self.engine.module
        if self.zero_stage < 3:
            return module
        import deepspeed

        copy = BackboneDenoiser(self.cfg.model, self.cfg.task).to(self.device)
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            copy.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
        return copy.to(next(module.parameters()).dtype)

    @torch.no_grad()
    def measure_equivariance(self) -> dict:
        """SE(3) check of the trained denoiser on the first validation batch: 4 Haar-random rotations
        and a different random translation per protein (its displacement output must rotate and not
        move), in the model's dtype; and the same for exact arithmetic on inputs rounded to that dtype
        (``vnt.rounding_floor``), the part of the error the function itself forces. Every rank
        measures the same (no rank waits on another); rank 0 reports."""
        run = self.cfg.run
        model = self.full_model()
        was_training = model.training
        model.eval()
        batch = next(iter(validation_batches(self.val, max_length=self.cfg.data.max_length,
                                             batch_size=self.cfg.data.batch_size)))
        noisy, _, tokens, mask = model_inputs(batch, sigma=run.sigma, generator=torch.Generator().manual_seed(run.seed))
        coors, tokens, mask = (noisy * run.coord_scale).to(self.device), tokens.to(self.device), mask.to(self.device)
        dtype = next(model.parameters()).dtype
        kw = dict(feats=tokens, mask=mask, num_rotations=4, translate=True, output_translates=False,
                  call=displacement_call)
        err = equivariance_error(model, coors, generator=torch.Generator().manual_seed(run.seed), **kw)
        floor = rounding_floor(model, coors, dtype=dtype, generator=torch.Generator().manual_seed(run.seed), **kw)
        model.train(was_training)
        return {"equiv_rel_err": err.rel, "equiv_rel_err_input_rounding_floor": floor.rel,
                "equiv_dtype": str(dtype).removeprefix("torch."), "equiv_points": int(mask.sum())}

    def fit(self) -> dict:
        run = self.cfg.run
        self.maybe_resume()
        if self.is_main:
            (self.run_dir / "config.json").write_text(json.dumps({
                "config": self.cfg.to_dict(), "deepspeed": self.ds_config, "world_size": self.world,
                "data_summary": self.data_summary, "torch": torch.__version__,
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv}, indent=2, default=str))
        metrics_path = self.run_dir / "metrics.csv"
        columns = ["step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s", "peak_mem_mib"]
        if self.is_main and (self.step == 0 or not metrics_path.exists()):
            with open(metrics_path, "w", newline="") as f:
                csv.writer(f).writerow(columns)
        if self.is_main and self.step > 0:  # resuming: drop rows past the checkpoint
            for path in (metrics_path, self.run_dir / "validation.csv"):
                if path.exists():
                    with open(path) as f:
                        rows = list(csv.reader(f))
                    with open(path, "w", newline="") as f:
                        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) <= self.step])

        from tqdm import tqdm
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not (self.is_main and run.progress),
                   desc="train", dynamic_ncols=True)
        stream = self.batches.stream(start=self.consumed)
        window = {"samples": 0, "atoms": 0, "time": 0.0, "steps": 0}
        total_atoms, total_time, loss = 0, 0.0, float("nan")
        step_times: list[float] = []
        self._fit_start = time.perf_counter()
        last_val = {}
        while self.step < self.max_steps:
            if self._agree(self.stop_requested):
                self.log(f"SIGTERM: saving at step {self.step} and exiting")
                self.save()
                bar.close()
                return {"stopped_by_signal": True, "step": self.step}
            for _ in range(self.cfg.optim.grad_accum):
                batch = next(stream)
                self.consumed += self.world
                if self.step + 1 == self.faults.crash_step and self.rank == self.faults.rank:
                    raise RuntimeError(f"{faults.ENV} crash_step: rank {self.rank} crashes at step {self.step + 1}")
                t0 = time.perf_counter()
                out = self.train_step(batch)
                dt = time.perf_counter() - t0
                window["samples"] += out["samples"]
                window["atoms"] += out["atoms"]
                window["time"] += dt
                total_atoms += out["atoms"]
                total_time += dt
                loss = out["loss"]
            self.step += 1
            window["steps"] += 1
            step_times.append(dt)
            bar.update(1)
            if run.time_budget_s and len(step_times) == self.TIME_BUDGET_CALIBRATION:
                self._fit_time_budget(step_times, bar)
            if self.step % run.log_every == 0 or self.step == self.max_steps:
                row = [self.step, f"{loss:.6f}", f"{out['lr']:.6g}", f"{out['grad_norm']:.6g}",
                       f"{window['samples'] * self.world / window['time']:.3f}",
                       f"{window['atoms'] * self.world / window['time']:.1f}",
                       f"{window['time'] / window['steps']:.4f}", f"{peak_memory_mib(self.device):.1f}"]
                if self.is_main:
                    with open(metrics_path, "a", newline="") as f:
                        csv.writer(f).writerow(row)
                    bar.set_postfix(loss=f"{loss:.4f}")
                self.monitor({"train/loss": loss, "train/lr": out["lr"], "train/grad_norm": out["grad_norm"],
                              "train/tokens_per_s": window["atoms"] * self.world / window["time"]})
                window = {"samples": 0, "atoms": 0, "time": 0.0, "steps": 0}
            if run.val_every and self.step % run.val_every == 0 and self.step < self.max_steps:
                last_val = self.validate_and_record(total_time)
            if self.step % run.ckpt_every == 0 or self.step == self.max_steps or self.step == run.stop_after:
                self.save()
            if self.step == run.stop_after:
                self.log(f"stop_after: stopping at step {self.step}; rerun with the same run dir to resume")
                bar.close()
                return {"stopped": True, "step": self.step}
        bar.close()
        last_val = self.validate_and_record(total_time)
        summary = {"world_size": self.world, "steps": self.step, "final_loss": loss, **last_val,
                   "train_time_s": total_time, "time_budget_s": run.time_budget_s,
                   "tokens_per_s": total_atoms * self.world / total_time if total_time else float("nan"),
                   "tokens": "backbone atoms", "sigma_A": run.sigma, "device": str(self.device),
                   "zero_stage": self.zero_stage, "bf16": self.engine.bfloat16_enabled(),
                   "data": self.data_summary["source"], "run_dir": str(self.run_dir)}
        summary.update(self.measure_equivariance())
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.log(json.dumps(summary))
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
    # every rank is done with every collective before any rank tears the process group down
    trainer.dist.barrier()
    trainer.dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
