"""Measure one case: time, FLOPs, utilisation, peak memory, equivariance error.

Protocol: every case is checked against the reference path first (correct before fast), then
``warmup`` untimed steps, then ``rounds`` timed steps; medians and inter-quartile ranges are
reported. Peak memory, of one more step after the timed ones: on CUDA the caching allocator's
peak; on CPU the peak of live tensor bytes, summed in order from the allocations and frees that
``torch.profiler`` (``profile_memory=True``) records from the CPU allocator (every tensor buffer,
the compiled kernels' included). Exact and independent of the C allocator: the resident set is
not, as memory freed by earlier steps stays resident and serves the measured one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from bench.cases import Case
from bench.stats import encode_rounds, quartiles  # noqa: F401 (quartiles: the benchmarks' import)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build(case: Case, device: str = "cpu", *, seed: int = 0):
    """Model and inputs for a case (seeded)."""
    torch.manual_seed(seed)
    kw = dict(dim=case.dim, depth=case.depth, heads=case.heads, dim_head=case.dim_head,
              dim_feat=case.dim_feat if case.fusion else None, bias_epsilon=case.bias_epsilon)
    if case.impl == "original":
        from VN_transformer import VNTransformer as Original
        model = Original(**kw, flash_attn=case.backend == "sdpa", l2_dist_attn=case.backend == "l2")
    else:
        from vnt import PAPER_NORMS, VNTransformer, fast
        if case.norms not in ("vnt", "paper"):
            raise ValueError(f"Case.norms must be 'vnt' or 'paper', got {case.norms!r}")
        norms = PAPER_NORMS if case.norms == "paper" else {}
        model = VNTransformer(**kw, attn_backend=case.backend, **norms)
        if case.attn_fold is not None:  # the kernel plan's fold setting, for this model's forwards
            model = fast.planned(model, fold=case.attn_fold)
    model = model.to(device)
    if case.compile:
        model = torch.compile(model)
    coors = torch.randn(case.batch, case.n, 3, device=device)
    feats = torch.randn(case.batch, case.n, case.dim_feat, device=device) if case.fusion else None
    return model, coors, feats


def autocast_for(case: Case, device: str):
    if case.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[case.dtype])


def step_fns(model, coors, feats, case: Case, device: str):
    def forward():
        with torch.no_grad(), autocast_for(case, device):
            return model(coors, feats=feats)

    def forward_backward():
        with autocast_for(case, device):
            out = model(coors, feats=feats)
        loss = sum(o.float().pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
        model.zero_grad(set_to_none=True)

    return forward, forward_backward


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, *, rounds: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def count_flops(case: Case, device: str) -> int:
    """FLOPs of one forward+backward, counted by FlopCounterMode on the written-out attention path
    of the same model (math for sdpa, l2_math for vnt's l2): the counter does not see inside the
    fused CPU SDPA kernels, and the arithmetic is the same, except that vnt's l2_math counts the
    tied-key form (its score backward is one GEMM, where a fused kernel runs two: l2 rows run on
    SDPA, ``attn_kernel`` not "einsum", did one GEMM per score more than counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    written_out = {"sdpa": "math", "l2": "l2_math" if case.impl == "vnt" else "l2"}
    model, coors, feats = build(dataclasses.replace(case, backend=written_out.get(case.backend, case.backend),
                                                    compile=False), device)
    _, fb = step_fns(model, coors, feats, case, device)
    with FlopCounterMode(display=False) as counter:
        fb()
    return counter.get_total_flops()


def gemm_peak_flops(dtype: str, device: str = "cpu", size: int = 2048, rounds: int = 10) -> float:
    """Dense GEMM FLOP/s in this dtype on this device: the roofline cases are held against. The
    fastest of ``rounds`` products: on a shared machine a few rounds can all land in a slow moment
    (the 81e5e70 run measured 123 GFLOP/s from 3 rounds of 1024^3, where runs before had 228-269)."""
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    b = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    times = time_fn(lambda: a @ b, rounds=rounds, warmup=2, device=device)
    return 2 * size ** 3 / min(times)


def compiled_vs_eager(case: Case, compiled, coors, feats, device: str) -> float:
    """Max abs difference of the compiled model's output to the same weights run eagerly."""
    eager = build(dataclasses.replace(case, compile=False), device)[0]  # seeded: the same weights
    with torch.no_grad():
        a, b = compiled(coors, feats=feats), eager(coors, feats=feats)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    return (a - b).abs().max().item()


def bf16_native(device: str) -> bool:
    """Whether this device multiplies bfloat16 natively: AVX512-BF16 or AMX-BF16 on a CPU (Linux
    cpuinfo flags), compute capability 8 or more on CUDA."""
    if device == "cuda":
        return torch.cuda.get_device_capability()[0] >= 8
    from bench.report import cpu_flags
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def reference_check(case: Case, device: str) -> float:
    """Max abs difference of this backend against the math path (same weights, float32); for l2, the
    written-out L2 attention in projected form (per-head keys: a computation that shares no kernel or
    folding with the l2 backend's, whichever of its paths runs)."""
    if case.impl != "vnt" or case.backend == "math":
        return 0.0
    from vnt import VNTransformer, fast
    model, coors, feats = build(dataclasses.replace(case, compile=False), device)
    ref = VNTransformer(**{**model.config.to_dict(), "attn_backend": "l2_math" if case.backend == "l2" else "math"})
    ref = fast.planned(ref.to(device), fold=False) if case.backend == "l2" else ref.to(device)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(coors, feats=feats), ref(coors, feats=feats)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    return (a - b).abs().max().item()


def equivariance(case: Case, device: str, num_rotations: int = 3) -> tuple[float, float]:
    """(error, floor): ``vnt.equivariance_error`` of the case's model in its dtype, and for vnt rows
    ``vnt.rounding_floor`` (float64 arithmetic, inputs and every VN block's output rounded to that
    dtype), NaN for the original package, whose blocks the floor does not know."""
    from vnt import equivariance_error, rounding_floor
    model, coors, feats = build(dataclasses.replace(case, compile=False), device)  # compiled = eager: checked
    err = equivariance_error(model, coors, feats=feats, num_rotations=num_rotations,
                             autocast_dtype=None if case.dtype == "float32" else DTYPES[case.dtype],
                             generator=torch.Generator().manual_seed(0))
    floor = float("nan")
    if case.impl == "vnt":
        floor = rounding_floor(model, coors, feats=feats, dtype=DTYPES[case.dtype], activations=True,
                               num_rotations=num_rotations, generator=torch.Generator().manual_seed(0)).rel
    return err.rel, floor


def peak_memory_mib(case: Case, device: str) -> tuple[float, str]:
    """Peak memory of one forward+backward of a freshly built ``case`` after a warm-up step (see
    ``step_peak_memory_mib``)."""
    model, coors, feats = build(case, device)
    _, fb = step_fns(model, coors, feats, case, device)
    fb()
    return step_peak_memory_mib(fb, device)


def step_peak_memory_mib(fb, device: str) -> tuple[float, str]:
    """Peak memory of one call of the step ``fb``, which has run at least once (one-time costs, such
    as vnt.fast.kernels compiling its fused kernels, stay out), and the method's name (module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fb()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20, "cuda_allocator_peak"
    return cpu_tensor_peak_bytes(fb) / 2 ** 20, "cpu_profiler_tensor_peak"


def cpu_tensor_peak_bytes(fn) -> int:
    """Peak growth of live CPU tensor bytes while ``fn()`` runs: the allocator's allocation and free
    records under ``torch.profiler`` (``profile_memory=True``), summed in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                      and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    if not records:
        raise RuntimeError("torch.profiler recorded no CPU allocations (profile_memory=True): cannot measure memory")
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def child_step(case_json: str):
    """In a fresh process: the forward+backward step of the case ``Case.to_dict()`` serialised, on the CPU."""
    d = json.loads(case_json)
    d.pop("case_id")
    case = Case(**d)
    model, coors, feats = build(case, "cpu")
    return step_fns(model, coors, feats, case, "cpu")[1]


def measure(case: Case, *, device: str, rounds: int, warmup: int, peaks: dict[str, float],
            benchmark=None) -> dict:
    """One row. Out-of-memory becomes a row with status 'oom'; every other exception propagates."""
    row = {**case.to_dict(), "device": device, "rounds": rounds, "warmup": warmup, "status": "ok"}
    if case.dtype == "bfloat16":
        row["bf16_native"] = bf16_native(device)
    if case.impl == "original":
        try:
            import VN_transformer  # noqa: F401
        except ImportError:
            return {**row, "status": "skipped: VN-transformer not installed"}
    try:
        row["max_abs_diff_vs_math"] = reference_check(case, device)
        model, coors, feats = build(case, device)
        fwd, fb = step_fns(model, coors, feats, case, device)
        if case.compile:  # compile forward and forward+backward first, and check them against eager
            t = time.perf_counter()
            fwd()
            fb()
            row["compile_s"] = time.perf_counter() - t
            row["max_abs_diff_vs_eager"] = compiled_vs_eager(case, model, coors, feats, device)
        t_fwd = time_fn(fwd, rounds=rounds, warmup=warmup, device=device)
        if benchmark is not None:
            benchmark.pedantic(fb, rounds=rounds, warmup_rounds=warmup, iterations=1)
            t_fb = list(benchmark.stats.stats.data)
        else:
            t_fb = time_fn(fb, rounds=rounds, warmup=warmup, device=device)
        if case.impl == "vnt":  # the kernel(s) the attention layers ran: "einsum" = written out
            kernels = getattr(model, "_orig_mod", model).encoder.attention_kernels()
            row["attn_kernel"] = "+".join(sorted({str(k) for k in kernels}))
        flops = count_flops(case, device)
        # the timed step, already warm: no second model or warm-up step for the memory measurement
        mem, mem_method = (float("nan"), "not measured (compiled)") if case.compile else step_peak_memory_mib(fb, device)
        row["equiv_rel_err"], row["equiv_floor_rel_err"] = equivariance(case, device)
    except torch.OutOfMemoryError:
        return {**row, "status": "oom"}
    except torch._dynamo.exc.TorchDynamoException as err:  # torch.compile could not build this model
        return {**row, "status": f"compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    fb_med = statistics.median(t_fb)
    tokens = case.batch * case.n
    row.update({
        "fwd_ms": statistics.median(t_fwd) * 1e3,
        "fwd_ms_q1": quartiles(t_fwd)[0] * 1e3, "fwd_ms_q3": quartiles(t_fwd)[1] * 1e3,
        "fwd_bwd_ms": fb_med * 1e3,
        "fwd_bwd_ms_q1": quartiles(t_fb)[0] * 1e3, "fwd_bwd_ms_q3": quartiles(t_fb)[1] * 1e3,
        "fwd_bwd_ms_rounds": encode_rounds(t_fb),
        "tokens_per_s": tokens / fb_med,
        "fwd_bwd_gflop": flops / 1e9,
        "achieved_gflop_per_s": flops / fb_med / 1e9,
        "gemm_peak_gflop_per_s": peaks[case.dtype] / 1e9,
        "peak_fraction": flops / fb_med / peaks[case.dtype],
        "peak_mem_mib": mem, "mem_method": mem_method,
    })
    return row


def _subprocess_time(case_json: str, rounds: int) -> None:
    """Prints the median forward+backward time (s) of a case in this (fresh) process."""
    d = json.loads(case_json)
    d.pop("case_id")
    case = Case(**d)
    model, coors, feats = build(case, "cpu")
    _, fb = step_fns(model, coors, feats, case, "cpu")
    print(statistics.median(time_fn(fb, rounds=rounds, warmup=2, device="cpu")))


def time_in_subprocess(case: Case, *, rounds: int, env: dict) -> float:
    """Median forward+backward seconds of ``case`` in a fresh process with environment ``env``
    (settings that act at process start, such as GLIBC_TUNABLES)."""
    out = subprocess.run([sys.executable, "-m", "bench.measure", "--time", json.dumps(case.to_dict()), str(rounds)],
                         capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    return float(out.stdout.strip().splitlines()[-1])



def check_paired(ratios: list[float], row: dict, rows: list, key: str) -> None:
    """What every paired benchmark asserts of its own numbers: each ratio finite and positive, the
    row's median ``row[key]`` within its quartiles (``{key}_q1``, ``_q3``) and within its finite 95%
    interval (``{key}_lo``, ``_hi``, ``bench.stats.summarize``), and the row in the report."""
    if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise AssertionError(f"{row['case_id']}: ratios must be finite and positive, got {ratios}")
    q1, q3, lo, hi = (row[f"{key}_{s}"] for s in ("q1", "q3", "lo", "hi"))
    if not q1 <= row[key] <= q3:
        raise AssertionError(f"{row['case_id']}: median {row[key]} outside its quartiles [{q1}, {q3}]")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= row[key] <= hi):
        raise AssertionError(f"{row['case_id']}: median {row[key]} outside its 95% interval [{lo}, {hi}]")
    if row not in rows or row.get("status") != "ok":
        raise AssertionError(f"{row['case_id']}: no 'ok' row in the report")


if __name__ == "__main__":
    _subprocess_time(sys.argv[2], int(sys.argv[3]))  # time_in_subprocess: --time CASE_JSON ROUNDS
