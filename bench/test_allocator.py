"""vnt's malloc settings (vnt.MALLOC_TUNABLES) on and off, in one run: the README configuration
(eps 1e-6, float32) timed in fresh processes with and without GLIBC_TUNABLES, alternating; each
pytest-benchmark round is one pair of processes."""
import os
import statistics

import pytest

from bench.cases import Case
from bench.measure import check_paired, time_in_subprocess
from bench.stats import summarize


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_malloc_tunables_on_and_off(backend, benchmark, profile, rows):
    from bench.conftest import device
    from vnt import MALLOC_TUNABLES
    if device() != "cpu":
        pytest.skip("glibc's malloc serves the CPU tensors only")
    case = Case(backend=backend, group="allocator", **profile["readme"])
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    pairs: list[tuple[float, float]] = []

    def one_pair():
        off = time_in_subprocess(case, rounds=profile["rounds"], env=base)
        on = time_in_subprocess(case, rounds=profile["rounds"], env={**base, "GLIBC_TUNABLES": MALLOC_TUNABLES})
        pairs.append((off, on))

    benchmark.pedantic(one_pair, rounds=profile["long_rounds"], iterations=1)
    ratios = [off / on for off, on in pairs]
    row = {**case.to_dict(), "kind": "allocator", "case_id": f"allocator-{backend}", "device": "cpu", "status": "ok",
           "rounds": len(pairs), "malloc_tunables": MALLOC_TUNABLES,
           "system_malloc_ms": statistics.median(off for off, _ in pairs) * 1e3,
           "fwd_bwd_ms": statistics.median(on for _, on in pairs) * 1e3,
           **summarize(ratios, "malloc_speedup")}
    rows.append(row)
    benchmark.extra_info.update(row)
    check_paired(ratios, row, rows, "malloc_speedup")
