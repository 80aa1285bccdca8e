"""The main job, end to end through launch/train.sh on CPU (DeepSpeed, gloo)."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

ROOT = Path(__file__).parents[1]
TINY = ["--model-dim", "8", "--model-depth", "1", "--model-heads", "2", "--model-dim-head", "4",
        "--model-dim-feat", "4", "--data-max-length", "12", "--data-batch-size", "2",
        "--run-val-max-batches", "2", "--run-log-every", "1", "--run-progress", "false",
        "--optim-warmup-steps", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def env_for(cache_dir, **extra):
    env = {**os.environ, "VNT_CACHE_DIR": str(cache_dir), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MASTER_PORT": str(free_port())}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(args, cache_dir, timeout=300, **env):
    return subprocess.run(["bash", str(ROOT / "launch/train.sh"), *TINY, "--data-cache-dir", str(cache_dir), *args],
                          env=env_for(cache_dir, **env), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def losses(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def two_proc_run(embedded, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    out = launch(["--run-dir", str(run_dir), "--max-steps", "8", "--run-ckpt-every", "4"], cache_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir, out


def test_two_process_run_writes_the_run_directory(two_proc_run):
    run_dir, out = two_proc_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    for key in ("final_loss", "val_rmsd_noisy", "val_rmsd_denoised", "tokens_per_s"):
        assert summary[key] == summary[key] and summary[key] > 0, key  # finite and positive
    # the trained denoiser's SE(3) error is measured and small (float32; its floor is below it)
    assert summary["equiv_dtype"] == "float32" and summary["equiv_points"] > 0
    assert 0 < summary["equiv_rel_err_input_rounding_floor"] <= summary["equiv_rel_err"] < 1e-3, summary
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["deepspeed"]["train_batch_size"] == 2 * 1 * 2  # micro x accumulation x world
    assert cfg["config"]["model"]["dim"] == 8
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s",
                             "step_time_s", "peak_mem_mib"]
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step8"
    assert (run_dir / "checkpoints" / "step4").is_dir()


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(two_proc_run, cache_dir, tmp_path):
    ref_dir, _ = two_proc_run
    run_dir = tmp_path / "resumed"
    common = ["--run-dir", str(run_dir), "--max-steps", "8", "--run-ckpt-every", "4"]
    first = launch(common + ["--run-stop-after", "5"], cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step5"
    second = launch(common, cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-7), (step, got[step], ref[step])


def test_simulated_two_node_run(embedded, cache_dir, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_dir = tmp_path / "two-node"
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        env = env_for(cache_dir, NUM_NODES=2, NUM_GPUS=1, NO_SSH=1, NODE_RANK=node_rank, HOSTFILE=hostfile,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RUN_DIR=run_dir, MAX_STEPS=3)
        procs.append(subprocess.Popen(["bash", "launch/train.sh", *TINY, "--data-cache-dir", str(cache_dir)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes}\n--- node 0 ---\n{outs[0][-4000:]}\n--- node 1 ---\n{outs[1][-4000:]}"
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2


def test_crashing_rank_ends_the_job_nonzero_without_hanging(embedded, cache_dir, tmp_path):
    t = time.perf_counter()
    out = launch(["--run-dir", str(tmp_path / "crash"), "--max-steps", "20", "--run-debug-crash-step", "3",
                  "--run-pg-timeout-s", "30"], cache_dir, timeout=240)
    assert out.returncode != 0
    assert "rank 1 crashes at step 3" in out.stdout + out.stderr
    assert time.perf_counter() - t < 200


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(embedded, cache_dir, tmp_path):
    run_dir = tmp_path / "nan"
    common = ["--run-dir", str(run_dir), "--run-ckpt-every", "4"]
    out = launch(common + ["--max-steps", "10", "--run-debug-nan-step", "6"], cache_dir)
    assert out.returncode != 0
    assert "non-finite loss at step 6" in out.stdout + out.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step4"
    assert not (run_dir / "checkpoints" / "step6").exists()
    again = launch(common + ["--max-steps", "5"], cache_dir)  # the last good checkpoint loads and trains on
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 5


def test_sigterm_saves_a_checkpoint_and_exits(embedded, cache_dir, tmp_path):
    run_dir = tmp_path / "term"
    env = env_for(cache_dir)
    proc = subprocess.Popen(["bash", "launch/train.sh", *TINY, "--data-cache-dir", str(cache_dir),
                             "--run-dir", str(run_dir), "--max-steps", "100000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (run_dir / "metrics.csv").exists() or len(losses(run_dir)) < 3:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    trainers = subprocess.run(["pgrep", "-f", f"vnt.train.*{run_dir}"], capture_output=True, text=True).stdout.split()
    trainers = [int(p) for p in trainers if int(p) != proc.pid]
    for pid in trainers:  # what a scheduler does: SIGTERM to every task
        os.kill(pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert "SIGTERM: saving at step" in output
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step") and int(latest[4:]) >= 3


def test_bad_options_fail_before_any_process_starts(tmp_path, cache_dir):
    run_dir = tmp_path / "bad"
    out = launch(["--run-dir", str(run_dir), "--model-dmi", "3"], cache_dir, timeout=60)
    assert out.returncode != 0 and "unrecognized arguments: --model-dmi" in out.stderr
    assert "spawned" not in out.stdout + out.stderr and not run_dir.exists()
    out = launch(["--run-dir", str(run_dir), "--run-zero-stage", "5"], cache_dir, timeout=60)
    assert out.returncode != 0 and "zero_stage" in out.stderr


def test_dry_run_prints_the_launch_command(cache_dir):
    out = launch(["--max-steps", "3"], cache_dir, timeout=60, DRY_RUN=1, NUM_GPUS=3)
    assert out.returncode == 0
    assert out.stdout.startswith("deepspeed --num_nodes 1 --num_gpus 3")
    assert "--module vnt.train" in out.stdout and "--max-steps 3" in out.stdout


def test_launcher_can_start_train_sh_per_rank(embedded, cache_dir, tmp_path):
    """`deepspeed --no_python launch/train.sh ...`: each copy runs the trainer for its rank."""
    run_dir = tmp_path / "per-rank"
    env = env_for(cache_dir)
    out = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", env["MASTER_PORT"], "--no_python",
                          "launch/train.sh", *TINY, "--data-cache-dir", str(cache_dir), "--run-dir", str(run_dir),
                          "--max-steps", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2


def test_ds_config_files_are_valid_for_the_trainer():
    from vnt.train import TrainConfig, RunConfig
    import dataclasses
    files = sorted((ROOT / "launch/ds_config").glob("*.json"))
    assert len(files) >= 4
    for path in files:
        cfg = dataclasses.replace(TrainConfig(), run=RunConfig(ds_config=str(path)))
        ds = cfg.deepspeed_config(world_size=4)
        assert ds["train_batch_size"] == cfg.data.batch_size * cfg.optim.grad_accum * 4


def test_run_config_json_rebuilds_the_same_config(two_proc_run):
    """config.json holds everything needed to reproduce: it loads back into an equal TrainConfig."""
    from vnt.train import TrainConfig
    run_dir, _ = two_proc_run
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    cfg = TrainConfig.from_dict(saved)
    assert json.loads(json.dumps(cfg.to_dict())) == saved
    assert cfg.model.dim == 8 and cfg.run.max_steps == 8
