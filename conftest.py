"""The benchmark session's options live here, at the root, so that pytest knows them before it reads
any other conftest: `pytest --benchmark-only --bench-profile full` works without naming bench/."""

PROFILE_HELP = ("quick (~20 min on 2 CPU cores), full (long sequences, more rounds), train (the training league, "
                "~25 min), quality (vnt against En-Transformer at an equal time budget, ~30 min), tiny (a tiny row of "
                "every kind: the harness's own test), protein (depth-8 models at 256-2048 points, float32 and bfloat16, and "
                "the paired depth-8 speed-up; hours on 2 CPU cores: select rows with -k), cuda (the GPU rows alone, on a CUDA machine: results/bench-cuda)")


def pytest_addoption(parser):
    parser.addoption("--bench-profile", default="quick", choices=("quick", "full", "train", "quality", "tiny", "protein", "cuda"),
                     help=PROFILE_HELP)
    parser.addoption("--bench-out", default=None, help="report folder (default results/bench, or results/bench-cuda)")
