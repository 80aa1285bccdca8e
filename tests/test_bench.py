"""The benchmark harness, covered by the plain (fast) suite: a tiny sweep and its report."""
import math

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from bench import report
from bench.cases import Case, full_cases, quick_cases
from bench.measure import measure, peak_memory_mib

TINY = dict(dim=8, depth=1, heads=2, dim_head=4, dim_feat=4, n=16, batch=1)


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


def test_tiny_sweep_report_has_the_columns_and_no_unexplained_nan(tmp_path):
    peaks = {"float32": 1e11, "bfloat16": 2e11}
    cases = [Case(backend=b, bias_epsilon=e, dtype=d, **TINY) for b in ("sdpa", "math", "l2")
             for e in (0.0, 1e-2) for d in ("float32", "bfloat16")]
    cases += [Case(backend=b, group="readme", **TINY) for b in ("sdpa", "math")]
    cases += [Case(backend=b, group="length", **{**TINY, "n": 32}) for b in ("sdpa", "math")]
    rows = [{"kind": "case", **measure(c, device="cpu", rounds=2, warmup=1, peaks=peaks)} for c in cases]
    rows.append({"kind": "case", **Case(impl="original", **TINY).to_dict(), "status": "oom"})  # a status row
    report.write(rows, out_dir=tmp_path, protocol={"profile": "test", "rounds": 2, "warmup": 1})
    import pandas as pd
    df = pd.read_csv(tmp_path / "latest.csv")
    assert list(df.columns[: len(report.COLUMNS)]) == report.COLUMNS
    ok = df[df["status"] == "ok"]
    assert len(ok) == len(cases)
    measured = ["fwd_ms", "fwd_bwd_ms", "tokens_per_s", "fwd_bwd_gflop", "achieved_gflop_per_s", "peak_fraction",
                "peak_mem_mib", "equiv_rel_err", "equiv_floor_rel_err", "max_abs_diff_vs_math"]
    assert not ok[measured].isna().any().any()
    assert (ok["fwd_bwd_gflop"] > 0).all() and (ok["peak_mem_mib"] >= 0).all()
    # eps = 0 is equivariant up to rounding; eps > 0 is not
    f32 = ok[ok["dtype"] == "float32"]
    assert f32[f32["bias_epsilon"] == 0]["equiv_rel_err"].max() < 1e-4
    assert f32[f32["bias_epsilon"] > 0]["equiv_rel_err"].min() > 1e-4
    # the floor: below the error at eps = 0 (rounding only), the same size at eps > 0 (the bias dominates)
    vnt = ok[ok["impl"] == "vnt"]
    assert not vnt["equiv_floor_rel_err"].isna().any()
    eps0 = f32[f32["bias_epsilon"] == 0]
    assert (eps0["equiv_floor_rel_err"] <= eps0["equiv_rel_err"]).all()
    biased = f32[f32["bias_epsilon"] > 0]
    assert ((biased["equiv_floor_rel_err"] / biased["equiv_rel_err"]).between(0.5, 2.0)).all()
    # NaN only where the status says why
    assert (df[df["status"] != "ok"]["fwd_ms"].isna()).all()
    md = (tmp_path / "latest.md").read_text()
    assert "Protocol" in md and "torch" in md and "git_commit" in md
    for png in ("equivariance_vs_epsilon.png", "throughput_vs_length.png", "memory_vs_length.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_cpu_peak_memory_sees_quadratic_math_and_linear_sdpa():
    """The subprocess RSS method must see the n x n attention matrix of the math path."""
    small = dict(dim=8, depth=1, heads=8, dim_head=4, fusion=False, batch=1)
    growth = {}
    for backend in ("math", "sdpa"):
        lo, _ = peak_memory_mib(Case(backend=backend, n=1024, **small), "cpu")
        hi, _ = peak_memory_mib(Case(backend=backend, n=2048, **small), "cpu")
        growth[backend] = math.log2(hi / lo)  # local exponent of n (committed run: math 1.85, sdpa 0.43)
    assert growth["math"] > 1.5, growth
    assert growth["sdpa"] < 1.2, growth


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
