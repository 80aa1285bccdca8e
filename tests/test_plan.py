"""bench.plan: the cluster projection's formulas, and the command at tiny size."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import plan

ROOT = Path(__file__).parents[1]
TINY = ["--model-dim", "8", "--model-depth", "1", "--model-heads", "2", "--model-dim-head", "4",
        "--model-dim-feat", "4", "--residues", "8", "--rounds", "1"]


def test_zero_memory_and_communication_follow_the_zero_paper_and_deepspeed():
    psi, n = 1000, 8
    mixed = [plan.model_state_bytes(psi, stage=s, ranks=n, mixed=True) for s in range(4)]
    assert mixed == [16 * psi, 4 * psi + 12 * psi / n, 2 * psi + 14 * psi / n, 16 * psi / n]
    # float32: DeepSpeed's extra float32 copy of each partition; ZeRO-3 keeps small tensors whole
    assert plan.model_state_bytes(psi, stage=2, ranks=n, mixed=False) == 4 * psi + 16 * psi / n
    assert plan.model_state_bytes(psi, stage=3, ranks=n, mixed=True, persistent=100) == 16 * psi / n + 2 * 100 * 7 / 8
    # ZeRO-1/2 all-reduce and all-gather under DeepSpeed's default: 3 passes, where the paper counts 2
    assert [plan.comm_bytes(psi, stage=s, elem_bytes=2) for s in range(4)] == [4000, 6000, 6000, 6000]
    assert plan.bucket_bytes(stage=0, elem_bytes=2, bucket_elements=5e8, params=psi) == 0
    assert plan.bucket_bytes(stage=1, elem_bytes=2, bucket_elements=5e8, params=psi) == 1e9
    # ZeRO-0's flattened gradients, after the backward, on more than one rank
    assert plan.after_backward_bytes(stage=0, elem_bytes=2, params=psi, ranks=2) == 2 * psi
    assert plan.after_backward_bytes(stage=0, elem_bytes=2, params=psi, ranks=1) == 0
    assert plan.after_backward_bytes(stage=1, elem_bytes=2, params=psi, ranks=2) == 0
    assert plan.bucket_bytes(stage=2, elem_bytes=2, bucket_elements=5e8, params=psi) == 1e9 + 2 * psi  # + unreduced
    assert plan.bucket_bytes(stage=3, elem_bytes=2, bucket_elements=5e8, params=psi) == 1e9 + 2 * psi
    # ring: (n - 1) / n x bytes / B + (n - 1) alpha per pass; one rank moves nothing
    assert plan.ring_time_s(8e9, ranks=8, passes=2, gbps=1.0, latency_us=1e6) == pytest.approx(2 * (7 / 8 * 8 + 7))
    assert plan.ring_time_s(8e9, ranks=1, passes=2, gbps=1.0, latency_us=1.0) == 0.0


def test_projection_rows_and_recommendation():
    measured = {"params": 10 ** 9, "dtype": "bfloat16", "tokens_per_step": 1024, "mfu": 0.5,
                "steps": {"none": {"flops": 1e15, "activation_bytes": 70 * 2 ** 30, "step_s": 1.0},
                          "checkpointing": {"flops": 1.3e15, "activation_bytes": 10 * 2 ** 30, "step_s": 1.3}}}
    cluster = plan.Cluster(**{**plan.PRESETS["h100-ib"], "nodes": 4})
    rows = plan.project(measured, cluster, overlap=0.0, buffer_gib=2.0, mfu=None)
    assert sorted((r["zero_stage"], r["activation_checkpointing"]) for r in rows) == \
        [(s, c) for s in range(4) for c in (False, True)]
    plain = {r["zero_stage"]: r for r in rows if not r["activation_checkpointing"]}
    assert plain[0]["compute_s"] == pytest.approx(1e15 / (989e12 * 0.5))
    # 16 GB of model states + 70 GiB of activations do not fit 80 GiB; ZeRO-3 shards the states over 32 ranks
    # but holds DeepSpeed's gathered working set (here all 1e9 parameters in bf16) beside them
    assert not plain[0]["fits"] and plain[3]["model_states_gib"] < plain[2]["model_states_gib"]
    assert plain[3]["ds_buckets_gib"] == pytest.approx((1e9 + 2e9) / 2 ** 30)
    for r in rows:
        parts = r["model_states_gib"] + r["activations_gib"] + r["ds_buckets_gib"] + r["buffers_gib"]
        assert r["memory_per_rank_gib"] == pytest.approx(parts)
    assert plain[3]["comm_s"] > plain[0]["comm_s"]  # 3 Psi against 2 Psi, across nodes
    best = plan.recommend(rows)
    assert best["fits"] and best["step_s"] == min(r["step_s"] for r in rows if r["fits"])
    assert plan.recommend([{**r, "fits": False} for r in rows]) is None


def test_plan_command_prints_every_zero_stage_as_json_and_writes_its_plot(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.plan", *TINY, "--gpus-per-node", "8", "--nodes", "64",
                           "--json", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["zero_stage"] for r in result["rows"]} == {0, 1, 2, 3}
    assert all(r["gpus"] == 512 and r["nodes"] == 64 for r in result["rows"])
    for key in ("memory_per_rank_gib", "comm_bytes_per_rank", "comm_s", "step_s", "tokens_per_s",
                "weak_scaling_efficiency", "hours_per_1k_steps"):
        assert all(r[key] > 0 for r in result["rows"]), key
    steps = result["measured"]["steps"]
    assert steps["checkpointing"]["flops"] > steps["none"]["flops"] > 0  # the recomputed forward is counted
    assert result["recommendation"]["zero_stage"] in range(4)
    assert result["assumptions"]["cluster"]["source"].startswith("assumed")
    assert (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.parametrize("bad, message", [(["--nodes", "0"], "--nodes must be >= 1"),
                                          (["--overlap", "2"], "--overlap must be in"),
                                          (["--residues", "0"], "--residues must be >= 1")])
def test_plan_rejects_bad_input_in_one_line(bad, message):
    proc = subprocess.run([sys.executable, "-m", "bench.plan", *TINY, "--out", "", *bad], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr


def test_alpha_beta_fit_recovers_bandwidth_and_latency():
    from bench.plan_validate import fit_alpha_beta
    sizes = [2 ** k for k in range(10, 24)]
    gbps, latency_us = 2.0, 50.0
    seconds = [plan.ring_time_s(x, ranks=2, passes=2, gbps=gbps, latency_us=latency_us) for x in sizes]
    assert fit_alpha_beta(sizes, seconds, ranks=2) == pytest.approx((gbps, latency_us), rel=1e-6)
    with pytest.raises(ValueError, match=">= 2"):
        fit_alpha_beta([1], [1.0], ranks=2)


def test_validate_measures_every_comparison_at_two_processes(tmp_path):
    """--validate at tiny size: DeepSpeed's logged traffic is the planner's passes x Psi exactly, and every
    comparison (communication, memory, step time at 2 processes, the simulated 2-node job) is reported."""
    proc = subprocess.run([sys.executable, "-m", "bench.plan", "--validate", *TINY, "--json", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["quantity"]: r for r in result["validation"]}
    assert len(rows) == 13 and all(r["measured"] > 0 and r["predicted"] > 0 for r in rows.values())
    for stage in range(4):  # a few small DeepSpeed checks besides the parameters: within 1%
        assert rows[f"comm elements per step, ZeRO-{stage}"]["ratio"] == pytest.approx(1.0, abs=0.01)
    for stage in range(4):  # counted state + profiled step growth: deterministic, within 1% at this size
        assert rows[f"peak memory per rank (MiB), ZeRO-{stage}"]["ratio"] == pytest.approx(1.0, abs=0.05)
    assert any(q.startswith("step time (s), simulated 2-node") for q in rows)
    assert result["gloo_fit"]["gbps"] > 0
    assert json.loads((tmp_path / "validation.json").read_text())["validation"] == result["validation"]
