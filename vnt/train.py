"""Backbone denoising with data-parallel DeepSpeed: ``python -m vnt.train --help``.

Task: Gaussian noise of ``sigma`` Angstrom is added to every backbone atom; a translation-
invariant VN-Transformer (residue x atom-type tokens as early-fused features) predicts the
displacement back, so the denoiser noisy + f(noisy) is rotation and translation equivariant.
Loss: mean squared displacement error over valid atoms (A^2). Validation reports the RMSD of the
noisy input and of the denoised output on the held-out split, and their ratio.

One source of truth: ``TrainConfig`` (model, data, optim, run dataclasses). The command line,
the DeepSpeed config, ``config.json`` and the summary are all derived from it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from vnt.data import (NUM_ATOMS, NUM_RESIDUE_TOKENS, DataConfig, ProteinBatches, ShardedBatchSampler,
                      load_proteins, validation_batches)
from vnt.equivariance import equivariance_error, rounding_floor
from vnt.model import VNTransformer, VNTransformerConfig


def default_model_config() -> VNTransformerConfig:
    return VNTransformerConfig(dim=32, depth=2, dim_head=16, heads=4, dim_feat=16,
                               num_tokens=NUM_RESIDUE_TOKENS * NUM_ATOMS, translation_invariant=True,
                               attn_backend="sdpa")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05          # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        if self.lr <= 0 or self.grad_accum < 1 or self.warmup_steps < 1:
            raise ValueError("lr must be > 0, grad_accum >= 1, warmup_steps >= 1")


@dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/default"
    max_steps: int = 2000
    stop_after: int = 0                 # stop (with a checkpoint) at this step, as if interrupted; 0: never
    sigma: float = 1.0                  # noise, Angstrom
    coord_scale: float = 1.0            # multiplies coordinates on the way into the model
    zero_stage: int = 0
    bf16: bool = False
    ds_config: str | None = None        # a DeepSpeed JSON (launch/ds_config/*.json) instead of the generated one
    log_every: int = 10
    ckpt_every: int = 200
    val_every: int = 0                  # 0: validate at the end only
    val_max_batches: int = 0            # 0: the whole held-out split
    seed: int = 0
    threads: int = 0                    # torch threads per process; 0: cores / local processes
    pg_timeout_s: int = 120             # a hung collective fails after this (torch default: 30 min)
    progress: bool = True
    # failure injection for tests: a rank that crashes, a loss that becomes NaN
    debug_crash_step: int = -1
    debug_crash_rank: int = 1
    debug_nan_step: int = -1

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.max_steps < 1 or self.sigma <= 0 or self.log_every < 1 or self.ckpt_every < 1:
            raise ValueError("max_steps, log_every, ckpt_every must be >= 1 and sigma > 0")
        if self.ds_config and not Path(self.ds_config).is_file():
            raise ValueError(f"ds_config {self.ds_config} does not exist")


@dataclass(frozen=True)
class TrainConfig:
    model: VNTransformerConfig = field(default_factory=default_model_config)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=32, batch_size=4))
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "data": self.data.to_dict(), "optim": asdict(self.optim),
                "run": asdict(self.run)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(model=VNTransformerConfig.from_dict(d["model"]), data=DataConfig(**d["data"]),
                   optim=OptimConfig(**{k: tuple(v) if k == "betas" else v for k, v in d["optim"].items()}),
                   run=RunConfig(**d["run"]))

    def deepspeed_config(self, world_size: int) -> dict:
        """The DeepSpeed config, generated (or read from run.ds_config and completed)."""
        micro, accum = self.data.batch_size, self.optim.grad_accum
        generated = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world_size,   # the one place this is computed
            "gradient_clipping": self.optim.grad_clip,
            "zero_optimization": {"stage": self.run.zero_stage},
            "bf16": {"enabled": self.run.bf16},
            "optimizer": {"type": "Adam", "params": {"lr": self.optim.lr, "betas": list(self.optim.betas),
                                                     "eps": 1e-8, "weight_decay": self.optim.weight_decay,
                                                     "torch_adam": True}},
            "scheduler": {"type": "WarmupCosineLR", "params": {
                "total_num_steps": self.run.max_steps, "warmup_num_steps": self.optim.warmup_steps,
                "warmup_min_ratio": 0.0, "cos_min_ratio": self.optim.min_lr_ratio, "warmup_type": "linear"}},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        if not self.run.ds_config:
            return generated
        user = json.loads(Path(self.run.ds_config).read_text())
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if user.get(key, "auto") not in ("auto", generated[key]):
                raise ValueError(f"{self.run.ds_config}: {key}={user[key]} contradicts the config "
                                 f"({generated[key]}); set it to \"auto\" or change --data-batch-size/--optim-grad-accum")
            user[key] = generated[key]
        for key in ("optimizer", "scheduler", "gradient_clipping"):
            user.setdefault(key, generated[key])
        return user


# ----------------------------------------------------------------------------------------------
# command line derived from the dataclasses: --model-dim, --data-max-length, --optim-lr, --run-max-steps


_SECTIONS = {"model": VNTransformerConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig}
_SHORTCUTS = {"--run-dir": "run.run_dir", "--max-steps": "run.max_steps"}


def _parse_value(raw: str, current):
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if isinstance(current, tuple):
        return tuple(type(current[0])(x) if current else x for x in raw.split(","))
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if raw.lower() == "none":
        return None
    if current is None and raw.lower() in ("true", "false"):  # optional flags such as model.attn_fold
        return raw.lower() == "true"
    try:
        return json.loads(raw) if current is None and raw[:1].isdigit() else raw
    except json.JSONDecodeError:
        return raw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vnt.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for section, cls in _SECTIONS.items():
        group = p.add_argument_group(section)
        for f in fields(cls):
            value = getattr(getattr(defaults, section), f.name)
            flag = f"--{section}-{f.name.replace('_', '-')}"
            names = [flag] + [s for s, target in _SHORTCUTS.items() if target == f"{section}.{f.name}"]
            group.add_argument(*names, dest=f"{section}.{f.name}", default=argparse.SUPPRESS, metavar="V",
                               help=f"(default: {value})")
    p.add_argument("--check", action="store_true", help="validate the options and exit (no training)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return p


def config_from_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    p = build_parser()
    args = p.parse_args(argv)
    cfg = TrainConfig()
    overrides: dict[str, dict] = {s: {} for s in _SECTIONS}
    for key, raw in vars(args).items():
        if "." not in key:
            continue
        section, name = key.split(".")
        overrides[section][name] = _parse_value(raw, getattr(getattr(cfg, section), name))
    try:
        cfg = TrainConfig(**{s: dataclasses.replace(getattr(cfg, s), **o) for s, o in overrides.items()})
        cfg.deepspeed_config(world_size=1)  # a bad ds_config fails here, before any process starts
    except (ValueError, TypeError) as err:
        p.error(str(err))
    return cfg, args


# ----------------------------------------------------------------------------------------------
# the task


def model_inputs(batch: dict, *, sigma: float, generator: torch.Generator | None):
    """Flatten residues x atoms into points; add noise. Returns (noisy, clean, tokens, mask), Angstrom."""
    b, L = batch["tokens"].shape
    clean = batch["coords"].reshape(b, L * NUM_ATOMS, 3)
    mask = batch["atom_mask"].reshape(b, L * NUM_ATOMS)
    tokens = (batch["tokens"][..., None] * NUM_ATOMS + torch.arange(NUM_ATOMS)).reshape(b, L * NUM_ATOMS)
    noise = torch.randn(clean.shape, generator=generator) * sigma
    noisy = (clean + noise).masked_fill(~mask[..., None], 0.0)
    return noisy, clean, tokens, mask


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


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


# ----------------------------------------------------------------------------------------------


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
        self.run_dir = Path(run.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

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

        model = BackboneDenoiser(cfg.model)
        self.ds_config = cfg.deepspeed_config(self.world)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                                 config=self.ds_config)
        self.step = 0
        self.position = (0, 0)
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self) -> None:
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step{self.step}",
                                    client_state={"step": self.step, "position": list(self.position)})
        self.log(f"checkpoint: step {self.step} -> {self.ckpt_dir}")

    def maybe_resume(self) -> None:
        if not (self.ckpt_dir / "latest").is_file():
            return
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None:
            raise RuntimeError(f"{self.ckpt_dir}/latest exists but its checkpoint could not be loaded")
        self.step = int(client["step"])
        self.position = tuple(client["position"])
        self.log(f"resumed from {path} at step {self.step}")

    # -- steps ---------------------------------------------------------------------------------

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (one tiny all-reduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def train_step(self, batch) -> dict:
        run = self.cfg.run
        gen = torch.Generator().manual_seed(hash((run.seed, self.rank, self.step)) % 2 ** 63)
        noisy, clean, tokens, mask = model_inputs(batch, sigma=run.sigma, generator=gen)
        noisy, clean, tokens, mask = (t.to(self.device) for t in (noisy, clean, tokens, mask))
        pred = denoise(self.engine, noisy, tokens, mask, scale=run.coord_scale)
        loss = masked_mse(pred, clean, mask)
        if self.step + 1 == run.debug_nan_step:
            loss = loss * float("nan")
        if self._agree(not torch.isfinite(loss).item()):
            raise FloatingPointError(f"non-finite loss at step {self.step + 1} (rank {self.rank}: {loss.item()}); "
                                     f"stopping without a checkpoint, the last good one is kept in {self.ckpt_dir}")
        self.engine.backward(loss)
        grad_norm = None
        if self.engine.is_gradient_accumulation_boundary() and self.cfg.run.zero_stage == 0:
            # DeepSpeed reports no global norm under ZeRO-0; the grads are all-reduced here, before clipping
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
        self.engine.step()
        if grad_norm is None:
            reported = self.engine.get_global_grad_norm()
            grad_norm = float(reported) if reported is not None else float("nan")
        return {"loss": loss.item(), "atoms": int(mask.sum()), "samples": int(batch["tokens"].shape[0]),
                "grad_norm": grad_norm}

    @torch.no_grad()
    def validate(self) -> dict:
        """RMSD over all valid held-out atoms (pooled over this split, all ranks), fixed noise."""
        run = self.cfg.run
        self.engine.eval()
        gen = torch.Generator().manual_seed(run.seed + 12345)
        sums = torch.zeros(3, dtype=torch.float64)  # sq err noisy, sq err denoised, atoms
        for k, batch in enumerate(validation_batches(self.val, max_length=self.cfg.data.max_length,
                                                     batch_size=self.cfg.data.batch_size,
                                                     rank=self.rank, world_size=self.world)):
            if run.val_max_batches and k >= run.val_max_batches:
                break
            noisy, clean, tokens, mask = model_inputs(batch, sigma=run.sigma, generator=gen)
            noisy, clean, tokens, mask = (t.to(self.device) for t in (noisy, clean, tokens, mask))
            pred = denoise(self.engine, noisy, tokens, mask, scale=run.coord_scale)
            m = mask[..., None]
            sums += torch.tensor([(((noisy - clean) ** 2) * m).sum().item(), (((pred - clean) ** 2) * m).sum().item(),
                                  mask.sum().item()], dtype=torch.float64)
        self.engine.train()
        t = sums.to(self.device)
        self.dist.all_reduce(t)
        noisy_rmsd = math.sqrt(t[0].item() / max(t[2].item(), 1))
        den_rmsd = math.sqrt(t[1].item() / max(t[2].item(), 1))
        return {"val_rmsd_noisy": noisy_rmsd, "val_rmsd_denoised": den_rmsd,
                "val_rmsd_ratio": den_rmsd / noisy_rmsd if noisy_rmsd else float("nan"), "val_atoms": int(t[2].item())}

    @torch.no_grad()
    def measure_equivariance(self) -> dict:
        """SE(3) check of the trained denoiser on the first validation batch: 4 Haar-random rotations
        and a different random translation per protein (its displacement output must rotate and not
        move), in the model's dtype; and the same for exact arithmetic on inputs rounded to that dtype
        (``vnt.rounding_floor``), the part of the error the function itself forces."""
        run = self.cfg.run
        module = self.engine.module
        batch = next(iter(validation_batches(self.val, max_length=self.cfg.data.max_length,
                                             batch_size=self.cfg.data.batch_size)))
        noisy, _, tokens, mask = model_inputs(batch, sigma=run.sigma, generator=torch.Generator().manual_seed(run.seed))
        coors, tokens, mask = (noisy * run.coord_scale).to(self.device), tokens.to(self.device), mask.to(self.device)
        dtype = next(module.parameters()).dtype

        class Displacement(torch.nn.Module):  # the call equivariance_error makes
            def __init__(self):
                super().__init__()
                self.denoiser = module

            def forward(self, c, feats=None, mask=None):
                return self.denoiser(c, tokens=feats, mask=mask)

        target = Displacement()
        kw = dict(feats=tokens, mask=mask, num_rotations=4, translate=True, output_translates=False)
        err = equivariance_error(target, coors, generator=torch.Generator().manual_seed(run.seed), **kw)
        floor = rounding_floor(target, coors, dtype=dtype, generator=torch.Generator().manual_seed(run.seed), **kw)
        return {"equiv_rel_err": err.rel, "equiv_rel_err_input_rounding_floor": floor.rel,
                "equiv_dtype": str(dtype).removeprefix("torch."), "equiv_points": int(mask.sum())}

    def fit(self) -> dict:
        run = self.cfg.run
        self.maybe_resume()
        if self.is_main:
            (self.run_dir / "config.json").write_text(json.dumps({
                "config": self.cfg.to_dict(), "deepspeed": self.ds_config, "world_size": self.world,
                "data_summary": self.data_summary, "torch": torch.__version__,
                "argv": sys.argv}, indent=2, default=str))
        metrics_path = self.run_dir / "metrics.csv"
        columns = ["step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s", "peak_mem_mib"]
        if self.is_main and (self.step == 0 or not metrics_path.exists()):
            with open(metrics_path, "w", newline="") as f:
                csv.writer(f).writerow(columns)
        if self.is_main and self.step > 0:  # resuming: drop rows past the checkpoint
            rows = list(csv.reader(open(metrics_path)))
            with open(metrics_path, "w", newline="") as f:
                csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) <= self.step])

        from tqdm import tqdm
        bar = tqdm(total=run.max_steps, initial=self.step, disable=not (self.is_main and run.progress),
                   desc="train", dynamic_ncols=True)
        stream = self.batches.stream(epoch=self.position[0], index=self.position[1])
        window = {"samples": 0, "atoms": 0, "time": 0.0, "steps": 0}
        total_atoms, total_time, loss = 0, 0.0, float("nan")
        last_val = {}
        while self.step < run.max_steps:
            if self._agree(self.stop_requested):
                self.log(f"SIGTERM: saving at step {self.step} and exiting")
                self.save()
                bar.close()
                return {"stopped_by_signal": True, "step": self.step}
            for _ in range(self.cfg.optim.grad_accum):
                self.position, batch = next(stream)
                if self.step + 1 == run.debug_crash_step and self.rank == run.debug_crash_rank:
                    raise RuntimeError(f"debug_crash_step: rank {self.rank} crashes at step {self.step + 1}")
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
            bar.update(1)
            if self.step % run.log_every == 0 or self.step == run.max_steps:
                row = [self.step, f"{loss:.6f}", f"{self.scheduler.get_last_lr()[0]:.6g}", f"{out['grad_norm']:.6g}",
                       f"{window['samples'] * self.world / window['time']:.3f}",
                       f"{window['atoms'] * self.world / window['time']:.1f}",
                       f"{window['time'] / window['steps']:.4f}", f"{peak_memory_mib(self.device):.1f}"]
                if self.is_main:
                    with open(metrics_path, "a", newline="") as f:
                        csv.writer(f).writerow(row)
                    bar.set_postfix(loss=f"{loss:.4f}")
                window = {"samples": 0, "atoms": 0, "time": 0.0, "steps": 0}
            if run.val_every and self.step % run.val_every == 0 and self.step < run.max_steps:
                last_val = self.validate()
                self.log(f"step {self.step}: {json.dumps(last_val)}")
            if self.step % run.ckpt_every == 0 or self.step == run.max_steps or self.step == run.stop_after:
                self.save()
            if self.step == run.stop_after:
                self.log(f"stop_after: stopping at step {self.step}; rerun with the same run dir to resume")
                bar.close()
                return {"stopped": True, "step": self.step}
        bar.close()
        last_val = self.validate()
        summary = {"world_size": self.world, "steps": self.step, "final_loss": loss, **last_val,
                   "tokens_per_s": total_atoms * self.world / total_time if total_time else float("nan"),
                   "tokens": "backbone atoms", "sigma_A": run.sigma, "device": str(self.device),
                   "data": self.data_summary["source"], "run_dir": str(self.run_dir)}
        if self.is_main:
            summary.update(self.measure_equivariance())
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.log(json.dumps(summary))
        return summary


def main(argv=None) -> int:
    cfg, args = config_from_args(argv)
    if args.check:
        print(json.dumps(cfg.to_dict(), default=str))
        return 0
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        if trainer.dist.is_initialized():
            trainer.dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
