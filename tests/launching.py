"""Helpers for tests that start the main job through its launch scripts."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
# the smallest model and data that still exercise every path: seconds per launch are start-up
TINY = ["--model-dim", "8", "--model-depth", "1", "--model-heads", "2", "--model-dim-head", "4",
        "--model-dim-feat", "4", "--data-max-length", "12", "--data-batch-size", "2",
        "--run-val-max-batches", "2", "--run-log-every", "1", "--run-progress", "false",
        "--optim-warmup-steps", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def env_for(cache_dir, **extra) -> dict:
    env = {**os.environ, "VNT_CACHE_DIR": str(cache_dir), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MASTER_PORT": str(free_port())}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(args, cache_dir, timeout=300, **env) -> subprocess.CompletedProcess:
    """``bash launch/train.sh TINY ARGS`` with ``env`` added to the environment."""
    return subprocess.run(["bash", str(ROOT / "launch/train.sh"), *TINY, "--data-cache-dir", str(cache_dir),
                           *map(str, args)], env=env_for(cache_dir, **env), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def output(proc) -> str:
    return f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def metrics(run_dir) -> dict[int, dict]:
    """step -> the metrics.csv row (floats)."""
    with open(Path(run_dir) / "metrics.csv") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items()} for r in csv.DictReader(f)}


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def copy_checkpoints(src_run_dir, dst_run_dir) -> Path:
    """A new run dir holding a copy of another run's checkpoints (and nothing else)."""
    dst = Path(dst_run_dir)
    shutil.copytree(Path(src_run_dir) / "checkpoints", dst / "checkpoints")
    return dst
