"""Paired speed-up over the original package at the README configuration.

The two models' forward+backward steps alternate in one process (original, vnt, original, ...),
so drift in machine load hits both alike; the row reports the median and quartiles of the
per-pair time ratios. The readme rows of test_step time each model on its own.
"""
import dataclasses
import statistics

import pytest

from bench.cases import BACKENDS, README, Case
from bench.measure import build, quartiles, step_fns, time_fn


@pytest.mark.parametrize("backend", BACKENDS)
def test_paired_speedup(backend, benchmark, profile, rows):
    pytest.importorskip("VN_transformer", reason="the original package (VN-transformer 0.1.0) is not installed")
    from bench.conftest import device
    dev = device()
    ours = Case(backend=backend, group="paired", **README)
    theirs = dataclasses.replace(ours, impl="original")
    (model_v, coors, feats), (model_o, _, _) = build(ours, dev), build(theirs, dev)  # same seeded inputs
    step_v = step_fns(model_v, coors, feats, ours, dev)[1]
    step_o = step_fns(model_o, coors, feats, theirs, dev)[1]

    def timed(fn) -> float:
        return time_fn(fn, rounds=1, warmup=0, device=dev)[0]

    for _ in range(profile["warmup"]):
        step_o()
        step_v()
    pairs: list[tuple[float, float]] = []
    benchmark.pedantic(lambda: pairs.extend((timed(step_o), timed(step_v)) for _ in range(profile["readme_rounds"])),
                       rounds=1, iterations=1)
    ratios = [o / v for o, v in pairs]
    q1, q3 = quartiles(ratios)
    rows.append({**ours.to_dict(), "kind": "paired", "case_id": f"paired-{backend}", "impl": "vnt/original",
                 "device": dev, "status": "ok", "rounds": len(pairs), "warmup": profile["warmup"],
                 "original_ms": statistics.median(o for o, _ in pairs) * 1e3,
                 "fwd_bwd_ms": statistics.median(v for _, v in pairs) * 1e3,
                 "speedup_paired": statistics.median(ratios), "speedup_q1": q1, "speedup_q3": q3})
    assert all(r > 0 for r in ratios)
