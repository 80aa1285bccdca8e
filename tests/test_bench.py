"""The benchmark harness, covered by the plain (fast) suite: a tiny sweep and its report."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from bench import report
from bench.cases import Case, full_cases, quick_cases, tiny_cases
from bench.measure import cpu_tensor_peak_bytes, peak_memory_mib
from vnt import MALLOC_TUNABLES

ROOT = Path(__file__).parents[1]


def test_sweep_is_data_with_unique_readable_ids():
    for cases in (quick_cases(), full_cases()):
        ids = [c.id for c in cases]
        assert len(ids) == len(set(ids))
    quick = quick_cases()
    grid = {(c.backend, c.bias_epsilon, c.dtype) for c in quick if c.group == "grid"}
    assert len(grid) == 3 * 4 * 2  # every backend x epsilon x dtype
    assert max(c.n for c in full_cases()) >= 4096
    assert {c.impl for c in quick if c.group == "readme"} == {"vnt", "original"}
    assert quick[0].id == "vnt-sdpa-eps0-float32-d32-n128-b1-fusion"
    readme = [c for c in quick if c.group == "readme"]
    assert {c.bias_epsilon for c in readme} == {1e-6}  # the original's README example
    assert {c.bias_epsilon for c in quick if c.group == "readme_eps0"} == {0.0}


@pytest.fixture(scope="module")
def tiny_session(tmp_path_factory, embedded, cache_dir):
    """`pytest --benchmark-only --bench-profile tiny --benchmark-json out.json`: one tiny row of every
    kind of benchmark (steps, compile, paired, layout, allocator, a training-league case)."""
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "VNT_CACHE_DIR": str(cache_dir), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                           "--bench-profile", "tiny", "--bench-out", str(out), "--benchmark-json", str(out / "out.json"),
                           "bench"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return out


def test_protein_profile_runs_its_grid_and_paired_rows_with_flush_to_zero_on():
    """`--bench-profile protein`: every backend x dtype x length of both depth-8 models, the paired
    depth-8 rows with flush-to-zero on only, and no other benchmark (collected, then the skips run)."""
    from bench.cases import PROTEIN_LENGTHS, protein_cases
    cases = protein_cases()
    assert len(cases) == len({c.id for c in cases}) == 2 * 3 * 2 * len(PROTEIN_LENGTHS)
    assert {c.depth for c in cases} == {8} and {c.dim for c in cases} == {64, 128} and {c.batch for c in cases} == {1}
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only", "--bench-profile",
            "protein", "bench"]
    env = {**os.environ, "VNT_BENCH_MALLOC": "system"}
    listed = subprocess.run([*base, "--collect-only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout[-3000:]
    assert listed.stdout.count("test_step.py::test_step[") == len(cases)
    assert listed.stdout.count("protein-n512") == 6  # 3 backends x flush-to-zero off/on, collected
    readme = subprocess.run([*base, "--collect-only", "-k", "protein-n512 or (d64 and float32)"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)  # the README's selection, as written
    assert readme.returncode == 0, readme.stdout[-3000:]
    assert readme.stdout.count("test_step.py::test_step[") == len(PROTEIN_LENGTHS) * 3
    assert readme.stdout.count("protein-n512") == 6
    skipped = subprocess.run([*base, "-k", "ftz-off or test_allocator or test_compat or test_train_league or test_scaling",
                              "-rs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert " passed" not in skipped.stdout and "ftz-off" not in skipped.stdout.split("short test summary")[0], skipped.stdout[-3000:]
    assert "the protein profile pairs with flush-to-zero on only" in skipped.stdout
    assert "not in the protein profile" in skipped.stdout


def test_tiny_session_report_has_the_columns_and_no_unexplained_nan(tiny_session):
    import pandas as pd
    df = pd.read_csv(tiny_session / "latest.csv")
    assert list(df.columns[: len(report.COLUMNS)]) == report.COLUMNS
    cases = df[df["kind"] == "case"]
    ok = cases[cases["status"] == "ok"]
    assert len(ok) == len(tiny_cases())
    measured = ["fwd_ms", "fwd_bwd_ms", "tokens_per_s", "fwd_bwd_gflop", "achieved_gflop_per_s", "peak_fraction",
                "equiv_rel_err", "max_abs_diff_vs_math"]
    assert not ok[measured].isna().any().any()
    assert (ok["fwd_bwd_gflop"] > 0).all()
    eager = ok[ok["compile"] != True]  # noqa: E712
    assert not eager[["peak_mem_mib", "equiv_floor_rel_err"]][eager["impl"] == "vnt"].isna().any().any()
    compiled = ok[ok["compile"] == True]  # noqa: E712
    assert len(compiled) == 1 and compiled["compile_s"].iloc[0] > 0 and compiled["max_abs_diff_vs_eager"].iloc[0] < 1e-4
    assert set(df["kind"]) >= {"case", "paired", "compat", "allocator"}
    meta = json.loads((tiny_session / "latest.meta.json").read_text())
    assert meta["profile"] == "tiny" and meta["glibc_tunables"] and "cpu_flags" in meta and meta["git_commit"]
    stamped = [p for p in tiny_session.glob("2*.csv")]
    assert stamped and all(p.with_suffix(".meta.json").exists() for p in stamped)  # dated CSVs carry metadata
    md = (tiny_session / "latest.md").read_text()
    assert "Protocol" in md and "Paired speed-up" in md and "torch.compile" in md and "## Protein sizes" in md
    assert "What denormal floats cost each package" in md and "95% interval" in md
    paired = df[df["kind"] == "paired"]
    assert set(paired["ftz"]) == {False, True} and not paired[["speedup_paired_lo", "speedup_paired_hi"]].isna().any().any()
    assert (paired["speedup_paired_lo"] <= paired["speedup_paired"]).all()
    assert (paired["speedup_paired"] <= paired["speedup_paired_hi"]).all()
    for kind, key in (("compat", "overhead_paired"), ("allocator", "malloc_speedup")):
        rows_ = df[df["kind"] == kind]
        assert len(rows_) and not rows_[[f"{key}_lo", f"{key}_hi"]].isna().any().any(), kind
    league = pd.read_csv(tiny_session / "train-bench" / "latest.csv")
    assert len(league) == 1 and 0 < league["val_rmsd_ratio"].iloc[0] < 2
    assert (tiny_session / "train-bench" / "latest.md").exists()
    assert (tiny_session / "train-bench" / "ratio_vs_time.png").stat().st_size > 0


def test_benchmark_json_holds_every_metric(tiny_session):
    data = json.loads((tiny_session / "out.json").read_text())
    info = {b["name"]: b["extra_info"] for b in data["benchmarks"]}
    step = next(v for k, v in info.items() if k.startswith("test_step") and not v.get("compile"))
    for key in ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_ms_q1", "fwd_bwd_ms_q3", "tokens_per_s", "fwd_bwd_gflop",
                "achieved_gflop_per_s", "peak_fraction", "peak_mem_mib", "equiv_rel_err", "max_abs_diff_vs_math"):
        assert key in step and step[key] == step[key], key  # present and not NaN
    paired = [v for k, v in info.items() if k.startswith("test_paired_speedup")]
    keys = {"speedup_paired", "speedup_paired_q1", "speedup_paired_q3", "speedup_paired_lo", "speedup_paired_hi",
            "original_ms", "original_ms_rounds", "fwd_bwd_ms_rounds", "ftz"}
    assert paired and all(keys <= set(v) for v in paired)
    assert {v["ftz"] for v in paired} == {False, True}  # flush-to-zero off and on in the same session
    paired_rounds = [b["stats"]["rounds"] for b in data["benchmarks"] if b["name"].startswith("test_paired_speedup")]
    assert len(paired_rounds) == 2 * 3  # ftz off and on x the backends
    assert all(r == 2 for r in paired_rounds)  # one round per measured pair
    assert any("overhead_paired" in v for v in info.values()) and any("malloc_speedup" in v for v in info.values())
    league = next(v for k, v in info.items() if k.startswith("test_train_case"))
    for key in ("val_rmsd_noisy", "val_rmsd_denoised", "val_rmsd_ratio", "equiv_rel_err", "equiv_floor_rel_err",
                "tokens_per_s", "peak_mem_mib", "wall_s", "steps_run", "parameters", "seed"):
        assert key in league, key


def test_report_compares_two_committed_runs_and_two_jsons(tiny_session, tmp_path, capsys):
    committed = sorted((ROOT / "results/bench").glob("2*.csv"))
    assert len(committed) >= 2
    assert report.main(["--compare", str(committed[0]), str(committed[-1]), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "new/old" in out and "fwd_bwd_ms" in out and (tmp_path / "c.png").stat().st_size > 0
    assert "test: 95% percentile-bootstrap interval" in out and "within noise" in out.splitlines()[-1]
    table = report.compare(tiny_session / "out.json", tiny_session / "out.json")
    assert len(table) and (table["new/old"] == 1).all() and (table["change"] == "within noise").all()
    assert (table["basis"] == "repeats").any()  # the JSON rows carry their repeats


def _synthetic_run(path: Path, *, seed: int, factors: dict[str, float], cases: int = 12, rounds: int = 15) -> Path:
    """A report CSV of ``cases`` step rows whose 15 repeats are drawn around 100 ms (3% noise), times
    ``factors[case_id]``; and one paired row whose speed-up is 5 (times its factor)."""
    import random

    import pandas as pd

    from bench import stats
    rng = random.Random(seed)
    rows = []
    for k in range(cases):
        case = f"case{k}"
        times = [rng.gauss(0.1, 0.003) * factors.get(case, 1.0) for _ in range(rounds)]
        rows.append({"kind": "case", "case_id": case, "status": "ok", "fwd_bwd_ms": 1e3 * sorted(times)[rounds // 2],
                     "fwd_bwd_ms_rounds": stats.encode_rounds(times)})
    vnt = [rng.gauss(0.1, 0.003) for _ in range(rounds)]
    original = [v * 5 * rng.gauss(1, 0.03) * factors.get("paired", 1.0) for v in vnt]
    ratios = [o / v for o, v in zip(original, vnt)]
    rows.append({"kind": "paired", "case_id": "paired", "status": "ok", "fwd_bwd_ms": 1e3 * sorted(vnt)[rounds // 2],
                 "original_ms_rounds": stats.encode_rounds(original), "fwd_bwd_ms_rounds": stats.encode_rounds(vnt),
                 **stats.summarize(ratios, "speedup_paired")})
    overhead = [rng.gauss(1.05, 0.01) * factors.get("compat", 1.0) for _ in range(rounds)]  # no repeats kept
    rows.append({"kind": "compat", "case_id": "compat", "status": "ok", **stats.summarize(overhead, "overhead_paired")})
    report.to_frame(rows).to_csv(path, index=False)
    return path


def test_compare_separates_a_known_change_from_noise(tmp_path, capsys):
    """Synthetic runs: a 20% slower and a 20% faster case, a speed-up that grew by 20%, a layout
    overhead 20% higher (a row with intervals but no repeats), the rest drawn afresh from the same
    distribution; and a run compared with itself."""
    old = _synthetic_run(tmp_path / "old.csv", seed=0, factors={})
    new = _synthetic_run(tmp_path / "new.csv", seed=1, factors={"case0": 1.2, "case1": 0.8, "paired": 1.2,
                                                                 "compat": 1.2})
    table = report.compare(old, new).set_index(["case_id", "metric"])
    change = table["change"]
    assert change[("case0", "fwd_bwd_ms")] == "slower" and change[("case1", "fwd_bwd_ms")] == "faster"
    assert change[("paired", "speedup_paired")] == "faster"
    assert change[("compat", "overhead_paired")] == "slower" and table.loc[("compat", "overhead_paired"), "basis"] == "intervals"
    unchanged = change.drop([("case0", "fwd_bwd_ms"), ("case1", "fwd_bwd_ms"), ("paired", "speedup_paired"),
                             ("compat", "overhead_paired")])
    assert (unchanged == "within noise").mean() >= 0.8, unchanged  # a 95% interval: about 1 in 20 flagged by chance
    assert (table.drop(("compat", "overhead_paired"))["basis"] == "repeats").all()
    assert report.main(["--compare", str(old), str(old)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "0 faster, 0 slower, 15 within noise"  # 13 step rows, speed-up, overhead


def test_intervals_contain_the_median_and_say_no_difference_when_they_contain_one():
    from bench import stats
    ratios = [1.2, 1.25, 1.18, 1.22, 1.3, 1.21, 1.19]
    lo, hi = stats.interval(ratios)
    assert lo <= sorted(ratios)[3] <= hi and 1 < lo
    assert stats.verdict(lo, hi, above="vnt faster", below="vnt slower") == "vnt faster"
    assert stats.verdict(0.95, 1.04, above="a", below="b") == stats.NO_DIFFERENCE
    assert stats.verdict(0.9, 0.97, above="a", below="b") == "b"
    lo, hi = stats.ratio_interval([2.0, 2.1, 1.9, 2.05], [1.0, 1.02, 0.98, 1.01])
    assert lo <= 2.0 / 1.005 <= hi and lo > 1.5
    assert stats.decode_rounds(stats.encode_rounds([0.001, 0.002])) == [1.0, 2.0]
    assert stats.decode_rounds(float("nan")) is None
    with pytest.raises(ValueError, match="at least one"):
        stats.interval([])


def test_check_paired_fails_on_a_median_outside_its_interval():
    from bench import stats
    from bench.measure import check_paired
    ratios = [1.0, 1.1, 1.2, 1.3]
    row = {"case_id": "x", "status": "ok", **stats.summarize(ratios, "speedup_paired")}
    check_paired(ratios, row, [row], "speedup_paired")
    with pytest.raises(AssertionError, match="95% interval"):
        bad = {**row, "speedup_paired_lo": 1.2, "speedup_paired_q1": 1.0}
        check_paired(ratios, bad, [bad], "speedup_paired")
    with pytest.raises(AssertionError, match="finite and positive"):
        check_paired([1.0, float("nan")], row, [row], "speedup_paired")


def test_cpu_tensor_peak_is_the_peak_of_live_tensor_bytes():
    """Known allocations: 4 MiB and 2 MiB live together, then 4 MiB freed and 1 MiB allocated; tensors
    that exist before the call do not count, and the peak is the sum of the first two."""
    before = torch.ones(2 ** 20)  # noqa: F841 (live before the call: not part of the growth)

    def fn():
        a = torch.ones(2 ** 20)          # 4 MiB of float32
        b = torch.ones(2 ** 19)          # 2 MiB
        del a
        c = torch.ones(2 ** 18)          # 1 MiB
        return b, c

    assert cpu_tensor_peak_bytes(fn) == 6 * 2 ** 20


def test_cpu_peak_memory_sees_quadratic_math_and_linear_sdpa():
    """The math path keeps each head's n x n attention map for the backward: its peak is at least
    heads x n^2 float32 and grows about as n^2; sdpa's (flash) stays below that map and grows about as n."""
    small = dict(dim=8, depth=1, heads=8, dim_head=4, fusion=False, batch=1)
    peak, growth = {}, {}
    for backend in ("math", "sdpa"):
        lo, method = peak_memory_mib(Case(backend=backend, n=1024, **small), "cpu")
        peak[backend], _ = peak_memory_mib(Case(backend=backend, n=2048, **small), "cpu")
        growth[backend] = math.log2(peak[backend] / lo)  # local exponent of n
        assert method == "cpu_profiler_tensor_peak"
    attn_map_mib = 8 * 2048 ** 2 * 4 / 2 ** 20
    assert peak["math"] >= attn_map_mib > peak["sdpa"], peak
    assert growth["math"] > 1.7 and growth["sdpa"] < 1.2, growth


def test_numerics_report_rows_and_summary(tmp_path):
    """bench.numerics on a shrunken case list: every number present and the summary says how many seeds met 1e-5."""
    import dataclasses

    import pandas as pd

    from bench import numerics
    picked = [(False, "math", "vnt", False, "vnt"), (True, "l2", "vnt", None, "paper"),
              (True, "math", "original", None, "vnt")]
    small = [dataclasses.replace(c, n=32, depth=2) for c in numerics.CASES
             if (c.fusion, c.backend, c.impl, c.attn_fold, c.norms) in picked]
    assert len(small) == 3
    rows = [numerics.measure(case, seed) for case in small for seed in (0, 1)]
    for r in rows:
        if r["impl"] == "vnt":
            assert r["err_float64"] < 1e-9 < r["err_float32"] < 1, r
            assert 0 < r["floor_inputs"] <= r["floor_activations"], r
        else:
            assert 0 < r["err_float32"] < 1 and "floor_inputs" not in r, r
    summary = numerics.summarize(pd.DataFrame(rows))
    assert list(summary["case"]) == [c.id for c in small]
    assert summary.set_index("case").loc[small[2].id, "float32 / activation floor"] == ""
    assert all(s.endswith("/2") for s in summary["seeds <= 1e-05"])


def test_long_sequences_math_runs_out_under_the_limit_where_sdpa_and_l2_train(tmp_path):
    """bench.long_sequences at tiny scale, on the attention-dominated model: 64 points fit every
    backend; at 2048 the written-out attention's 8 heads' n x n matrices (16 MiB each, ~0.65 GiB for
    the step) exceed a 0.3 GiB limit, the SDPA kernels' step (~0.04 GiB) does not. (At 1024 on the
    default model the backends' steps differ by ~30 MiB, and the outcome varied run to run.)"""
    import pandas as pd

    proc = subprocess.run([sys.executable, "-m", "bench.long_sequences", "--lengths", "64,2048", "--limit-gib",
                           "0.3", "--config", "attention", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "long_sequences.csv")
    status = {(r.n, r.backend): r.status for r in df.itertuples()}
    assert status == {(64, "sdpa"): "ok", (64, "math"): "ok", (64, "l2"): "ok",
                      (2048, "sdpa"): "ok", (2048, "math"): "oom", (2048, "l2"): "ok"}, df
    assert "Cannot allocate memory" in df.set_index(["n", "backend"]).loc[(2048, "math"), "error"]
    md = (tmp_path / "long_sequences.md").read_text()
    assert "0.3 GiB" in md and "oom" in md and "dim 8, depth 1, 8 heads x 4, dim_feat none, batch 1" in md
    default = tmp_path / "default"  # the README's command: the default model, every backend runs
    proc = subprocess.run([sys.executable, "-m", "bench.long_sequences", "--lengths", "64", "--out", str(default)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(pd.read_csv(default / "long_sequences.csv")["status"]) == {"ok"}
    assert "dim 32, depth 2, 4 heads x 16, dim_feat 16, batch 1" in (default / "long_sequences.md").read_text()


def test_profile_step_reports_where_a_step_goes(tmp_path):
    """bench.profile_step at tiny size: block times, FLOPs, the kernel and the top ops, in a report
    that names its configuration and runs with vnt's malloc settings."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.run([sys.executable, "-m", "bench.profile_step", "--tiny", "--n", "16", "--batch", "1",
                           "--rounds", "2", "--top", "5", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "profile_l2_n16.meta.json").read_text())
    # its one attention layer is the first, folded on the factor: l2 with per-head key terms on SDPA's kernel
    assert meta["glibc_tunables"] == MALLOC_TUNABLES and meta["attn_kernel"] == "flash"
    # the tiny model has one layer: its attention is the first one, on proj_in's rank-1 factor
    assert set(meta["block_ms"]) == {"attention, first layer (on the embedding's rank-1 factor)", "feed-forward",
                                     "layer norm + residual"}
    assert all(v > 0 for v in meta["block_ms"].values()) and meta["step_ms"] > 0 and meta["fwd_bwd_gflop"] > 0
    md = (tmp_path / "profile_l2_n16.md").read_text()
    assert "n 16, batch 1, bias_epsilon 1e-06, float32" in md and "| feed-forward (one, alone) |" in md
    assert "Self CPU" in md and "aten::" in md
    bad = subprocess.run([sys.executable, "-m", "bench.profile_step", "--rounds", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be positive" in bad.stderr


def test_report_re_renders_a_folder_from_its_csv(tiny_session, tmp_path, capsys):
    """`python -m bench.report FOLDER`: latest.md rebuilt from latest.csv and its metadata alone."""
    import shutil
    folder = tmp_path / "bench"
    folder.mkdir()
    for name in ("latest.csv", "latest.meta.json"):
        shutil.copy(tiny_session / name, folder / name)
    assert report.main([str(folder)]) == 0
    assert f"rendered {folder}/latest.md" in capsys.readouterr().out
    md = (folder / "latest.md").read_text()
    assert md.startswith("# Benchmark report (tiny profile)") and "## Protocol" in md and "| sdpa " in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the cuda profile runs for real (minutes)")
def test_cuda_profile_command_skips_every_row_without_a_gpu(tmp_path):
    """`pytest --benchmark-only --bench-profile cuda` as the README types it: on a machine without a
    GPU it exits cleanly, every row skipped with the reason, and writes no report. Its case list is
    well formed (unique ids, every backend in the grid)."""
    from bench.cases import BACKENDS, cuda_cases
    cases = cuda_cases()
    assert len({c.id for c in cases}) == len(cases)
    assert {c.backend for c in cases if c.group == "grid"} == set(BACKENDS)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "--bench-profile", "cuda",
                           f"--bench-out={tmp_path}", "-q", "-rs", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the cuda profile needs a CUDA GPU" in proc.stdout and " passed" not in proc.stdout
    assert not any(tmp_path.iterdir())


def test_compare_versions_pairs_two_vnt_versions(tmp_path):
    """python -m bench.compare_versions --ref HEAD at a tiny length: the committed package imports as
    vnt_ref beside the working tree's, both compute the same outputs, and every backend gets a row
    with its ratio, interval and verdict, flush-to-zero off and on."""
    from bench import compare_versions
    out = tmp_path / "versions.md"
    assert compare_versions.main(["--ref", "HEAD", "--pairs", "3", "--warmup", "1", "--n", "8", "--batch", "1",
                                  "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "ms" not in line]
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows] == [
        (ftz, b) for ftz in ("off", "on") for b in ("math", "sdpa", "l2")], rows
    assert all(any(v in r for v in ("no measurable difference", "new faster", "new slower")) for r in rows)


def test_memory_league_search_doubles_then_bisects(monkeypatch):
    """The search on a fake network that trains up to 3000 points: 1024, 2048 ok, 4096 out of memory,
    then bisection 3072 (no), 2560 (yes); one that starts out of memory halves; the ceiling stops."""
    from bench import memory_league as league
    for fits, start, expect, limited in [(3000, 1024, 2560, "memory"), (300, 1024, 256, "memory"),
                                         (10 ** 6, 1024, 4096, "ceiling")]:
        seen = []
        monkeypatch.setattr(league, "probe", lambda entry, n, cap, t, fits=fits: seen.append(n) or (
            {"status": "ok", "step_s": n / 1000, "peak_mem_mib": n, "params": 1} if n <= fits else {"status": "oom"}))
        row = league.search(("vnt", "sdpa", True), 2, start=start, max_points=4096, bisect=2, timeout_s=1,
                            log=lambda *a: None)
        assert (row["max_points"], row["limited_by"]) == (expect, limited), (fits, seen, row)
        assert row["step_s_at_max"] == expect / 1000
    assert seen == [1024, 2048, 4096]
    seen.clear()  # a probe log's results are read back, not run again
    row = league.search(("vnt", "sdpa", True), 2, start=1024, max_points=4096, bisect=0, timeout_s=1,
                        log=lambda *a: None, done={(("vnt", "sdpa", True), 2.0, 2048): {"status": "oom"}})
    assert seen == [1024] and (row["max_points"], row["probes_reused"]) == (1024, 1), row


def test_memory_league_runs_real_probes_and_writes_its_report(tmp_path):
    """python -m bench.memory_league at tiny caps: vnt sdpa with and without checkpointing,
    En-Transformer and Equiformer, two caps, real fresh-process probes under RLIMIT_AS; the CSV has the
    issue's columns. Run again, it reads every probe back from its log and writes the same table."""
    pytest.importorskip("equiformer_pytorch")
    pytest.importorskip("en_transformer")
    import pandas as pd
    command = [sys.executable, "-m", "bench.memory_league", "--models", "vnt,En-Transformer,Equiformer", "--backends",
               "sdpa,-", "--caps-gib", "0.02,0.1", "--max-points", "256", "--start", "128", "--bisect", "1",
               "--out", str(tmp_path), "--probes", str(tmp_path / "probes.jsonl")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "latest.csv")
    logged = (tmp_path / "probes.jsonl").read_text().splitlines()
    assert len(logged) == df.probes.sum() and df.probes_reused.sum() == 0
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "probes.jsonl").read_text().splitlines() == logged  # nothing ran again
    reread = pd.read_csv(tmp_path / "latest.csv")
    assert (reread.probes_reused == reread.probes).all() and reread.max_points.tolist() == df.max_points.tolist()
    for col in ("model", "backend", "activation_checkpointing", "cap_mib", "max_points", "step_s_at_max", "peak_mem_mib"):
        assert col in df.columns
    assert set(df.model) == {"vnt", "En-Transformer", "Equiformer"} and set(df.cap_mib) == {20, 102}
    assert (df.groupby(["model", "backend", "activation_checkpointing"]).max_points.apply(list)
            .map(lambda v: v[0] <= v[1]).all())  # a larger cap never trains a shorter sequence
    assert (tmp_path / "latest.md").read_text().count("| vnt ") == 4 and (tmp_path / "memory_league.png").is_file()


def test_main_job_memory_case_runs_the_launcher_and_reads_its_metrics():
    """bench.main_job_memory's measurement at tiny size: a real launch, step time and peak memory."""
    pytest.importorskip("deepspeed")
    from bench import main_job_memory
    row = main_job_memory.run_case(["--model-dim", "8", "--model-depth", "2", "--model-heads", "2",
                                    "--model-dim-head", "4", "--model-dim-feat", "4", *main_job_memory.SYNTHETIC,
                                    "--data-synthetic-length", "40", "--data-max-length", "0"],
                                   checkpointing=True, steps=3)
    assert row["steps_timed"] == 2 and row["step_s_median"] > 0 and row["peak_mem_mib"] > 100
