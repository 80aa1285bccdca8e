"""Project a training job to N GPUs x M nodes per ZeRO stage, from one step measured here.

    python -m bench.plan --model-dim 256 --model-depth 8 --residues 1024 --preset h100-ib --nodes 64

What is measured on this machine (one process, the main job's network, ``vnt.denoiser.BackboneDenoiser``
with the ``--model-*`` options of training, on ``--residues`` residues x ``--micro-batch``):
  - FLOPs of one forward+backward (``torch.utils.flop_counter.FlopCounterMode``; with activation
    checkpointing the recomputed forward is counted too);
  - the step's activation memory: the peak growth of live tensor bytes during a step whose gradient
    buffers already exist (``bench.measure.cpu_tensor_peak_bytes``), in the planned dtype (bfloat16
    under autocast);
  - the step time and a dense GEMM in the same dtype: their ratio (FLOPs / time / GEMM) is the
    achieved fraction of peak (MFU) that projects compute to another device unless ``--mfu`` is given.

What is projected (formulas, assumptions stated in the output's ``assumptions``):
  - model states per rank, Psi parameters: mixed precision (the ZeRO paper): ZeRO 0 16 Psi bytes,
    ZeRO-1 4 Psi + 12 Psi / N, ZeRO-2 2 Psi + 14 Psi / N, ZeRO-3 16 Psi / N; float32 (DeepSpeed keeps
    a float32 copy of each rank's partition): 16 Psi, 8 Psi + 12 Psi / N, 4 Psi + 16 Psi / N, 20 Psi / N;
    ZeRO-3 keeps tensors under 1e5 elements whole on every rank. Plus activations, DeepSpeed's buffers
    (ZeRO-0 on more than one rank: the gradients flattened for the all-reduce after the backward, up
    to 5e8 elements, where they exceed the activations; ZeRO 1-3: the reduce bucket,
    ``--reduce-bucket-size`` elements in the gradient dtype; ZeRO-2: the unreduced gradients of a
    bucket, as many again; ZeRO-3: the gathered parameters, up to 1e9 elements) and ``--buffer-gib``.
  - communication per rank and step, in ring passes of Psi elements: ZeRO-0 all-reduces the gradients
    (2), ZeRO-1/2 all-reduce the gradient buckets and all-gather the parameters (3, DeepSpeed's default
    ``use_multi_rank_bucket_allreduce``; the ZeRO paper's reduce-scatter would be 2), ZeRO-3 gathers
    the parameters twice and reduce-scatters the gradients (3). Ring collectives under the alpha-beta
    model, t = (n - 1) / n x bytes / B + (n - 1) alpha per pass, with B the intra-node bandwidth on one
    node and the inter-node bandwidth per GPU beyond one (nccl-tests' bus bandwidth).
  - step time = compute + max(0, communication - overlap x backward), backward = 2/3 of compute.

``--validate`` measures these on this machine at 2 processes (``bench.plan_validate``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
OUT = ROOT / "results" / "plan"
GIB = 2 ** 30
DS_REDUCE_BUCKET = 5e8          # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
DS_ALLREDUCE_BUFFER = 5 * 10 ** 8  # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE: ZeRO-0's flattened all-reduce (elements)
DS_MAX_LIVE = 10 ** 9           # DeepSpeed's default stage3_max_live_parameters (elements)
DS_PERSISTENCE = 10 ** 5        # DeepSpeed's default stage3_param_persistence_threshold (elements)


@dataclasses.dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int
    intra_gbps: float          # GB/s per GPU within a node (bus bandwidth)
    inter_gbps: float          # GB/s per GPU across nodes (bus bandwidth)
    intra_latency_us: float
    inter_latency_us: float
    device_tflops: float       # dense peak of one device in the planned dtype
    device_mem_gib: float
    source: str = "given on the command line"

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


# named clusters: assumptions, each with where its numbers come from
PRESETS = {
    "h100-ib": dict(gpus_per_node=8, intra_gbps=450.0, inter_gbps=50.0, intra_latency_us=5.0, inter_latency_us=10.0,
                    device_tflops=989.0, device_mem_gib=80.0,
                    source="assumed: 8x H100 SXM per node, NVLink 4 (900 GB/s bidirectional, 450 GB/s per "
                           "direction, NVIDIA H100 datasheet), one 400 Gb/s InfiniBand NIC per GPU (50 GB/s, "
                           "ConnectX-7), dense bf16 989 TFLOP/s (datasheet, without sparsity), 80 GB; latencies "
                           "are typical NCCL orders of magnitude, not measured"),
    "a100-ib": dict(gpus_per_node=8, intra_gbps=300.0, inter_gbps=25.0, intra_latency_us=5.0, inter_latency_us=10.0,
                    device_tflops=312.0, device_mem_gib=80.0,
                    source="assumed: 8x A100 SXM 80 GB per node, NVLink 3 (600 GB/s bidirectional, NVIDIA A100 "
                           "datasheet), one 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s), dense bf16 312 TFLOP/s"),
    "cpu-gloo": dict(gpus_per_node=2, intra_gbps=5.0, inter_gbps=1.0, intra_latency_us=50.0, inter_latency_us=200.0,
                     device_tflops=0.0, device_mem_gib=24.0,
                     source="assumed: CPU processes on gloo, this machine's order of magnitude (shared memory "
                            "within a node, 10 Gb/s Ethernet across); device_tflops 0: this machine's measured rate"),
}


def ring_time_s(nbytes: float, *, ranks: int, passes: int, gbps: float, latency_us: float) -> float:
    """``passes`` ring collectives (reduce-scatter or all-gather) of ``nbytes`` each over ``ranks``."""
    if ranks <= 1:
        return 0.0
    return passes * ((ranks - 1) / ranks * nbytes / (gbps * 1e9) + (ranks - 1) * latency_us * 1e-6)


def model_state_bytes(params: int, *, stage: int, ranks: int, mixed: bool, persistent: int = 0) -> float:
    """Parameters, gradients and Adam states per rank. Mixed precision: the ZeRO paper's accounting
    (K = 12: a float32 master copy, m and v). Float32: DeepSpeed's, which keeps a float32 copy of each
    rank's partition for ZeRO 1-3 even when the model is float32 (measured by ``--validate``).
    ``persistent``: parameters ZeRO-3 keeps whole on every rank (tensors under DeepSpeed's
    ``stage3_param_persistence_threshold``)."""
    p, n = params, ranks
    if mixed:  # bf16 params + bf16 grads + fp32 master, m, v
        states = {0: 16 * p, 1: 4 * p + 12 * p / n, 2: 2 * p + 14 * p / n, 3: 16 * p / n}[stage]
    else:      # fp32 params + fp32 grads + m, v (+ the fp32 partition copy under ZeRO 1-3)
        states = {0: 16 * p, 1: 8 * p + 12 * p / n, 2: 4 * p + 16 * p / n, 3: 20 * p / n}[stage]
    if stage == 3:
        states += (2 if mixed else 4) * persistent * (1 - 1 / n)
    return states


def comm_passes(stage: int) -> int:
    """Ring passes of the whole parameter vector per step. ZeRO-0: one all-reduce of the gradients
    (2). ZeRO-1/2 under DeepSpeed's default (``use_multi_rank_bucket_allreduce``) all-reduce the
    gradient buckets (2) and all-gather the updated parameters (1): 3, where the ZeRO paper's
    reduce-scatter counts 2. ZeRO-3: two parameter all-gathers and a gradient reduce-scatter (3)."""
    return 2 if stage == 0 else 3


def comm_bytes(params: int, *, stage: int, elem_bytes: int) -> float:
    """Bytes of ring passes per step: ``comm_passes`` x Psi elements."""
    return comm_passes(stage) * params * elem_bytes


def bucket_bytes(*, stage: int, elem_bytes: int, bucket_elements: float, params: int = 0) -> float:
    """DeepSpeed's buffers that live beside the activations (measured by ``--validate``): ZeRO 1-3's
    gradient reduce bucket (``zero_optimization.reduce_bucket_size`` elements in the gradient dtype);
    under ZeRO-2, whose states count only the gradient partition, the full gradients a bucket collects
    before it is reduced (up to a bucket's worth, or Psi); under ZeRO-3 the gathered parameters of the
    working set, up to ``stage3_max_live_parameters`` (1e9 elements by default) of the ``params``."""
    if stage == 0:
        return 0.0
    gathered = min(params, DS_MAX_LIVE) * elem_bytes if stage == 3 else 0.0
    unreduced = min(params, bucket_elements) * elem_bytes if stage == 2 else 0.0
    return bucket_elements * elem_bytes + unreduced + gathered


def after_backward_bytes(*, stage: int, elem_bytes: int, params: int, ranks: int) -> float:
    """ZeRO-0 on more than one rank flattens the gradients into all-reduce buffers of up to
    ``DS_ALLREDUCE_BUFFER`` elements (DeepSpeed's ``buffered_allreduce_fallback``). That happens
    after the backward pass has freed the activations, so it adds to the peak only beyond them."""
    return min(params, DS_ALLREDUCE_BUFFER) * elem_bytes if stage == 0 and ranks > 1 else 0.0


def project(measured: dict, cluster: Cluster, *, stages=(0, 1, 2, 3), overlap: float, buffer_gib: float,
            mfu: float | None, gpus: int | None = None, bucket_elements: float = DS_REDUCE_BUCKET) -> list[dict]:
    """One row per (ZeRO stage, activation checkpointing) at ``gpus`` ranks (default: the whole cluster)."""
    n = cluster.gpus if gpus is None else gpus
    nodes = max(1, math.ceil(n / cluster.gpus_per_node))
    gbps, lat = (cluster.intra_gbps, cluster.intra_latency_us) if nodes == 1 else (cluster.inter_gbps,
                                                                                    cluster.inter_latency_us)
    mixed = measured["dtype"] == "bfloat16"
    elem = 2 if mixed else 4
    rows = []
    for ckpt, m in measured["steps"].items():
        if cluster.device_tflops > 0:
            rate = cluster.device_tflops * 1e12 * (measured["mfu"] if mfu is None else mfu)
            compute = m["flops"] / rate
        else:  # this machine's own rate
            compute = m["step_s"]
        for stage in stages:
            states = model_state_bytes(measured["params"], stage=stage, ranks=n, mixed=mixed,
                                       persistent=measured.get("persistent_params", 0))
            buckets = bucket_bytes(stage=stage, elem_bytes=elem, bucket_elements=bucket_elements, params=measured["params"])
            after = after_backward_bytes(stage=stage, elem_bytes=elem, params=measured["params"], ranks=n)
            comm = ring_time_s(measured["params"] * elem, ranks=n, passes=comm_passes(stage), gbps=gbps, latency_us=lat)
            exposed = max(0.0, comm - overlap * compute * 2 / 3)
            step = compute + exposed
            single = compute  # one device, no communication
            working = max(m["activation_bytes"], after)  # the activations, or what comes after them
            memory = states + working + buckets + buffer_gib * GIB
            rows.append({
                "zero_stage": stage, "activation_checkpointing": ckpt == "checkpointing", "gpus": n, "nodes": nodes,
                "params": measured["params"], "model_states_gib": states / GIB,
                "activations_gib": working / GIB, "ds_buckets_gib": buckets / GIB, "buffers_gib": buffer_gib,
                "memory_per_rank_gib": memory / GIB, "fits": memory <= cluster.device_mem_gib * GIB,
                "compute_s": compute, "comm_bytes_per_rank": comm_bytes(measured["params"], stage=stage, elem_bytes=elem),
                "comm_s": comm, "step_s": step, "tokens_per_s": measured["tokens_per_step"] * n / step,
                "weak_scaling_efficiency": single / step, "hours_per_1k_steps": step * 1000 / 3600,
            })
    return rows


def recommend(rows: list[dict]) -> dict | None:
    """The fastest setting that fits (ties: the lower stage, then without checkpointing)."""
    fits = [r for r in rows if r["fits"]]
    return min(fits, key=lambda r: (r["step_s"], r["zero_stage"], r["activation_checkpointing"])) if fits else None


# ----------------------------------------------------------------------------------------------
# measuring one step here

def denoiser_inputs(*, residues: int, micro_batch: int, seed: int = 0, num_tokens: int | None = None):
    """A random backbone for the denoiser: (coords (b, n, 3) in Angstrom, tokens (b, n), mask (b, n)),
    n = residues x 4 atoms, every point real."""
    import torch
    from vnt.denoiser import NUM_ATOMS, NUM_RESIDUE_TOKENS
    gen = torch.Generator().manual_seed(seed)
    b, n = micro_batch, residues * NUM_ATOMS
    return (torch.randn(b, n, 3, generator=gen) * 10,
            torch.randint(0, num_tokens or NUM_RESIDUE_TOKENS * NUM_ATOMS, (b, n), generator=gen),
            torch.ones(b, n, dtype=torch.bool))


def measure(model_cfg, *, residues: int, micro_batch: int, dtype: str, rounds: int, seed: int = 0) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.measure import cpu_tensor_peak_bytes, gemm_peak_flops, time_fn
    from vnt.denoiser import BackboneDenoiser

    torch.manual_seed(seed)
    coors, tokens, mask = denoiser_inputs(residues=residues, micro_batch=micro_batch, seed=seed,
                                          num_tokens=model_cfg.num_tokens)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    steps = {}
    params = None
    for label in ("none", "checkpointing"):
        model = BackboneDenoiser(model_cfg)
        params = sum(p.numel() for p in model.parameters())
        if label == "checkpointing":
            model.checkpoint_layers()

        def step():
            with autocast:
                out = model(coors, tokens=tokens, mask=mask)
            out.float().square().mean().backward()

        step()  # warm-up
        with FlopCounterMode(display=False) as counter:
            step()
        grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)  # as an optimizer leaves them: the step allocates them again
        peak = cpu_tensor_peak_bytes(step) - grads
        times = time_fn(step, rounds=rounds, warmup=0, device="cpu")
        steps[label] = {"flops": int(counter.get_total_flops()), "activation_bytes": int(peak),
                        "step_s": sorted(times)[len(times) // 2]}
    gemm = gemm_peak_flops(dtype, "cpu")
    base = steps["none"]
    persistent = sum(p.numel() for p in model.parameters() if p.numel() < DS_PERSISTENCE)
    return {"params": params, "persistent_params": persistent, "dtype": dtype, "residues": residues, "micro_batch": micro_batch,
            "tokens_per_step": residues * micro_batch, "steps": steps, "gemm_flops": gemm,
            "mfu": base["flops"] / base["step_s"] / gemm, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------

def build_parser():
    from vnt import cli
    from vnt.denoiser import default_model_config
    from vnt.model import VNTransformerConfig

    p = cli.Parser(prog="python -m bench.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dests = cli.add_options(p, VNTransformerConfig, default_model_config(), prefix="model-", title="model")
    job = p.add_argument_group("job")
    job.add_argument("--residues", type=int, default=256, help="residues per chain (the sequence length)")
    job.add_argument("--micro-batch", type=int, default=1, help="chains per rank and step")
    job.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="training precision: bfloat16 (mixed-precision Adam) or float32")
    job.add_argument("--rounds", type=int, default=3, help="timed steps measured here")
    c = p.add_argument_group("cluster")
    c.add_argument("--preset", choices=sorted(PRESETS), default="h100-ib", help="named cluster assumptions")
    for name, kind, text in (("gpus-per-node", int, "devices per node"), ("nodes", int, "nodes"),
                             ("intra-gbps", float, "GB/s per device within a node"),
                             ("inter-gbps", float, "GB/s per device across nodes"),
                             ("intra-latency-us", float, "collective latency per hop within a node"),
                             ("inter-latency-us", float, "collective latency per hop across nodes"),
                             ("device-tflops", float, "dense peak TFLOP/s of one device in the dtype (0: this machine's rate)"),
                             ("device-mem-gib", float, "memory of one device")):
        c.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: the preset's)")
    c.add_argument("--mfu", type=float, default=None,
                   help="achieved fraction of the device peak (default: the fraction measured here against a GEMM)")
    c.add_argument("--overlap", type=float, default=0.5,
                   help="fraction of the backward pass that hides communication (assumption)")
    c.add_argument("--buffer-gib", type=float, default=2.0,
                   help="per-rank allowance for the CUDA context, NCCL buffers and fragmentation")
    c.add_argument("--reduce-bucket-size", type=float, default=DS_REDUCE_BUCKET,
                   help="DeepSpeed's zero_optimization.reduce_bucket_size, elements (its default 5e8)")
    p.add_argument("--validate", action="store_true",
                   help="measure communication, memory and step time at 2 processes here against the model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=str(OUT), help="folder for the scaling plot ('' = none)")
    return p, dests


def cluster_from_args(args) -> Cluster:
    base = {"nodes": 1, **PRESETS[args.preset]}
    given = {k: getattr(args, k) for k in ("gpus_per_node", "nodes", "intra_gbps", "inter_gbps", "intra_latency_us",
                                          "inter_latency_us", "device_tflops", "device_mem_gib")
             if getattr(args, k) is not None}
    cluster = Cluster(**{**base, **given})
    if given.keys() - {"nodes", "gpus_per_node"}:
        cluster = dataclasses.replace(cluster, source=f"preset {args.preset} with {sorted(given)} given: {cluster.source}")
    for name in ("gpus_per_node", "nodes"):
        if getattr(cluster, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cluster, name)}")
    return cluster


def plot(measured: dict, cluster: Cluster, path: Path, **kw) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = sorted({1, *(2 ** k for k in range(int(math.log2(cluster.gpus)) + 1)), cluster.gpus})
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in (0, 1, 2, 3):
        rows = [next(r for r in project(measured, cluster, stages=(stage,), gpus=g, **kw)
                     if not r["activation_checkpointing"]) for g in counts]
        a.plot(counts, [r["tokens_per_s"] for r in rows], marker="o", label=f"ZeRO-{stage}")
        b.plot(counts, [r["weak_scaling_efficiency"] for r in rows], marker="o", label=f"ZeRO-{stage}")
    for ax, label in ((a, "tokens (residues) / s"), (b, "weak-scaling efficiency")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"GPUs ({cluster.gpus_per_node} per node)")
        ax.set_ylabel(label)
        ax.legend()
    a.set_yscale("log")
    fig.suptitle("projection from stated assumptions (bench.plan), not a measurement", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ["zero_stage", "activation_checkpointing", "memory_per_rank_gib", "fits", "compute_s", "comm_s", "step_s",
           "tokens_per_s", "weak_scaling_efficiency", "hours_per_1k_steps"]


def print_validation(args, model: dict) -> int:
    from bench import plan_validate
    result = plan_validate.validate(model, residues=args.residues, micro_batch=args.micro_batch, steps=args.rounds,
                                    job_steps=args.rounds + 4)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "validation.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
        return 0
    import pandas as pd
    print(f"validation at 2 processes x {result['threads_per_process']} thread(s), {result['params']:,} parameters, "
          f"{args.residues} residues x {args.micro_batch}; gloo fit {result['gloo_fit']['gbps']:.3g} GB/s, "
          f"{result['gloo_fit']['latency_us']:.3g} us")
    table = pd.DataFrame(result["validation"])[["quantity", "measured", "predicted", "ratio", "within_25pct"]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def main(argv=None) -> int:
    from vnt import cli
    from vnt.denoiser import default_model_config

    p, dests = build_parser()
    args = p.parse_args(argv)
    try:
        model_cfg = dataclasses.replace(default_model_config(), **cli.given(args, dests))
        cluster = cluster_from_args(args)
        for name in ("residues", "micro_batch", "rounds"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not 0 <= args.overlap <= 1:
            raise ValueError(f"--overlap must be in [0, 1], got {args.overlap}")
    except (ValueError, TypeError) as err:
        cli.fail(p, err)
    if args.validate:
        return print_validation(args, cli.given(args, dests))
    started = time.perf_counter()
    measured = measure(model_cfg, residues=args.residues, micro_batch=args.micro_batch, dtype=args.dtype,
                       rounds=args.rounds)
    kw = dict(overlap=args.overlap, buffer_gib=args.buffer_gib, mfu=args.mfu, bucket_elements=args.reduce_bucket_size)
    rows = project(measured, cluster, **kw)
    best = recommend(rows)
    assumptions = {
        "cluster": dataclasses.asdict(cluster), "overlap": args.overlap, "buffer_gib": args.buffer_gib,
        "mfu": args.mfu if args.mfu is not None else measured["mfu"], "reduce_bucket_size": args.reduce_bucket_size,
        "mfu_source": "given" if args.mfu is not None else "measured here: FLOPs / step time / dense GEMM, same dtype",
        "gradient_accumulation": 1, "activations": "measured here on a CPU; a GPU's kernels may save different tensors",
    }
    plot_path = None
    if args.out:
        plot_path = Path(args.out) / "scaling.png"
        plot(measured, cluster, plot_path, **kw)
    result = {"model": dataclasses.asdict(model_cfg), "measured": measured, "assumptions": assumptions,
              "rows": rows, "recommendation": best, "plot": str(plot_path) if plot_path else None,
              "wall_s": round(time.perf_counter() - started, 1)}
    if args.json:
        print(json.dumps(result))
        return 0
    import pandas as pd
    print(f"projection for {cluster.gpus} GPUs ({cluster.nodes} x {cluster.gpus_per_node}), {args.residues} residues x "
          f"{args.micro_batch} per rank, {args.dtype}, {measured['params']:,} parameters; MFU {assumptions['mfu']:.2f} "
          f"({assumptions['mfu_source']})\nassumptions: {cluster.source}; overlap {args.overlap}, buffers "
          f"{args.buffer_gib} GiB per rank")
    print(pd.DataFrame(rows)[COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if best is None:
        print(f"recommendation: nothing fits {cluster.device_mem_gib} GiB per device: fewer residues per rank")
    else:
        print(f"recommendation: ZeRO-{best['zero_stage']}{' with activation checkpointing' if best['activation_checkpointing'] else ''}"
              f" ({best['step_s']:.3g} s per step, {best['memory_per_rank_gib']:.3g} GiB per rank)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
