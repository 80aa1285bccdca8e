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
import time

import pytest
import torch

from bench import exec_with_malloc_tunables, report
from bench.cases import (PAIRED, PAIRED_TINY, PROTEIN_PAIRED, README, TINY, cuda_cases, full_cases, gpu_sized_cases,
                         protein_cases, quick_cases, tiny_cases)
from bench.train_cases import quality_cases, tiny_train_cases, train_cases

ROWS: list[dict] = []
# the README-configuration rows (vnt vs the original package) get more rounds: their ratio is the headline;
# long_rounds: the paired n = 512 and depth-6 rows, where one step of the original takes 2-20 s on 2 CPU cores.
# train: the training league (bench/train_cases.py) alone, reported in results/train-bench.
# tiny: one tiny row of every kind, what tests/test_bench.py runs to check the harness.
# protein: depth-8 models at 256-2048 points (bench.cases.protein_cases) and the paired depth-8 rows, flush-to-zero on.
# cuda: the GPU rows alone (bench.cases.cuda_cases), on a CUDA machine; without one every row is skipped.
PROFILES = {"quick": dict(rounds=3, warmup=1, readme_rounds=7, long_rounds=3),
            "full": dict(rounds=10, warmup=3, readme_rounds=15, long_rounds=7),
            "train": dict(rounds=1, warmup=0, readme_rounds=1, long_rounds=1),
            "quality": dict(rounds=1, warmup=0, readme_rounds=1, long_rounds=1),
            "tiny": dict(rounds=2, warmup=1, readme_rounds=2, long_rounds=2),
            "protein": dict(rounds=3, warmup=1, readme_rounds=3, long_rounds=5),
            "cuda": dict(rounds=10, warmup=3, readme_rounds=15, long_rounds=7)}
# the protein profile runs the per-case steps and the paired rows; the rest answer other questions
PROTEIN_TESTS = ("test_step.py", "test_speedup.py")
_STARTED = time.time()
_ENVIRONMENT: dict = {}  # hardware, versions and the git state when the session started (bench.report)


def pytest_configure(config):
    if config.getoption("benchmark_only", default=False) and os.environ.get("VNT_BENCH_MALLOC") != "system":
        exec_with_malloc_tunables(["pytest", *config.invocation_params.args])
    if config.getoption("benchmark_only", default=False):
        _ENVIRONMENT.update(report.environment())  # the code that runs, not what the tree holds when it ends


def pytest_collection_modifyitems(config, items):
    if not config.getoption("benchmark_only"):
        skip = pytest.mark.skip(reason="benchmarks run with `pytest --benchmark-only`")
        for item in items:
            if "bench" in item.nodeid.split("/")[0]:
                item.add_marker(skip)
        return
    profile = config.getoption("bench_profile")
    if profile == "cuda" and device() != "cuda":
        skip = pytest.mark.skip(reason="the cuda profile needs a CUDA GPU")
        for item in items:
            item.add_marker(skip)
        return
    for item in items:
        league = "test_train_league" in item.nodeid
        if ((profile in ("train", "quality")) != league and profile != "tiny"
                or (profile in ("tiny", "cuda") and "test_scaling" in item.nodeid)):
            item.add_marker(pytest.mark.skip(reason=f"not in the {profile} profile"))
        elif profile == "protein" and not any(name in item.nodeid for name in PROTEIN_TESTS):
            item.add_marker(pytest.mark.skip(reason="not in the protein profile"))


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    profile = metafunc.config.getoption("bench_profile")
    if "case" in metafunc.fixturenames:
        cases = {"full": full_cases, "tiny": tiny_cases, "cuda": cuda_cases,
                 "protein": protein_cases}.get(profile, quick_cases)()
        if device() == "cuda" and profile in ("quick", "full"):
            cases = gpu_sized_cases() + cases
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    if "paired" in metafunc.fixturenames:
        configs = {"tiny": PAIRED_TINY, "protein": PROTEIN_PAIRED}.get(profile, PAIRED)
        metafunc.parametrize("paired", list(configs.items()), ids=list(configs))
    if "train_case" in metafunc.fixturenames:
        cases = {"tiny": tiny_train_cases, "quality": quality_cases}.get(profile, train_cases)()
        metafunc.parametrize("train_case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def profile(request):
    name = request.config.getoption("bench_profile")
    return {"name": name, **PROFILES[name], "readme": TINY if name == "tiny" else README}


@pytest.fixture(scope="session")
def gemm_peaks():
    from bench.measure import gemm_peak_flops
    size = 8192 if device() == "cuda" else 2048  # a GPU needs a large product to reach its rate
    return {d: gemm_peak_flops(d, device(), size=size) for d in ("float32", "bfloat16")}


@pytest.fixture
def rows():
    return ROWS


@pytest.fixture(params=[False, True], ids=["ftz-off", "ftz-on"])
def ftz(request):
    """Flush-to-zero (``torch.set_flush_denormal``) for a comparison with another package: off, PyTorch's
    default, and on, for both packages, in the same session. Restored to off afterwards. The protein
    profile runs on only (the original's depth-8 step takes many seconds)."""
    if not request.param and request.config.getoption("bench_profile") == "protein":
        pytest.skip("the protein profile pairs with flush-to-zero on only")
    if not torch.set_flush_denormal(request.param):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal needs SSE3 on x86)")
    yield request.param
    torch.set_flush_denormal(False)


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    from pathlib import Path
    out = session.config.getoption("bench_out")
    name = session.config.getoption("bench_profile")
    protocol = {**_ENVIRONMENT, "profile": name, **PROFILES[name],
                "command": " ".join(["pytest", *session.config.invocation_params.args]), "wall_s": round(time.time() - _STARTED, 1)}
    train_rows = [r for r in ROWS if r.get("kind") == "train"]
    step_rows = [r for r in ROWS if r.get("kind") != "train"]
    if train_rows:
        folder = "train-quality" if name == "quality" else "train-bench"
        train_dir = Path(out) / folder if out else report.RESULTS.parent / folder
        report.write_train(train_rows, out_dir=train_dir, protocol=protocol)
    if step_rows:
        out_dir = Path(out) if out else report.RESULTS if device() == "cpu" else report.RESULTS.parent / "bench-cuda"
        if name == "protein" and not out:
            out_dir = out_dir / "protein"
        report.write(step_rows, out_dir=out_dir, protocol=protocol)
