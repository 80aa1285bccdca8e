"""The main job at protein sizes, with and without activation checkpointing: step time and peak
memory from ``bash launch/train.sh`` itself (one process, its metrics.csv).

    python -m bench.main_job_memory [--steps 8] [--out results/memory]

Cases (``--cases``): default-512, the default model (dim 32, depth 2) on synthetic 512-residue chains, the model scaled to
depth 8 / dim 128 at 512 and 1024 residues (deep-512, deep-1024; batch 1), and the default model on whole embedded
chains (up to 758 residues) batched by a 2048-token budget (default-whole). Per case: the median step time of the
steps after the first, and the process's peak RSS (metrics.csv's peak_mem_mib, which includes the
~0.5 GiB of a DeepSpeed process at rest). Writes main_job.{csv,md} with the machine it ran on.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
SYNTHETIC = ["--data-source", "synthetic", "--data-synthetic-count", "16", "--data-batch-size", "1"]
DEEP = ["--model-depth", "8", "--model-dim", "128"]
CASES = {
    "default-512": [*SYNTHETIC, "--data-synthetic-length", "512", "--data-max-length", "512"],
    "deep-512": [*DEEP, *SYNTHETIC, "--data-synthetic-length", "512", "--data-max-length", "512"],
    "deep-1024": [*DEEP, *SYNTHETIC, "--data-synthetic-length", "1024",
                                         "--data-max-length", "1024"],
    "default-whole": ["--data-max-length", "0", "--data-max-tokens", "2048",
                                                        "--data-batch-size", "16"],
}


def run_case(args: list[str], *, checkpointing: bool, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["bash", "launch/train.sh", *args, "--max-steps", str(steps), "--run-log-every", "1",
               "--run-val-max-batches", "1", "--run-progress", "false", "--run-dir", tmp,
               "--run-activation-checkpointing", str(checkpointing).lower()]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "NUM_GPUS": "1"}, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        with open(Path(tmp) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    times = [float(r["step_time_s"]) for r in rows[1:]]
    return {"step_s_median": statistics.median(times), "step_s_max": max(times),
            "peak_mem_mib": max(float(r["peak_mem_mib"]) for r in rows), "steps_timed": len(times),
            "tokens_per_s": statistics.median(float(r["tokens_per_s"]) for r in rows[1:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.main_job_memory", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "results" / "memory"))
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    args = p.parse_args(argv)
    import pandas as pd

    from bench.report import environment
    rows = []
    for name in args.cases.split(","):
        for ck in (False, True):
            rows.append({"case": name, "activation_checkpointing": ck,
                         **run_case(CASES[name], checkpointing=ck, steps=args.steps)})
            print(json.dumps(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    off = df[~df.activation_checkpointing].set_index("case")
    on = df[df.activation_checkpointing].set_index("case")
    summary = pd.DataFrame({"peak MiB off": off.peak_mem_mib, "peak MiB on": on.peak_mem_mib,
                            "saved MiB": off.peak_mem_mib - on.peak_mem_mib,
                            "step s off": off.step_s_median, "step s on": on.step_s_median,
                            "time on/off": on.step_s_median / off.step_s_median})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "main_job.csv", index=False)
    env = environment()
    lines = ["# The main job at protein sizes: activation checkpointing", "",
             f"`python -m bench.main_job_memory {' '.join(argv if argv is not None else sys.argv[1:])}`: "
             f"`bash launch/train.sh` with one process, float32, ZeRO 0, {args.steps} steps per case; "
             "median step time of the steps after the first; peak RSS of the process.", "",
             *[f"- {k}: {v}" for k, v in env.items()], "", summary.round(3).to_markdown(), ""]
    (out / "main_job.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
