"""The training league (bench/train_cases.py): each case is one real run of the main job through
launch/train.sh; one pytest-benchmark round per launch, every number in extra_info."""
import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PEER_PACKAGES = {"vn-transformer-0.1.0": "VN_transformer", "en-transformer": "en_transformer",
                 "equiformer": "equiformer_pytorch"}


def test_train_case(train_case, benchmark, rows, tmp_path):
    case = train_case
    if case.network in PEER_PACKAGES:
        pytest.importorskip(PEER_PACKAGES[case.network], reason=f"the {case.network} peer is not installed")
    run_dir = tmp_path / case.id
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NUM_GPUS": str(case.world), "MASTER_PORT": str(port), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RUN_DIR": str(run_dir)}
    result = {}

    def launch():
        t = time.perf_counter()
        proc = subprocess.run(["bash", "launch/train.sh", *case.trainer_args()], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        result.update(wall_s=time.perf_counter() - t, proc=proc)

    benchmark.pedantic(launch, rounds=1, iterations=1)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    with open(run_dir / "validation.csv") as f:
        curve = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    with open(run_dir / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    params = _parameters(run_dir)
    row = {**case.to_dict(), "kind": "train", "status": "ok", "device": summary["device"],
           "steps_run": summary["steps"], "wall_s": result["wall_s"], "train_time_s": summary["train_time_s"],
           "val_rmsd_noisy": summary["val_rmsd_noisy"], "val_rmsd_denoised": summary["val_rmsd_denoised"],
           "val_rmsd_ratio": summary["val_rmsd_ratio"], "equiv_rel_err": summary["equiv_rel_err"],
           "equiv_floor_rel_err": summary["equiv_rel_err_input_rounding_floor"],
           "equiv_dtype": summary["equiv_dtype"], "tokens_per_s": summary["tokens_per_s"],
           "peak_mem_mib": max(float(r["peak_mem_mib"]) for r in metrics), "final_loss": summary["final_loss"],
           "parameters": params, "global_batch": config["deepspeed"]["train_batch_size"],
           "curve": json.dumps([(c["step"], c["train_time_s"], c["val_rmsd_ratio"]) for c in curve])}
    rows.append(row)
    benchmark.extra_info.update(row)
    assert 0 < row["val_rmsd_ratio"] < 2


def _parameters(run_dir: Path) -> int:
    from vnt.denoiser import load_denoiser
    return sum(p.numel() for p in load_denoiser(run_dir).parameters())
