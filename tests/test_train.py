"""The main job, end to end through launch/train.sh on CPU (DeepSpeed, gloo): every ZeRO stage and
dtype, every shipped DeepSpeed JSON, resume (same and other world size), failures, checkpoints."""
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launching import ROOT, TINY, copy_checkpoints, env_for, free_port, launch, metrics, output, summary

pytest.importorskip("deepspeed")

DS_CONFIGS = ROOT / "launch/ds_config"


def flags(stage, bf16=False):
    return ["--run-zero-stage", stage, "--run-bf16", str(bf16).lower()]


def ds_json(name):
    return ["--run-ds-config", DS_CONFIGS / name]


# (id, options of the uninterrupted run, options of the run that resumes it, stage, bf16). A shipped
# JSON that resolves to exactly the config of a flag set (test_each_shipped_json_...) trains from the
# JSON and is resumed from the flags: both spellings train, checkpoint and resume.
MATRIX = [
    ("zero0-fp32", ds_json("zero0.json"), flags(0), 0, False),
    ("zero1-fp32", ds_json("zero1.json"), flags(1), 1, False),
    ("zero2-fp32", ds_json("zero2.json"), flags(2), 2, False),
    ("zero3-fp32", ds_json("zero3.json"), flags(3), 3, False),
    ("zero0-bf16", flags(0, True), flags(0, True), 0, True),
    ("zero1-bf16", flags(1, True), flags(1, True), 1, True),
    ("zero2-bf16", flags(2, True), flags(2, True), 2, True),
    ("zero3-bf16", flags(3, True), flags(3, True), 3, True),
    ("zero2_bf16.json", ds_json("zero2_bf16.json"), ds_json("zero2_bf16.json"), 2, True),
]


def test_each_shipped_json_is_in_the_matrix_and_same_config_pairs_agree():
    from vnt.config import TrainConfig

    covered = {Path(str(a[-1])).name for _, a, _, _, _ in MATRIX if "--run-ds-config" in a}
    assert covered == {p.name for p in DS_CONFIGS.glob("*.json")}
    for _, first, resumed, stage, bf16 in MATRIX:
        if first != resumed:  # trained from a JSON, resumed from flags: the same DeepSpeed config
            from_json = TrainConfig().replace("run", ds_config=str(first[-1])).with_ds_config()
            from_flags = TrainConfig().replace("run", zero_stage=stage, bf16=bf16)
            assert from_json.deepspeed_config(2) == from_flags.deepspeed_config(2)
            assert (from_json.run.zero_stage, from_json.run.bf16) == (stage, bf16)


@pytest.mark.parametrize("name, first, resumed, stage, bf16", MATRIX, ids=[m[0] for m in MATRIX])
def test_every_stage_and_dtype_trains_validates_checkpoints_and_resumes(name, first, resumed, stage, bf16,
                                                                         trained, cache_dir, tmp_path):
    ref = trained(name, first)
    s = summary(ref)
    assert (s["world_size"], s["steps"], s["zero_stage"], s["bf16"]) == (2, 3, stage, bf16)
    for key in ("final_loss", "val_rmsd_noisy", "val_rmsd_denoised", "tokens_per_s"):
        assert 0 < s[key] < float("inf"), key
    # the trained denoiser's SE(3) error is measured in its own dtype; exact arithmetic on its rounded inputs is below it
    assert s["equiv_dtype"] == ("bfloat16" if bf16 else "float32") and s["equiv_points"] > 0
    assert 0 < s["equiv_rel_err_input_rounding_floor"] <= s["equiv_rel_err"] < (0.5 if bf16 else 1e-3), s
    # config.json records the config that ran, also when it came from a JSON
    ran = json.loads((ref / "config.json").read_text())
    assert (ran["config"]["run"]["zero_stage"], ran["config"]["run"]["bf16"]) == (stage, bf16)
    assert ran["deepspeed"]["zero_optimization"]["stage"] == stage and ran["deepspeed"]["bf16"]["enabled"] == bf16
    assert ran["deepspeed"]["train_batch_size"] == 2 * 1 * 2  # micro x accumulation x world
    assert (ref / "checkpoints/latest").read_text() == "step3"
    for step in (1, 2, 3):
        manifest = json.loads((ref / f"checkpoints/step{step}/manifest.json").read_text())
        assert manifest["step"] == step and manifest["zero_stage"] == stage and manifest["files"]

    # a fresh launch resumes from step 1 and retrains steps 2-3 to the same losses and validation
    run_dir = copy_checkpoints(ref, tmp_path / "resumed")
    out = launch([*resumed, "--run-dir", run_dir, "--max-steps", 3, "--run-resume-from", "step1"], cache_dir)
    assert out.returncode == 0, output(out)
    assert "resumed from" in out.stdout and "at step 1 (2 batches consumed" in out.stdout, output(out)
    want, got = metrics(ref), metrics(run_dir)
    assert sorted(got) == [2, 3]
    rel = 1e-2 if bf16 else 1e-6
    for step in (2, 3):
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-9), step
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=rel), (step, got[step], want[step])
    assert summary(run_dir)["val_rmsd_denoised"] == pytest.approx(s["val_rmsd_denoised"], rel=rel)


# elastic resume: a checkpoint of N processes continues on M. The rule (README): optimizer steps and
# the LR schedule continue from the checkpoint's step, the data at the first batch of the job's batch
# sequence that no rank consumed. So the first step after resuming gives rank 0 the batch rank 0 of
# the uninterrupted source run took at that step: the same weights, data and noise, the same loss.
# ZeRO-0 float32 2 -> 1 is test_corrupt_latest_checkpoint_falls_back_to_the_newest_good_one.
ELASTIC = [("zero0-fp32", ds_json("zero0.json"), False, 1, 2),
           ("zero2-fp32", ds_json("zero2.json"), True, 2, 1), ("zero2-fp32", ds_json("zero2.json"), True, 1, 2)]


@pytest.mark.parametrize("name, args, universal, source_world, world", ELASTIC,
                         ids=[f"{e[0]}-{e[3]}to{e[4]}" for e in ELASTIC])
def test_elastic_resume_on_another_number_of_processes(name, args, universal, source_world, world, trained,
                                                       cache_dir, tmp_path):
    ref = trained(name, args, world=source_world)
    run_dir = copy_checkpoints(ref, tmp_path / "elastic")
    out = launch([*args, "--run-dir", run_dir, "--max-steps", 3, "--run-resume-from", "step2"], cache_dir,
                 NUM_GPUS=world)
    assert out.returncode == 0, output(out)
    assert f"at step 2 ({2 * source_world} batches consumed, saved by {source_world} processes, now {world})" \
        in out.stdout, output(out)
    assert ("universal checkpoint" in out.stdout) == universal  # partitioned optimizer state is re-partitioned
    want, got = metrics(ref)[3], metrics(run_dir)[3]
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), (got, want)
    assert summary(run_dir)["world_size"] == world and summary(run_dir)["steps"] == 3


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_good_one(trained, cache_dir, tmp_path):
    """A truncated file in the checkpoint `latest` names: the run resumes from the newest intact one,
    with a warning naming what it skipped and why (here also on one process: elastic, as above)."""
    ref = trained("zero0-fp32", ds_json("zero0.json"))
    run_dir = copy_checkpoints(ref, tmp_path / "corrupt")
    damaged = run_dir / "checkpoints/step3/mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    out = launch([*ds_json("zero0.json"), "--run-dir", run_dir, "--max-steps", 3], cache_dir, NUM_GPUS=1)
    assert out.returncode == 0, output(out)
    assert "resuming from step2, skipping:" in out.stdout and "mp_rank_00_model_states.pt has" in out.stdout
    assert "at step 2 (4 batches consumed, saved by 2 processes, now 1)" in out.stdout
    assert metrics(run_dir)[3]["loss"] == pytest.approx(metrics(ref)[3]["loss"], rel=1e-6)  # step 3 again
    assert (run_dir / "checkpoints/latest").read_text() == "step3"  # rewritten whole
    # asked for by name, a bad checkpoint is a usage error naming the file, before any process starts
    damaged = run_dir / "checkpoints/step1/mp_rank_00_model_states.pt"
    damaged.write_bytes(b"garbage")
    out = launch([*ds_json("zero0.json"), "--run-dir", run_dir, "--max-steps", 3, "--run-resume-from", "step1"],
                 cache_dir)
    assert out.returncode == 2 and "spawned" not in out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--run-resume-from step1" in errors[0] and "mp_rank_00_model_states.pt" in errors[0]
    assert "Traceback" not in out.stderr


def test_a_rank_killed_in_a_save_loses_only_that_save(embedded, cache_dir, tmp_path):
    run_dir = tmp_path / "killed"
    common = ["--run-dir", run_dir, "--max-steps", 4, "--run-ckpt-every", 2]
    t = time.perf_counter()
    out = launch([*common, "--run-pg-timeout-s", 30], cache_dir, timeout=240, VNT_TEST_FAULTS="crash_in_save=4,rank=1")
    assert out.returncode != 0 and "dies in the save of step 4" in out.stdout, output(out)
    assert time.perf_counter() - t < 200  # the launcher ends the job when a rank dies: no hang
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step2" and not (ckpt / "step4/manifest.json").exists()
    before = metrics(run_dir)
    again = launch(common, cache_dir)
    assert again.returncode == 0, output(again)
    assert "at step 2 (4 batches consumed" in again.stdout
    after = metrics(run_dir)
    for step in (3, 4):  # retrained from step 2 exactly as the first time
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-6)
    assert (ckpt / "latest").read_text() == "step4" and (ckpt / "step4/manifest.json").exists()


def test_literal_deepspeed_command_trains(embedded, cache_dir):
    """`deepspeed launch/train.sh --max-steps 3`, as typed (the DeepSpeed launcher runs it with python on
    every rank). On a CPU machine DeepSpeed starts one process per NUMA node unless LOCAL_SIZE says."""
    env = env_for(cache_dir, LOCAL_SIZE=2)
    out = subprocess.run(["deepspeed", "launch/train.sh", "--max-steps", "3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, output(out)
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"world_size"')))
    run_dir = ROOT / result["run_dir"]
    try:
        assert result["world_size"] == 2 and result["steps"] == 3
        assert run_dir.parent == ROOT / "runs" and (run_dir / "checkpoints/step3/manifest.json").is_file()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_launcher_flags_per_rank_logs_bash_per_rank_and_monitors(embedded, cache_dir, tmp_path):
    """`deepspeed --num_gpus 2 --enable_each_rank_log DIR --no_python launch/train.sh ...`: the launcher's
    own flags, and bash per rank (each copy of the script becomes the trainer); DeepSpeed's
    TensorBoard and CSV monitors get the training loss at every logged step; --run-compile trains; with
    --run-comms-log every step's gradient all-reduce is in comms.json; --run-flush-denormal trains."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, logs, tb, csv_dir = (tmp_path / name for name in ("flags", "rank-logs", "tb", "csv"))
    env = env_for(cache_dir)
    out = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", env["MASTER_PORT"], "--enable_each_rank_log",
                          str(logs), "--no_python", "launch/train.sh", *TINY, "--data-cache-dir", str(cache_dir),
                          "--run-dir", str(run_dir), "--max-steps", "3", "--run-tensorboard", str(tb),
                          "--run-csv-monitor", str(csv_dir), "--run-compile", "true", "--run-comms-log", "true",
                          "--run-flush-denormal", "true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, output(out)
    assert summary(run_dir)["world_size"] == 2
    rank_logs = sorted(logs.glob("*_rank*.log"))
    assert [p.name.rsplit("_", 1)[1] for p in rank_logs] == ["rank0.log", "rank1.log"]
    assert '"world_size": 2' in rank_logs[0].read_text()  # rank 0 reports
    events = EventAccumulator(str(next(tb.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [round(e.value, 5) for e in loss] == [round(metrics(run_dir)[s]["loss"], 5) for s in (1, 2, 3)]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "val/rmsd_denoised"} <= set(events.Tags()["scalars"])
    assert any(p.name.startswith("train_loss") for p in csv_dir.rglob("*.csv"))
    from vnt.training import allreduce_per_step
    comms = json.loads((run_dir / "comms.json").read_text())
    per_step = allreduce_per_step(comms, steps=3)
    assert len(per_step) == 3 and all(t > 0 for t in per_step), comms
    assert json.loads((run_dir / "config.json").read_text())["config"]["run"]["flush_denormal"] is True


def test_simulated_two_node_run(embedded, cache_dir, tmp_path):
    """Two launchers (NO_SSH, one per node) and a hostfile; the master is the hostfile's first host."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# node list\nlocalhost slots=1\nnode-b slots=1\n")
    run_dir = tmp_path / "two-node"
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        env = env_for(cache_dir, NUM_NODES=2, NO_SSH=1, NODE_RANK=node_rank, HOSTFILE=hostfile, MASTER_PORT=port,
                      RUN_DIR=run_dir, MAX_STEPS=3)
        env.pop("MASTER_ADDR", None)
        procs.append(subprocess.Popen(["bash", "launch/train.sh", *TINY, "--data-cache-dir", str(cache_dir)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes}\n--- node 0 ---\n{outs[0][-4000:]}\n--- node 1 ---\n{outs[1][-4000:]}"
    assert "--master_addr localhost" in outs[0]
    assert summary(run_dir)["world_size"] == 2
    assert {p.name for p in run_dir.glob("launch*.log")} == {"launch-node0.log", "launch-node1.log"}


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(embedded, cache_dir, tmp_path):
    from vnt import checkpoint

    run_dir = tmp_path / "nan"
    common = ["--run-dir", run_dir, "--run-ckpt-every", 4]
    out = launch([*common, "--max-steps", 10], cache_dir, VNT_TEST_FAULTS="nan_step=6")
    assert out.returncode != 0
    assert "non-finite loss at step 6" in out.stdout + out.stderr
    assert (run_dir / "checkpoints/latest").read_text() == "step4"
    assert not (run_dir / "checkpoints/step6").exists()
    assert checkpoint.choose(run_dir / "checkpoints")["step"] == 4  # intact: the next launch resumes there


def test_bad_options_fail_before_any_process_starts(tmp_path, cache_dir):
    run_dir = tmp_path / "bad"
    for args, message in [(["--model-dmi", "3"], "unrecognized arguments: --model-dmi"),
                          (["--run-zero-stage", "5"], "--run-zero-stage: '5' is not one of 0, 1, 2, 3"),
                          (["--run-zero-stage", "2", *ds_json("zero0.json")],
                           "zero0.json sets zero_optimization.stage=0 but --run-zero-stage 2 was given"),
                          (["--run-activation-checkpointing", "true", "--run-checkpoint-layers", "0,1"],
                           "checkpoint layers must be in [0, 1)")]:
        out = launch(["--run-dir", run_dir, *args], cache_dir, timeout=60)
        assert out.returncode != 0 and message in out.stderr, (args, output(out))
        assert "spawned" not in out.stdout + out.stderr and not run_dir.exists()


def test_run_config_json_rebuilds_the_same_config(trained):
    """config.json holds everything needed to reproduce: it loads back into an equal TrainConfig."""
    from vnt.config import TrainConfig
    run_dir = trained("zero0-fp32", ds_json("zero0.json"))
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    cfg = TrainConfig.from_dict(saved)
    assert json.loads(json.dumps(cfg.to_dict())) == saved
    assert cfg.model.dim == 8 and cfg.run.max_steps == 3


def test_a_larger_max_steps_extends_a_resumed_run(trained, cache_dir, tmp_path):
    """Resuming a finished 3-step run with --max-steps 5 trains steps 4 and 5 (the LR schedule's horizon
    moves to 5, said in the log); the summary has the 5 steps and finite numbers. The same after falling
    back from a corrupt `latest`. Asking for no more steps than the checkpoint has is a one-line usage
    error before any process starts, naming both values."""
    ref = trained("zero0-fp32", ds_json("zero0.json"))
    run_dir = copy_checkpoints(ref, tmp_path / "extended")
    out = launch([*ds_json("zero0.json"), "--run-dir", run_dir, "--max-steps", 5], cache_dir)
    assert out.returncode == 0, output(out)
    assert "at step 3" in out.stdout and "horizon moves from 3 to 5 steps" in out.stdout, output(out)
    assert sorted(metrics(run_dir)) == [4, 5]
    done = summary(run_dir)
    assert done["steps"] == 5 and math.isfinite(done["final_loss"]) and math.isfinite(done["tokens_per_s"])
    assert (run_dir / "checkpoints/latest").read_text() == "step5"

    fallback = copy_checkpoints(ref, tmp_path / "fallback")
    damaged = fallback / "checkpoints/step3/mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    out = launch([*ds_json("zero0.json"), "--run-dir", fallback, "--max-steps", 5], cache_dir)
    assert out.returncode == 0, output(out)
    assert "resuming from step2" in out.stdout and "at step 2" in out.stdout
    assert summary(fallback)["steps"] == 5 and sorted(metrics(fallback)) == [3, 4, 5]

    out = launch([*ds_json("zero0.json"), "--run-dir", run_dir, "--max-steps", 5], cache_dir)
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and "spawned" not in out.stdout + out.stderr, output(out)
    assert len(errors) == 1 and "--max-steps 5" in errors[0] and "at step 5" in errors[0], output(out)
    assert summary(run_dir)["steps"] == 5  # the finished run's summary is untouched


@pytest.mark.parametrize("name, args", [("zero0-fp32", ds_json("zero0.json")), ("zero3-fp32", ds_json("zero3.json")),
                                        ("zero2-bf16", flags(2, True))], ids=["zero0-fp32", "zero3-fp32", "zero2-bf16"])
def test_activation_checkpointing_gives_the_same_losses(name, args, trained, cache_dir, tmp_path):
    """--run-activation-checkpointing true (every encoder layer, and a chosen layer list) trains the
    same per-step losses and gradient norms as the run without it, 2 processes."""
    ref = metrics(trained(name, args))
    variants = [["--run-activation-checkpointing", "true"]]
    if name == "zero0-fp32":  # a chosen layer list, once
        variants.append(["--run-activation-checkpointing", "true", "--run-checkpoint-layers", "0"])
    for extra in variants:
        run_dir = tmp_path / f"ckpt{len(extra)}"
        out = launch([*args, *extra, "--run-dir", run_dir, "--max-steps", 3, "--run-ckpt-every", 1], cache_dir,
                     NUM_GPUS=2)
        assert out.returncode == 0, output(out)
        got = metrics(run_dir)
        assert sorted(got) == sorted(ref) == [1, 2, 3]
        for step in ref:
            for key in ("loss", "grad_norm"):
                assert math.isclose(got[step][key], ref[step][key], rel_tol=1e-4), (step, key, got[step], ref[step])


@pytest.mark.parametrize("network, module", [("equiformer", "equiformer_pytorch"), ("en-transformer", "en_transformer"),
                                             ("vn-transformer-0.1.0", "VN_transformer")])
def test_each_peer_network_trains_through_the_launcher(network, module, embedded, cache_dir, tmp_path):
    """`bash launch/train.sh --task-network NETWORK` (the league's peers): trains, validates, checkpoints,
    and the checkpoint loads back as that network."""
    pytest.importorskip(module)
    from vnt.denoiser import load_denoiser
    run_dir = tmp_path / network
    out = launch(["--task-network", network, "--task-points", "atom", "--task-en-neighbors", "8", "--max-steps", "2",
                  "--run-dir", run_dir], cache_dir, NUM_GPUS=1)
    assert out.returncode == 0, output(out)
    assert summary(run_dir)["steps"] == 2 and 0 < summary(run_dir)["val_rmsd_ratio"] < 2
    model = load_denoiser(run_dir)
    assert model.task_config.network == network and hasattr(model, "peer")
