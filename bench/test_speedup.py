"""Paired speed-up over the original package: the original's README example (eps 1e-6), the same
at eps 0, at n = 512 (batch 1) and at depth 6, on every backend, with flush-to-zero off (PyTorch's
default) and on (``torch.set_flush_denormal(True)``, for both packages) in the same session.

The two models' forward+backward steps alternate in one process (original, vnt, original, ...),
so drift in machine load hits both alike; each pytest-benchmark round is one measured pair, and
the row reports the median and quartiles of the per-pair time ratios. The readme rows of
test_step time each model on its own.
"""
import dataclasses
import statistics

import pytest

from bench.cases import BACKENDS, LONG_PAIRED, Case
from bench.measure import build, check_paired, count_flops, reference_check, step_fns, time_fn
from bench.stats import encode_rounds, summarize


@pytest.mark.parametrize("backend", BACKENDS)
def test_paired_speedup(paired, backend, ftz, benchmark, profile, rows):
    config, sizes = paired  # bench.cases.PAIRED (bench/conftest.py parametrizes by profile)
    pytest.importorskip("VN_transformer", reason="the original package (VN-transformer 0.1.0) is not installed")
    from bench.conftest import device
    dev = device()
    ours = Case(backend=backend, group="paired", **sizes)
    theirs = dataclasses.replace(ours, impl="original")
    (model_v, coors, feats), (model_o, _, _) = build(ours, dev), build(theirs, dev)  # same seeded inputs
    step_v = step_fns(model_v, coors, feats, ours, dev)[1]
    step_o = step_fns(model_o, coors, feats, theirs, dev)[1]
    for _ in range(profile["warmup"]):
        step_o()
        step_v()
    pairs: list[tuple[float, float]] = []

    def one_pair():
        pairs.append((time_fn(step_o, rounds=1, warmup=0, device=dev)[0], time_fn(step_v, rounds=1, warmup=0, device=dev)[0]))

    rounds = profile["long_rounds"] if config in LONG_PAIRED else profile["readme_rounds"]
    benchmark.pedantic(one_pair, rounds=rounds, iterations=1)
    ratios = [o / v for o, v in pairs]
    original_s, vnt_s = statistics.median(o for o, _ in pairs), statistics.median(v for _, v in pairs)
    # the arithmetic each step does: speed-up = flop_ratio x (vnt's FLOP/s / the original's FLOP/s)
    original_flop, vnt_flop = count_flops(theirs, dev), count_flops(ours, dev)
    row = {**ours.to_dict(), "kind": "paired", "case_id": f"paired-{config}-{backend}-ftz{'on' if ftz else 'off'}",
           "paired_config": config, "ftz": ftz, "impl": "vnt/original", "device": dev, "status": "ok",
           "rounds": len(pairs), "warmup": profile["warmup"], "original_ms": original_s * 1e3, "fwd_bwd_ms": vnt_s * 1e3,
           "original_ms_rounds": encode_rounds([o for o, _ in pairs]), "fwd_bwd_ms_rounds": encode_rounds([v for _, v in pairs]),
           **summarize(ratios, "speedup_paired"),
           "original_gflop": original_flop / 1e9, "fwd_bwd_gflop": vnt_flop / 1e9, "flop_ratio": original_flop / vnt_flop,
           "original_gflop_per_s": original_flop / original_s / 1e9, "achieved_gflop_per_s": vnt_flop / vnt_s / 1e9}
    row["max_abs_diff_vs_math"] = reference_check(ours, dev)  # correct before fast: the timed backend's numbers
    rows.append(row)
    benchmark.extra_info.update(row)
    check_paired(ratios, row, rows, "speedup_paired")
    assert row["max_abs_diff_vs_math"] < (5e-2 if backend == "l2" else 1e-3), row
    assert original_flop > 0 and vnt_flop > 0, row
