"""This rank's device and the process group (DeepSpeed's accelerator and communication backend)."""
from __future__ import annotations

import datetime
import os

import torch

from vnt.config import RunConfig


class Process:
    """The device this rank computes on, and the collectives the trainer's parts agree through.
    Rank 0 decides (``broadcast``) and prints (``log``); every rank can raise."""

    def __init__(self, run: RunConfig):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

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
        if run.flush_denormal and not torch.set_flush_denormal(True):
            raise ValueError("--run-flush-denormal true: this CPU cannot flush denormals (x86 with SSE3 only)")
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def broadcast(self, obj):
        """rank 0's ``obj`` on every rank."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (one tiny all-reduce)."""
        return self.max(1.0 if flag else 0.0) > 0

    def max(self, value: float) -> float:
        t = torch.tensor([float(value)], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return t.item()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t`` (on this rank's device), on the CPU."""
        t = t.to(self.device)
        self.dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        """Every rank is done with every collective before any rank tears the process group down."""
        self.dist.barrier()
        self.dist.destroy_process_group()
