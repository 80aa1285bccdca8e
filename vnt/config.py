"""The main job's one configuration: ``TrainConfig`` = model + data + optim + run.

The command line, the DeepSpeed config, ``config.json`` and every report are derived from it. A
DeepSpeed JSON (``--run-ds-config``) is read into it: its batch, precision, ZeRO and clipping
values become the config's own, a value that contradicts an option given explicitly fails naming
both, and everything else in the file (ZeRO tuning, monitors, ...) passes through to DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from vnt.data import DataConfig
from vnt.denoiser import TaskConfig, default_model_config
from vnt.model import VNTransformerConfig


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3                    # peak learning rate (Adam)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)  # Adam's betas
    warmup_steps: int = 100             # linear warm-up from 0
    min_lr_ratio: float = 0.05          # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0              # global grad-norm clip; 0: none
    grad_accum: int = 1                 # micro batches per optimizer step

    def __post_init__(self):
        if self.lr <= 0 or self.grad_accum < 1 or self.warmup_steps < 1:
            raise ValueError("lr must be > 0, grad_accum >= 1, warmup_steps >= 1")


@dataclass(frozen=True)
class RunConfig:
    run_dir: str | None = None          # where the run writes; None: runs/<start time>, chosen by rank 0
    max_steps: int = 6000               # optimizer steps (the LR schedule's horizon); resuming with more extends it
    time_budget_s: float = 0.0          # train for this many seconds of step time instead: after 20 steps the horizon becomes the steps that fit (at most max_steps); 0: off
    stop_after: int = 0                 # stop (with a checkpoint) at this step, as if interrupted; 0: never
    sigma: float = 1.0                  # noise, Angstrom
    coord_scale: float = 1.0            # multiplies coordinates on the way into the model
    zero_stage: Literal[0, 1, 2, 3] = 0  # DeepSpeed ZeRO stage
    bf16: bool = False                  # bfloat16 training (DeepSpeed bf16)
    compile: bool = False               # torch.compile the model (inductor; ZeRO 0-2): ~10-20% faster steps, a minute to compile
    ds_config: str | None = None        # a DeepSpeed JSON (launch/ds_config/*.json), read into this config
    log_every: int = 10                 # steps per metrics.csv row
    ckpt_every: int = 500               # steps per checkpoint (and one at the end)
    keep_last: int = 0                  # keep this many newest checkpoints; 0: all
    resume_from: str | None = None      # a checkpoint tag (e.g. step1800) of run_dir to resume from; None: latest
    val_every: int = 0                  # steps per validation; 0: at the end only
    val_max_batches: int = 0            # validation batches per process; 0: the whole held-out split
    tensorboard: str | None = None      # DeepSpeed's TensorBoard monitor writes here (train/loss, ...)
    csv_monitor: str | None = None      # DeepSpeed's CSV monitor writes here
    seed: int = 0                       # initial weights and noise
    threads: int = 0                    # torch threads per process; 0: cores / local processes
    pg_timeout_s: int = 120             # a hung collective fails after this (torch default: 30 min)
    progress: bool = True               # a progress bar on rank 0
    flush_denormal: bool = False        # flush denormal floats to zero in every rank (torch.set_flush_denormal; x86 with SSE3)
    activation_checkpointing: bool = False  # recompute encoder layers' activations in backward: less memory, about one more forward of compute
    checkpoint_layers: tuple[int, ...] = ()  # with activation_checkpointing: only these encoder layers (0-based, e.g. 0,2,4); empty: every layer
    comms_log: bool = False             # time every DeepSpeed collective (its comms logger, blocking ops): comms.json in the run dir

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.max_steps < 1 or self.sigma <= 0 or self.log_every < 1 or self.ckpt_every < 1:
            raise ValueError("max_steps, log_every, ckpt_every must be >= 1 and sigma > 0")
        if self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")
        if self.ds_config and not Path(self.ds_config).is_file():
            raise ValueError(f"ds_config {self.ds_config} does not exist")
        if self.checkpoint_layers and not self.activation_checkpointing:
            raise ValueError("checkpoint_layers needs --run-activation-checkpointing true")
        if self.compile and self.activation_checkpointing:
            raise ValueError("--run-compile true and --run-activation-checkpointing true are not supported together "
                             "(the compiled graph of a checkpointed layer is untested here): choose one")
        if self.compile and self.zero_stage == 3:
            raise ValueError("--run-compile true needs ZeRO 0-2 (ZeRO-3 gathers weights in hooks the compiled graph "
                             "does not see)")


# TrainConfig fields that a DeepSpeed JSON may also set: (section, field) <- path in the JSON
DS_FIELDS = {
    ("data", "batch_size"): ("train_micro_batch_size_per_gpu",),
    ("optim", "grad_accum"): ("gradient_accumulation_steps",),
    ("optim", "grad_clip"): ("gradient_clipping",),
    ("run", "zero_stage"): ("zero_optimization", "stage"),
    ("run", "bf16"): ("bf16", "enabled"),
}


def flag_name(section: str, name: str) -> str:
    return f"--{section}-{name.replace('_', '-')}"


@dataclass(frozen=True)
class TrainConfig:
    model: VNTransformerConfig = field(default_factory=default_model_config)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=32, batch_size=4))
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "data": self.data.to_dict(), "optim": asdict(self.optim),
                "run": asdict(self.run), "task": self.task.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(model=VNTransformerConfig.from_dict(d["model"]), data=DataConfig(**d["data"]),
                   optim=OptimConfig(**{k: tuple(v) if k == "betas" else v for k, v in d["optim"].items()}),
                   run=RunConfig(**d["run"]), task=TaskConfig(**d.get("task", {})))

    def replace(self, section: str, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    def with_ds_config(self, explicit: frozenset[tuple[str, str]] = frozenset()) -> "TrainConfig":
        """This config with the values of ``run.ds_config`` read in (see the module docstring).

        ``explicit``: the (section, field) pairs the user set explicitly; a file value that differs
        from one of them raises ValueError naming both.
        """
        if not self.run.ds_config:
            return self
        path = self.run.ds_config
        user = _read_json(path)
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ValueError(f"{path}: vnt builds the {key} from the --optim-* options; remove the "
                                 f"'{key}' section (one source of truth)")
        if user.get("fp16", {}).get("enabled", False) not in (False, "auto"):
            raise ValueError(f"{path}: fp16 is not supported (vnt trains in float32 or bfloat16: bf16.enabled)")
        cfg = self
        for (section, name), keys in DS_FIELDS.items():
            value = user
            for k in keys:
                value = value.get(k, "auto") if isinstance(value, dict) else "auto"
            if value == "auto":
                continue
            ours = getattr(getattr(cfg, section), name)
            value = type(ours)(value)
            if value == ours:
                continue
            if (section, name) in explicit:
                raise ValueError(f"{path} sets {'.'.join(keys)}={value} but {flag_name(section, name)} "
                                 f"{ours} was given: drop one of them")
            cfg = cfg.replace(section, **{name: value})
        return cfg

    def deepspeed_config(self, world_size: int) -> dict:
        """The DeepSpeed config that runs: generated from this config, on top of ``run.ds_config``'s
        other keys. Call ``with_ds_config`` first: the file's values must already be in this config."""
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
        if self.run.tensorboard:
            generated["tensorboard"] = {"enabled": True, "output_path": self.run.tensorboard, "job_name": "vnt"}
        if self.run.csv_monitor:
            generated["csv_monitor"] = {"enabled": True, "output_path": self.run.csv_monitor, "job_name": "vnt"}
        if self.run.comms_log:
            generated["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
        if not self.run.ds_config:
            return generated
        user = _read_json(self.run.ds_config)
        batch = user.get("train_batch_size", "auto")
        if batch not in ("auto", generated["train_batch_size"]):
            raise ValueError(f"{self.run.ds_config}: train_batch_size={batch} but micro batch {micro} x "
                             f"accumulation {accum} x {world_size} processes = {generated['train_batch_size']}; "
                             f"set it to \"auto\"")
        for key in ("zero_optimization", "bf16"):  # the file's other keys of these sections (ZeRO tuning, ...)
            generated[key] = {**user.get(key, {}), **generated[key]}
        return {**user, **generated}


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"ds_config {path} is not a readable JSON file: {err}") from err
