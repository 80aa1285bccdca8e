"""The launch scripts: the command the bash wrapper builds (DRY_RUN, a fake nvidia-smi), and SLURM's
sbatch script end to end with shims for scontrol and srun."""
import functools
import os
import shlex
import signal
import shutil
import subprocess
import time
import uuid

import pytest

from launching import ROOT, TINY, env_for, metrics, summary

NO_GPU_NVIDIA_SMI = "#!/usr/bin/env bash\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n"
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
# four GPUs, two of them split into MIG devices
if [[ "$*" == *"--query-gpu=index"* ]]; then printf '0\\n1\\n2\\n3\\n'; exit 0; fi
if [[ "$*" == *"-L"* ]]; then
  for i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done
  echo "  MIG 3g.40gb     Device  0: (UUID: MIG-a)"; echo "  MIG 3g.40gb     Device  1: (UUID: MIG-b)"; exit 0
fi
exit 1
"""


def dry_run(tmp_path, *args, gpus=False, cache_dir=None, **env):
    """The launch command `bash launch/train.sh ARGS` would run, as a list (its option check builds
    the embedded set in ``cache_dir`` unless it is there: pass the session's)."""
    bin_dir = tmp_path / ("bin-gpus" if gpus else "bin-no-gpu")
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI if gpus else NO_GPU_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    extra = {**env, "PATH": f"{bin_dir}:{env_for(tmp_path)['PATH']}"}
    full_env = env_for(cache_dir or tmp_path, DRY_RUN=1, **extra)
    for key in [k for k, v in env.items() if v is None]:
        full_env.pop(key)
    out = subprocess.run(["bash", "launch/train.sh", *map(str, args)], cwd=ROOT, env=full_env,
                         capture_output=True, text=True, timeout=60)
    return out.returncode, shlex.split(out.stdout), out.stderr


@pytest.fixture
def dry(tmp_path, cache_dir, embedded):
    """dry_run with this test's tmp_path and the session's embedded set."""
    return functools.partial(dry_run, tmp_path, cache_dir=cache_dir)


def launcher_flags(cmd):
    return cmd[1:cmd.index("launch/train.sh")]


def test_dry_run_prints_the_launch_command(tmp_path, dry):
    code, cmd, err = dry("--max-steps", 3, NUM_GPUS=3)
    assert code == 0, err
    assert cmd[0] == "deepspeed" and cmd[cmd.index("--num_gpus") + 1] == "3"
    trainer = cmd[cmd.index("launch/train.sh") + 1:]
    assert trainer[:2] == ["--run-dir", trainer[1]] and trainer[1].startswith("runs/") and "--max-steps" in trainer


def test_readme_all_gpus_of_one_machine_command(tmp_path, dry):
    """README: `NUM_GPUS=8 bash launch/train.sh --model-dim 128 --model-depth 6`, as written."""
    code, cmd, err = dry("--model-dim", 128, "--model-depth", 6, gpus=True, NUM_GPUS=8)
    assert code == 0, err
    assert launcher_flags(cmd)[:2] == ["--num_gpus", "8"]
    trainer = cmd[cmd.index("launch/train.sh") + 1:]
    assert trainer[2:] == ["--model-dim", "128", "--model-depth", "6"]


def test_readme_several_nodes_over_ssh_command(tmp_path, dry):
    """README: `HOSTFILE=launch/hostfile.example NUM_NODES=2 bash launch/train.sh`, as written."""
    code, cmd, err = dry(HOSTFILE="launch/hostfile.example", NUM_NODES=2, MASTER_ADDR=None, MASTER_PORT=None)
    assert code == 0, err
    flags = launcher_flags(cmd)
    assert flags[:4] == ["--hostfile", "launch/hostfile.example", "--num_nodes", "2"]
    assert flags[flags.index("--master_port") + 1] == "29500" and "--num_gpus" not in flags


def test_readme_real_release_command_offline_is_one_usage_line(tmp_path, dry):
    """README: `bash launch/train.sh --data-source sidechainnet --data-casp-version 12 --data-thinning 30`.
    Without the network (forced here through an unreachable proxy) the option check stops before launch
    with one line that names the training flags of the offline alternatives."""
    code, cmd, err = dry("--data-source", "sidechainnet", "--data-casp-version", 12, "--data-thinning", 30,
                         http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    assert code == 2 and cmd == []
    line, = [ln for ln in err.splitlines() if "error:" in ln]
    assert "could not download SidechainNet CASP12 thinning 30" in line and "--data-source" in line, err
    assert "Traceback" not in err


def test_readme_scn_pickle_command(tmp_path, dry, embedded):
    """README: `bash launch/train.sh --data-source scn-pickle --data-path /data/sidechainnet_casp12_30.pkl`,
    as written: without that file, one usage line names it and what the file must hold; with a
    SidechainNet pickle there (the embedded set exported), the option check loads it and launches."""
    from vnt.data import export_sidechainnet
    code, cmd, err = dry("--data-source", "scn-pickle", "--data-path", "/data/sidechainnet_casp12_30.pkl")
    assert code == 2 and cmd == [] and "Traceback" not in err
    line, = [ln for ln in err.splitlines() if "error:" in ln]
    assert "data path /data/sidechainnet_casp12_30.pkl: no such file; expected a SidechainNet pickle" in line
    path = tmp_path / "sidechainnet_casp12_30.pkl"
    export_sidechainnet(embedded, path)
    code, cmd, err = dry("--data-source", "scn-pickle", "--data-path", path)
    assert code == 0, err
    assert cmd[0] == "deepspeed" and cmd[-4:] == ["--data-source", "scn-pickle", "--data-path", str(path)]


def test_readme_whole_chains_with_checkpointing_command(tmp_path, dry):
    """README: `bash launch/train.sh --data-max-length 0 --data-max-tokens 4096 --run-activation-checkpointing
    true`, as written: the option check accepts it and the trainer gets it (runs of these options:
    tests/test_denoise.py, tests/test_train.py)."""
    args = ["--data-max-length", "0", "--data-max-tokens", "4096", "--run-activation-checkpointing", "true"]
    code, cmd, err = dry(*args)
    assert code == 0, err
    assert cmd[0] == "deepspeed" and cmd[-len(args):] == args


def test_without_gpus_two_cpu_processes(tmp_path, dry):
    code, cmd, err = dry(CUDA_VISIBLE_DEVICES=None)
    assert code == 0, err
    assert launcher_flags(cmd)[:2] == ["--num_gpus", "2"]


def test_gpus_every_device_by_default_and_visible_devices_are_honoured(tmp_path, dry):
    code, cmd, err = dry(gpus=True, CUDA_VISIBLE_DEVICES=None)
    assert code == 0, err
    assert not {"--num_gpus", "--num_nodes", "--include"} & set(launcher_flags(cmd))  # DeepSpeed takes every GPU
    code, cmd, err = dry(gpus=True, CUDA_VISIBLE_DEVICES="1,3")
    assert code == 0, err
    assert launcher_flags(cmd)[:2] == ["--include", "localhost:1,3"]
    code, cmd, err = dry(gpus=True, CUDA_VISIBLE_DEVICES="GPU-0,GPU-2")
    assert code == 2 and "set INCLUDE=localhost:0,1 or NUM_GPUS" in err
    code, cmd, err = dry(gpus=True, CUDA_VISIBLE_DEVICES="1,3", NUM_GPUS=2)  # explicit wins
    assert launcher_flags(cmd)[:2] == ["--num_gpus", "2"]


def test_include_exclude_and_launcher_args_pass_through(tmp_path, dry):
    code, cmd, err = dry(gpus=True, INCLUDE="localhost:0,2", LAUNCHER_ARGS="--bind_cores_to_rank "
                             "--enable_each_rank_log runs/x/ranks")
    assert code == 0, err
    flags = launcher_flags(cmd)
    assert flags[:2] == ["--include", "localhost:0,2"]
    assert flags[-3:] == ["--bind_cores_to_rank", "--enable_each_rank_log", "runs/x/ranks"]
    code, cmd, err = dry(gpus=True, EXCLUDE="localhost:1")
    assert launcher_flags(cmd)[:2] == ["--exclude", "localhost:1"]
    code, _, err = dry(gpus=True, INCLUDE="localhost:0", NUM_GPUS=1)
    assert code == 2 and "exclude each other" in err


def test_hostfile_master_is_its_first_host(tmp_path, dry):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\n\nnode-001 slots=8\nnode-002 slots=8\n")
    # over ssh: no --master_addr, so DeepSpeed asks the first host for its address
    code, cmd, err = dry(gpus=True, HOSTFILE=hostfile, NUM_NODES=2, MASTER_ADDR=None,
                             MASTER_PORT=None)
    assert code == 0, err
    flags = launcher_flags(cmd)
    assert "--master_addr" not in flags and flags[flags.index("--master_port") + 1] == "29500"
    assert flags[flags.index("--hostfile") + 1] == str(hostfile) and "--num_gpus" not in flags
    # one launcher per node, no ssh: the first host, named
    code, cmd, err = dry(gpus=True, HOSTFILE=hostfile, NO_SSH=1, NODE_RANK=1, RUN_DIR=tmp_path / "r",
                             MASTER_ADDR=None)
    flags = launcher_flags(cmd)
    assert code == 0, err
    assert flags[flags.index("--master_addr") + 1] == "node-001"
    assert flags[-3:] == ["--no_ssh", "--node_rank", "1"]
    # and a given MASTER_ADDR wins
    code, cmd, err = dry(HOSTFILE=hostfile, MASTER_ADDR="10.0.0.5")
    assert launcher_flags(cmd)[launcher_flags(cmd).index("--master_addr") + 1] == "10.0.0.5"


def test_one_launcher_per_node_needs_a_shared_run_dir(tmp_path, dry):
    code, _, err = dry(NO_SSH=1, NODE_RANK=0, RUN_DIR=None)
    assert code == 2 and "needs RUN_DIR" in err
    code, _, err = dry("--run-dir", tmp_path / "b", RUN_DIR=tmp_path / "a")
    assert code == 2 and "disagree" in err


# ------------------------------------------------------------------------------------------------
# SLURM: shims that do what scontrol and srun do, on this machine

SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames LIST: one name a line (the test's lists are comma-separated)
[[ "$1 $2" == "show hostnames" ]] || exit 1
tr ',' '\\n' <<< "${3:-$SLURM_JOB_NODELIST}"
"""

SRUN = """#!/usr/bin/env bash
# srun: the command once per node, here, each in a session of its own (SLURM signals every process of
# a step: the test does the same to these sessions, whose ids go to $SRUN_SHIM_PIDS)
cmd=()
for a in "$@"; do [[ "$a" == --* && ${#cmd[@]} -eq 0 ]] || cmd+=("$a"); done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 setsid "${cmd[@]}" &
  pids+=($!)
  echo $! >> "$SRUN_SHIM_PIDS"
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.parametrize("gres, slots", [("8", 8), ("h100:8", 8), ("gpu:h100:8(S:0-1)", 8), ("a100:4,h100:2", 6)])
def test_sbatch_reads_every_form_of_slurm_gpus_per_node(tmp_path, gres, slots):
    script = (ROOT / "launch/slurm.sbatch").read_text()
    body = script[script.index("gres_count() {"):script.index("slots=${SLURM_GPUS_ON_NODE")]
    out = subprocess.run(["bash", "-c", body + f'gres_count "{gres}"'], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(slots), out.stderr


def test_sbatch_trains_stops_on_sigterm_and_resumes_when_resubmitted(embedded, cache_dir, tmp_path):
    """Two 'nodes' of one process each: train, SIGTERM (what SLURM sends before the time limit) to
    every process, a checkpoint; the resubmitted job (same job name) resumes and finishes."""
    pytest.importorskip("deepspeed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job_name = f"vnt-test-{uuid.uuid4().hex[:8]}"
    run_dir = ROOT / "runs" / job_name   # runs/<job name>: what a resubmit finds again
    pids_file = tmp_path / "pids"

    def sbatch(job_id, *args):
        env = env_for(cache_dir, PATH=f"{bin_dir}:{env_for(cache_dir)['PATH']}", SLURM_JOB_ID=job_id,
                      SLURM_JOB_NAME=job_name, SLURM_NNODES=2, SLURM_JOB_NODELIST="localhost,node-b",
                      SLURM_GPUS_PER_NODE="h100:1", SLURM_SUBMIT_DIR=ROOT, SRUN_SHIM_PIDS=pids_file)
        env.pop("MASTER_ADDR", None)
        return subprocess.Popen(["bash", "launch/slurm.sbatch", *TINY, "--data-cache-dir", str(cache_dir), *map(str, args)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    jobs = []
    try:
        jobs.append(first := sbatch(101, "--max-steps", 100000, "--run-ckpt-every", 1, "--run-keep-last", 2))
        deadline = time.time() + 180
        while not ((run_dir / "metrics.csv").exists() and len(metrics(run_dir)) >= 3):
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-4000:]
            time.sleep(0.5)
        for pid in map(int, pids_file.read_text().split()):
            os.killpg(pid, signal.SIGTERM)
        log = first.communicate(timeout=150)[0]
        stopped = int((run_dir / "checkpoints/latest").read_text().removeprefix("step"))
        assert stopped >= 3, log[-4000:]
        node_logs = {p.name: p.read_text() for p in run_dir.glob("launch-node*.log")}
        assert set(node_logs) == {"launch-node0.log", "launch-node1.log"}
        assert f"SIGTERM: saving at step {stopped}" in node_logs["launch-node0.log"]

        jobs.append(second := sbatch(102, "--max-steps", stopped + 2, "--run-ckpt-every", 1, "--run-keep-last", 2))
        log = second.communicate(timeout=300)[0]
        assert second.returncode == 0, log[-4000:]
        assert f"at step {stopped} ({2 * stopped} batches consumed, saved by 2 processes, now 2)" in \
            (run_dir / "launch-node0.log").read_text()
        assert summary(run_dir)["steps"] == stopped + 2 and summary(run_dir)["world_size"] == 2
        assert sorted(metrics(run_dir)) == list(range(1, stopped + 3))
        # --run-keep-last 2: only the two newest checkpoints are left, and latest names the newest
        from vnt import checkpoint
        assert checkpoint.tags(run_dir / "checkpoints") == [f"step{stopped + 1}", f"step{stopped + 2}"]
        assert checkpoint.choose(run_dir / "checkpoints")["step"] == stopped + 2
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        if pids_file.exists():
            for pid in map(int, pids_file.read_text().split()):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(run_dir, ignore_errors=True)
