"""The trainer's parts (``vnt.train.Trainer`` assembles them around its loop):

- ``Process``: this rank's device, the process group, rank-0 decisions every rank agrees on;
- ``Checkpointer``: which checkpoint to resume, universal conversion, save with manifest, load;
- ``train_step``: one micro-batch forward/backward/step, with NaN agreement across ranks;
- ``Validator``: held-out RMSD (filler batches keep ranks in step), validation.csv, equivariance;
- ``MetricsLog``: metrics.csv and DeepSpeed's monitors.

Importing this package imports neither deepspeed nor sidechainnet; the parts import deepspeed when built.
"""
from vnt.training.checkpointer import Checkpointer, resumed_horizon
from vnt.training.metrics import MetricsLog, allreduce_per_step, comms_summary, peak_memory_mib
from vnt.training.process import Process
from vnt.training.step import train_step
from vnt.training.validator import Validator

__all__ = ["Checkpointer", "MetricsLog", "Process", "Validator", "allreduce_per_step", "comms_summary", "peak_memory_mib", "resumed_horizon",
           "train_step"]
