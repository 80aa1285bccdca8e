"""``python -m bench.plan --validate``: the planner's model against what this machine measures.

Each comparison is ``{quantity, measured, predicted, ratio}`` (ratio = measured / predicted):
  - **communication** per step, ZeRO 0-3: DeepSpeed's comms logger in a 2-process run of the main
    job's network, each call converted to ring passes of its whole tensor (all-reduce: 2, all-gather
    and reduce-scatter: 1 of world x the logged chunk, reduce and broadcast: 1), against the planner's
    ``comm_passes`` x Psi elements (2 for ZeRO-0, 3 for ZeRO 1-3);
  - **peak memory** per rank, ZeRO 0-3 at 2 processes: the state a rank holds after its first step
    (the distinct storages of live tensors and parameter gradients, counted) plus the profiled peak
    growth of a steady-state step, against model states + activations + DeepSpeed's buffers;
  - **step time** at 2 processes, ZeRO 0-3: the median of timed steps, against the 1-process step time
    (same threads per process, measured here) plus the planner's ring time with gloo's alpha and
    beta, fitted by an all-reduce microbenchmark at 2 processes on this machine (overlap 0: DeepSpeed
    on a CPU does not overlap communication with the backward pass);
  - the **simulated 2-node run** (``launch/train.sh`` with ``NUM_NODES=2 NO_SSH=1``, one launcher per
    node): its median step time (``metrics.csv``) against the same prediction for its job.

Processes are started here with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` (no launcher) except for the
2-node run, which is the job users run.
"""
from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
PASSES = {"all_reduce": 2, "all_gather_into_tensor": 1, "all_gather": 1, "reduce_scatter_tensor": 1,
          "reduce_scatter": 1, "reduce": 1, "broadcast": 1}
VALIDATE_BUCKET = 2_000_000  # zero_optimization reduce / allgather bucket (elements) of the validation runs
WARM_STEPS = 3  # untimed steady-state steps before the timed ones
CHUNKED = {"all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "reduce_scatter"}  # logged per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_alpha_beta(sizes: list[int], seconds: list[float], *, ranks: int) -> tuple[float, float]:
    """(GB/s, latency in us) of a ring all-reduce, t = 2 ((n-1)/n bytes / B + (n-1) alpha), fitted by
    least squares to (message bytes, seconds)."""
    if len(sizes) != len(seconds) or len(sizes) < 2 or ranks < 2:
        raise ValueError(f"need >= 2 (bytes, seconds) pairs at >= 2 ranks, got {len(sizes)} pairs at {ranks}")
    mx, my = statistics.fmean(sizes), statistics.fmean(seconds)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sum((x - mx) ** 2 for x in sizes)
    intercept = my - slope * mx
    gbps = 2 * (ranks - 1) / ranks / slope / 1e9
    return gbps, max(intercept, 0.0) / (2 * (ranks - 1)) * 1e6


def ring_passes_elements(comms: dict, *, world: int, steps: int) -> float:
    """Ring passes x elements per step, from a ``vnt.training.comms_summary`` in bytes; divided by the
    element size by the caller."""
    total = 0.0
    for op, record in comms.items():
        passes = PASSES.get(op)
        if passes is None:
            continue
        for size, _ in record["calls"]:
            total += passes * size * (world if op in CHUNKED else 1)
    return total / steps


# ----------------------------------------------------------------------------------------------
# one rank

def _config(spec: dict, stage: int):
    from vnt.config import TrainConfig
    return (TrainConfig().replace("model", **spec["model"])
            .replace("run", zero_stage=stage, comms_log=True, bf16=False, max_steps=spec["steps"] + 3 + WARM_STEPS)
            .replace("data", batch_size=spec["micro_batch"]))


def _inputs(spec: dict):
    from bench.plan import denoiser_inputs
    return denoiser_inputs(residues=spec["residues"], micro_batch=spec["micro_batch"])


def _live_bytes(fn) -> tuple[int, int]:
    """(net, peak) growth of live CPU tensor bytes while ``fn()`` runs (``torch.profiler`` records)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return live, peak


def _resident_bytes() -> int:
    """Bytes of every distinct tensor storage alive now: the tensors the garbage collector tracks, and
    the parameters' gradients (held in C++). Counted, not profiled: a profile misses the frees that
    happen on gloo's threads, which made the net growth of a build vary by a buffer between runs."""
    import torch
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            tensors = [obj] + ([obj.grad] if isinstance(obj, torch.nn.Parameter) and obj.grad is not None else [])
            for t in tensors:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _stage(spec: dict, stage: int, world: int) -> dict:
    import deepspeed
    import torch
    from deepspeed.comm.comm import comms_logger

    from vnt.denoiser import BackboneDenoiser
    from vnt.model import zero3_external_parameters
    from vnt.training import comms_summary

    cfg = _config(spec, stage)
    coors, tokens, mask = _inputs(spec)
    holder = {}

    def build_and_step():
        torch.manual_seed(0)
        model = BackboneDenoiser(cfg.model, cfg.task)
        if stage == 3:
            for module, param in zero3_external_parameters(model):
                deepspeed.zero.register_external_parameter(module, param)
        ds = cfg.deepspeed_config(world)
        ds["zero_optimization"].update(spec.get("zero", {}))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        holder["engine"] = engine
        step(engine)

    def step(engine):
        loss = engine(coors, tokens=tokens, mask=mask).square().mean()
        engine.backward(loss)
        engine.step()

    before = _resident_bytes()
    build_and_step()
    engine = holder["engine"]
    persistent = _resident_bytes() - before  # what the engine holds after its first step
    growth = max(_live_bytes(lambda: step(engine))[1] for _ in range(2))  # a steady-state step over that
    for _ in range(spec.get("warm", WARM_STEPS)):  # ZeRO-3 traces its parameter fetches over the first steps
        step(engine)
    comms_logger.comms_dict = {}
    times = []
    for _ in range(spec["steps"]):
        torch.distributed.barrier()
        started = time.perf_counter()
        step(engine)
        torch.distributed.barrier()
        times.append(time.perf_counter() - started)
    comms = comms_summary()
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    out = {"params": params, "state_bytes": persistent, "peak_bytes": persistent + growth, "step_s": times,
           "pass_elements_per_step": ring_passes_elements(comms, world=world, steps=spec["steps"]) / 4,
           "calls_per_step": {op: r["count"] / spec["steps"] for op, r in comms.items()}}
    engine.destroy()
    comms_logger.comms_dict = {}
    return out


def _allreduce_bench(world: int) -> dict:
    import torch
    import torch.distributed as dist
    sizes = [2 ** k for k in range(12, 25, 2)]  # 4 KiB .. 16 MiB
    seconds = []
    for size in sizes:
        x = torch.ones(size // 4)
        for _ in range(2):
            dist.all_reduce(x)
        runs = []
        for _ in range(7):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(x)
            runs.append(time.perf_counter() - started)
        seconds.append(statistics.median(runs))
    gbps, latency = fit_alpha_beta(sizes, seconds, ranks=world)
    return {"bytes": sizes, "seconds": seconds, "gbps": gbps, "latency_us": latency}


def worker(spec: dict) -> None:
    import torch
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    import deepspeed
    import torch.distributed as dist
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    world, rank = dist.get_world_size(), dist.get_rank()
    out = {"world": world, "threads": spec["threads"], "stages": {}}
    if world > 1 and spec.get("allreduce", True):
        out["allreduce"] = _allreduce_bench(world)
    for stage in spec["stages"]:
        out["stages"][str(stage)] = _stage(spec, stage, world)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(out))


def run_workers(spec: dict, *, world: int, timeout: float) -> dict:
    """``world`` fresh processes of ``worker(spec)``; rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "out": str(Path(tmp) / "out.json")}
        port = str(free_port())
        procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.plan_validate", json.dumps(spec)], cwd=ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"validation workers failed ({[p.returncode for p in procs]}):\n{logs[0][-3000:]}")
        return json.loads(Path(spec["out"]).read_text())


# ----------------------------------------------------------------------------------------------
# the comparisons

TOLERANCE = 0.25


def _flags(model: dict) -> list[str]:
    return [a for k, v in model.items() for a in (f"--model-{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v))]


def _step_times(run_dir: Path) -> list[float]:
    """The ``step_time_s`` column of a run's ``metrics.csv``."""
    import csv
    with open(run_dir / "metrics.csv") as f:
        return [float(r["step_time_s"]) for r in csv.DictReader(f)]


def _job(args: list[str], *, run_dir: Path, env: dict, timeout: float) -> list[float]:
    """Step times (``metrics.csv``) of ``bash launch/train.sh ARGS`` under ``env``."""
    out = subprocess.run(["bash", "launch/train.sh", *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"launch/train.sh failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return _step_times(run_dir)


def two_node_job(model: dict, *, residues: int, micro_batch: int, steps: int, tmp: Path) -> dict:
    """The main job at 1 process, then as 2 simulated nodes (two launchers, ``NO_SSH=1``), one thread
    per process; step times after the first two."""
    common = [*_flags(model), "--data-max-length", str(residues), "--data-batch-size", str(micro_batch),
              "--run-threads", "1", "--run-log-every", "1", "--run-progress", "false", "--run-val-max-batches", "1",
              "--max-steps", str(steps)]
    python = {"PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    one = _job([*common, "--run-dir", str(tmp / "one")], run_dir=tmp / "one",
               env={**python, "NUM_GPUS": "1", "MASTER_PORT": str(free_port())}, timeout=600)
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=1\nnode-b slots=1\n")
    port, run_dir = str(free_port()), tmp / "two-node"
    procs = [subprocess.Popen(["bash", "launch/train.sh", *common], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **python, "NUM_NODES": "2", "NO_SSH": "1", "NODE_RANK": str(rank),
                                   "HOSTFILE": str(hostfile), "MASTER_PORT": port, "RUN_DIR": str(run_dir)})
             for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"the 2-node run failed ({[p.returncode for p in procs]}):\n{logs[0][-3000:]}")
    two = _step_times(run_dir)
    return {"one_process_step_s": one[2:], "two_node_step_s": two[2:]}


def validate(model: dict, *, residues: int, micro_batch: int, steps: int, job_steps: int) -> dict:
    """Every comparison at 2 processes on this machine, one thread per process. ``model``: the
    ``--model-*`` values given (the rest are the main job's defaults)."""
    import dataclasses

    from bench import plan
    from vnt.denoiser import default_model_config

    started = time.perf_counter()
    threads = max(1, (os.cpu_count() or 2) // 2)
    zero = {"reduce_bucket_size": VALIDATE_BUCKET, "allgather_bucket_size": VALIDATE_BUCKET}
    spec = {"model": model, "residues": residues, "micro_batch": micro_batch, "steps": steps, "threads": threads,
            "stages": [0, 1, 2, 3], "zero": zero}
    import torch
    torch.set_num_threads(threads)
    measured = plan.measure(dataclasses.replace(default_model_config(), **model), residues=residues,
                            micro_batch=micro_batch, dtype="float32", rounds=steps)
    # each stage in fresh processes: what one stage's engine leaves behind is freed inside the next
    # one's profile otherwise, and its memory reads up to 4 Psi low
    one, two = ({"stages": {}} for _ in range(2))
    for stage in spec["stages"]:
        for world, into in ((1, one), (2, two)):
            got = run_workers({**spec, "stages": [stage], "allreduce": stage == spec["stages"][0]}, world=world,
                              timeout=900)
            into["stages"].update(got["stages"])
            into.update({k: v for k, v in got.items() if k != "stages"})
    ab = two["allreduce"]
    psi = measured["params"]
    rows = []

    def compare(quantity, measured_value, predicted, note=""):
        ratio = measured_value / predicted if predicted else float("nan")
        rows.append({"quantity": quantity, "measured": measured_value, "predicted": predicted, "ratio": ratio,
                     "within_25pct": abs(ratio - 1) <= TOLERANCE, "note": note})

    for stage in range(4):
        got = two["stages"][str(stage)]
        compare(f"comm elements per step, ZeRO-{stage}", got["pass_elements_per_step"], plan.comm_passes(stage) * psi,
                f"ring passes x elements from DeepSpeed's comms logger; calls per step {got['calls_per_step']}")
    for stage in range(4):
        got = two["stages"][str(stage)]
        predicted = (plan.model_state_bytes(psi, stage=stage, ranks=2, mixed=False, persistent=measured["persistent_params"])
                     + max(measured["steps"]["none"]["activation_bytes"],
                           plan.after_backward_bytes(stage=stage, elem_bytes=4, params=psi, ranks=2))
                     + plan.bucket_bytes(stage=stage, elem_bytes=4, bucket_elements=VALIDATE_BUCKET, params=psi))
        compare(f"peak memory per rank (MiB), ZeRO-{stage}", got["peak_bytes"] / 2 ** 20, predicted / 2 ** 20,
                "peak live tensor bytes of a steady-state step; predicted: model states + activations (measured in "
                "1 process without DeepSpeed; ZeRO-0's flattened all-reduce after the backward where larger) + "
                "DeepSpeed's buffers (ZeRO 1-3 reduce bucket, ZeRO-2 unreduced gradients, ZeRO-3 gathered parameters)")
    for stage in range(4):
        base = statistics.median(one["stages"][str(stage)]["step_s"])
        comm = plan.ring_time_s(psi * 4, ranks=2, passes=plan.comm_passes(stage), gbps=ab["gbps"],
                                latency_us=ab["latency_us"])
        compare(f"step time (s) at 2 processes, ZeRO-{stage}", statistics.median(two["stages"][str(stage)]["step_s"]),
                base + comm, f"predicted: the 1-process step {base:.4g} s + ring {comm:.4g} s (gloo alpha-beta, overlap 0)")
    with tempfile.TemporaryDirectory() as tmp:
        job = two_node_job(model, residues=residues, micro_batch=micro_batch, steps=job_steps, tmp=Path(tmp))
    base = statistics.median(job["one_process_step_s"])
    comm = plan.ring_time_s(psi * 4, ranks=2, passes=plan.comm_passes(0), gbps=ab["gbps"], latency_us=ab["latency_us"])
    compare("step time (s), simulated 2-node main job (NO_SSH), ZeRO-0", statistics.median(job["two_node_step_s"]),
            base + comm, f"launch/train.sh; predicted: its 1-process step {base:.4g} s + ring {comm:.4g} s")
    return {"validation": rows, "params": psi, "persistent_params": measured["persistent_params"],
            "threads_per_process": threads, "gloo_fit": ab, "reduce_bucket_size": VALIDATE_BUCKET,
            "residues": residues, "micro_batch": micro_batch, "steps": steps, "job_steps": job_steps,
            "raw": {"one_process": one, "two_processes": two, "job": job},
            "wall_s": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
