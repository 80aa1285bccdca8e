"""Benchmark session: `pytest --benchmark-only [--bench-profile quick|full]` from the repo root.

Rows are collected while the session runs and written by bench.report at its end.
Without --benchmark-only these benchmarks are skipped (tests/test_bench.py covers the harness).

The session runs with vnt's allocator settings (``vnt.MALLOC_TUNABLES``, what launch/train.sh sets):
glibc's malloc otherwise unmaps every large freed block and faults it back in on the next step. A
session started without GLIBC_TUNABLES re-executes itself with them, unless VNT_BENCH_MALLOC=system;
bench/test_allocator.py measures steps with and without them, and the report's protocol records
what this session ran with.
"""
import os
import sys
import time

import pytest
import torch

from bench import report
from bench.cases import cuda_cases, full_cases, quick_cases

ROWS: list[dict] = []
# the README-configuration rows (vnt vs the original package) get more rounds: their ratio is the headline;
# long_rounds: the paired n = 512 rows, where one step of the original takes 5-20 s on 2 CPU cores
PROFILES = {"quick": dict(rounds=3, warmup=1, readme_rounds=7, long_rounds=3),
            "full": dict(rounds=10, warmup=3, readme_rounds=15, long_rounds=7)}
_STARTED = time.time()


def pytest_configure(config):
    if (config.getoption("benchmark_only", default=False) and "GLIBC_TUNABLES" not in os.environ
            and os.environ.get("VNT_BENCH_MALLOC") != "system"):
        from vnt import MALLOC_TUNABLES
        env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES}
        os.execve(sys.executable, [sys.executable, "-m", "pytest", *config.invocation_params.args], env)


def pytest_addoption(parser):
    parser.addoption("--bench-profile", default="quick", choices=tuple(PROFILES),
                     help="quick (~10 min on 2 CPU cores) or full (long sequences, more rounds)")
    parser.addoption("--bench-out", default=None, help="report folder (default results/bench, or results/bench-cuda)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with `pytest --benchmark-only`")
    for item in items:
        if "bench" in item.nodeid.split("/")[0]:
            item.add_marker(skip)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        profile = metafunc.config.getoption("bench_profile")
        cases = (cuda_cases() if device() == "cuda" else []) + (full_cases() if profile == "full" else quick_cases())
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def profile(request):
    name = request.config.getoption("bench_profile")
    return {"name": name, **PROFILES[name]}


@pytest.fixture(scope="session")
def gemm_peaks():
    from bench.measure import gemm_peak_flops
    return {d: gemm_peak_flops(d, device()) for d in ("float32", "bfloat16")}


@pytest.fixture
def rows():
    return ROWS


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    from pathlib import Path
    out = session.config.getoption("bench_out")
    out_dir = Path(out) if out else report.RESULTS if device() == "cpu" else report.RESULTS.parent / "bench-cuda"
    name = session.config.getoption("bench_profile")
    report.write(ROWS, out_dir=out_dir, protocol={
        "profile": name, **{k: v for k, v in PROFILES[name].items()},
        "command": f"pytest --benchmark-only --bench-profile {name}",
        "wall_s": round(time.time() - _STARTED, 1)})
