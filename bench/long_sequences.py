"""Long sequences under a memory limit: one training step (forward + backward) per backend and
length in a fresh process. After the model and inputs are built and a warm step has run at 200
points with every fused kernel on (compiling vnt.fast.kernels), the process's address space is capped (RLIMIT_AS) at
its size then plus the limit, so an allocation that would take the step past
the limit fails there as out-of-memory. The quadratic attention matrix of the written-out `math`
path runs out where the SDPA kernels (sdpa, l2) train on.

    python -m bench.long_sequences [--limit-gib 1] [--lengths 1024,2048,4096] [--config small|attention]

--config small (default): dim 32, depth 2, 4 heads x 16, dim_feat 16 (bench.cases.SMALL);
--config attention: dim 8, depth 1, 8 heads x 4, no fusion (bench.cases.ATTN_MEMORY), a model whose
step memory is its attention, so the backends part by a wide margin even at small n.

writes results/bench/long_sequences.{csv,md,meta.json}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.cases import ATTN_MEMORY, BACKENDS, SMALL, Case

CONFIGS = {"small": SMALL, "attention": ATTN_MEMORY}

ROOT = Path(__file__).parents[1]
OUT = ROOT / "results" / "bench"


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def run_child(code: str, *args: str, timeout: float | None = None) -> tuple[dict | None, subprocess.CompletedProcess]:
    """``python -c code *args`` in a fresh process from the repository root: the JSON object on its
    last stdout line (None where it printed none) and the finished process. TimeoutExpired propagates."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
    last = last_line(proc.stdout)
    return (json.loads(last) if last.startswith("{") else None), proc


def _vm_size_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status (Linux only)")


WARM_POINTS = 200  # the warm step's length: past inductor's small-size guards, equal to no channel count


def warm_step(step) -> None:
    """Run ``step`` (a short one, ``WARM_POINTS`` long) with every fused kernel on (the plan's
    ``fused_min_numel`` 0), so that each compiles now, before a cap, and not in the measured step:
    the kernels take any length (dynamic shapes)."""
    from vnt import fast
    with fast.configure(fused_min_numel=0):
        step()


def capped_step(step, limit_bytes: int) -> dict:
    """Cap this process's address space at its size now plus ``limit_bytes`` (``RLIMIT_AS``), run
    ``step()`` once: ``{"status": "ok", "seconds", "peak_rss_mib"}``, or ``{"status": "oom", "error"}``
    where an allocation failed under the cap. The cap stays: call it last, in a process of its own."""
    import torch
    base = _vm_size_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (base + limit_bytes, base + limit_bytes))
    t = time.perf_counter()
    try:
        step()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:  # the CPU allocator's "can't allocate memory"
        text = str(err).lower()
        if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and "alloc" not in text and "memory" not in text:
            raise
        return {"status": "oom", "error": str(err).splitlines()[0][:200] if str(err) else type(err).__name__}
    return {"status": "ok", "seconds": time.perf_counter() - t,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _one_step(case_json: str, limit_bytes: int) -> None:
    """In the child: build the model, run a warm step (``warm_step``: it compiles vnt's fused kernels,
    whose compiler must not count against the limit), cap the address space at its size then plus the
    limit, then run one forward+backward at the case's length."""
    from bench.measure import child_step
    short = {**json.loads(case_json), "n": WARM_POINTS}
    warm_step(child_step(json.dumps(short)))
    result = capped_step(child_step(case_json), limit_bytes)
    if "seconds" in result:
        result["fwd_bwd_s"] = result.pop("seconds")
    print(json.dumps(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.long_sequences", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit-gib", type=float, default=1.0, help="address space the step may add (GiB)")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--config", default="small", choices=tuple(CONFIGS), help="model sizes (see above)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    import pandas as pd

    from bench.report import _config, environment
    env = environment()
    rows = []
    for n in map(int, args.lengths.split(",")):
        for backend in BACKENDS:
            case = Case(backend=backend, n=n, group="long", **CONFIGS[args.config])
            code = ("import sys; from bench.long_sequences import _one_step; "
                    "_one_step(sys.argv[1], int(sys.argv[2]))")
            result, proc = run_child(code, json.dumps(case.to_dict()), str(int(args.limit_gib * 2 ** 30)))
            if result is None:
                result = {"status": f"failed (exit {proc.returncode}): {last_line(proc.stderr)[:200]}"}
            rows.append({**case.to_dict(), "limit_gib": args.limit_gib, **result})
            print(rows[-1]["case_id"], result, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "long_sequences.csv", index=False)
    meta = {**env, "command": "python -m bench.long_sequences " + " ".join(argv or sys.argv[1:]),
            "limit_gib": args.limit_gib, "protocol": f"model and inputs built, one warm step at {WARM_POINTS} points with every fused kernel on (compiles them), then RLIMIT_AS = address space then + limit, then one timed step"}
    (out / "long_sequences.meta.json").write_text(json.dumps(meta, indent=2))
    table = df.pivot_table(index="n", columns="backend", values="status", aggfunc="first")
    ok = df[df["status"] == "ok"]
    time_ = ok.pivot_table(index="n", columns="backend", values="fwd_bwd_s") if len(ok) else pd.DataFrame()
    lines = [f"# Long sequences under a {args.limit_gib:g} GiB address-space limit", "",
             f"One forward+backward per case ({_config(rows[0])}, float32) in a fresh process: model and inputs "
             f"built and one warm step run at {WARM_POINTS} points with every fused kernel on (it compiles them), then `RLIMIT_AS` set to the address "
             "space then plus the limit, then one timed step. "
             "`oom`: an allocation failed under the limit.", "",
             *[f"- {k}: {v}" for k, v in meta.items()], "", "## Status", "", table.to_markdown(), "",
             "## Forward+backward time (s) where it ran", "", time_.round(2).to_markdown() if len(time_) else "(none)", ""]
    (out / "long_sequences.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
