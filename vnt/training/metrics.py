"""Training metrics: ``metrics.csv`` (one row per ``--run-log-every`` steps) and DeepSpeed's monitors."""
from __future__ import annotations

import csv
import resource
from pathlib import Path

import torch

from vnt.training.process import Process


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


class MetricsLog:
    """Accumulates micro-step results over a logging window and writes them (rank 0) to
    ``run_dir/metrics.csv`` and to DeepSpeed's monitors (TensorBoard, CSV, W&B, ... when enabled).
    Throughputs count all ranks (this rank's counts times the world size)."""

    COLUMNS = ["step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s", "peak_mem_mib"]

    def __init__(self, proc: Process, engine, run_dir: Path, *, grad_accum: int):
        self.proc, self.engine, self.run_dir, self.grad_accum = proc, engine, Path(run_dir), grad_accum
        self.path = self.run_dir / "metrics.csv"
        self.total_atoms, self.total_time, self.loss = 0, 0.0, float("nan")
        self._reset()

    def _reset(self) -> None:
        self.window = {"samples": 0, "atoms": 0, "time": 0.0, "micro_steps": 0}

    def start(self, step: int) -> None:
        """A fresh metrics.csv at step 0; on resume at ``step``, the rows past it dropped (here and in
        validation.csv), since the steps after the checkpoint are trained again."""
        if not self.proc.is_main:
            return
        if step == 0 or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.COLUMNS)
        if step > 0:
            for path in (self.path, self.run_dir / "validation.csv"):
                if path.exists():
                    with open(path) as f:
                        rows = list(csv.reader(f))
                    with open(path, "w", newline="") as f:
                        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) <= step])

    def add(self, out: dict, seconds: float) -> None:
        """One micro-step's ``train_step`` result, which took ``seconds``."""
        for key in ("samples", "atoms"):
            self.window[key] += out[key]
        self.window["time"] += seconds
        self.window["micro_steps"] += 1
        self.total_atoms += out["atoms"]
        self.total_time += seconds
        self.loss = out["loss"]

    def write(self, step: int, out: dict) -> None:
        """The window that ends at optimizer step ``step`` (``out``: its last micro-step) as one row."""
        w, world = self.window, self.proc.world
        steps = w["micro_steps"] / self.grad_accum
        tokens_per_s = w["atoms"] * world / w["time"]
        if self.proc.is_main:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([step, f"{self.loss:.6f}", f"{out['lr']:.6g}", f"{out['grad_norm']:.6g}",
                                        f"{w['samples'] * world / w['time']:.3f}", f"{tokens_per_s:.1f}",
                                        f"{w['time'] / steps:.4f}", f"{peak_memory_mib(self.proc.device):.1f}"])
        self.monitor(step, {"train/loss": self.loss, "train/lr": out["lr"], "train/grad_norm": out["grad_norm"],
                            "train/tokens_per_s": tokens_per_s})
        self._reset()

    def monitor(self, step: int, values: dict) -> None:
        """Events at ``step`` to DeepSpeed's monitors when any is enabled; DeepSpeed writes them on rank 0."""
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(name, float(value), step) for name, value in values.items()])

    def tokens_per_s(self) -> float:
        """Backbone atoms per second over the whole run, all ranks."""
        return self.total_atoms * self.proc.world / self.total_time if self.total_time else float("nan")


def comms_summary() -> dict:
    """What DeepSpeed's comms logger recorded in this process (``--run-comms-log true``): per
    collective, its calls in order as (message bytes, ms; the wait for the other ranks included), their
    count and total. DeepSpeed records each call's latency as the running total of that collective's
    timer, so sorting them gives the call order and their differences the calls' own times."""
    from deepspeed.comm.comm import comms_logger

    out = {}
    for op, sizes in comms_logger.comms_dict.items():
        running = sorted((total, int(size)) for size, record in sizes.items() for total in record[1])
        calls = [[size, total - (running[k - 1][0] if k else 0.0)] for k, (total, size) in enumerate(running)]
        out[op] = {"count": len(calls), "total_ms": running[-1][0] if running else 0.0, "calls": calls}
    return out


def allreduce_per_step(comms: dict, *, steps: int) -> list[float]:
    """Seconds inside all-reduce per optimizer step, from a ``comms_summary`` of a run of ``steps``
    steps: the k-th call of each message size that is all-reduced once per step (the gradient
    buckets, DeepSpeed's small checks) belongs to step k. Empty when no size is called once per step."""
    by_size: dict[int, list[float]] = {}
    for size, ms in comms.get("all_reduce", {"calls": []})["calls"]:
        by_size.setdefault(size, []).append(ms / 1e3)
    per_step = [times for times in by_size.values() if len(times) == steps]
    return [sum(times[k] for times in per_step) for k in range(steps)] if per_step else []
