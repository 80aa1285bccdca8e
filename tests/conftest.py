import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state; global state is restored after."""
    state = torch.random.get_rng_state()
    py_state = random.getstate()
    torch.manual_seed(0)
    random.seed(0)
    yield
    torch.random.set_rng_state(state)
    random.setstate(py_state)


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vnt-cache")


@pytest.fixture(scope="session")
def embedded(cache_dir):
    """The embedded set, built from scratch once per session in a fresh cache dir."""
    import time

    from vnt.data import DataConfig, load_proteins

    t = time.perf_counter()
    data = load_proteins(DataConfig(cache_dir=str(cache_dir)), progress=False)
    data.build_seconds = time.perf_counter() - t
    return data


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache_dir, embedded):
    """trained(name, args, world=2) -> run dir of an uninterrupted 3-step run of the main job (a
    checkpoint every step), launched once per session through launch/train.sh. Tests must not
    change it: resume and damage tests work on copies (launching.copy_checkpoints)."""
    pytest.importorskip("deepspeed")
    from launching import launch, output

    done: dict = {}

    def get(name: str, args: list, *, world: int = 2):
        key = (name, tuple(map(str, args)), world)
        if key not in done:
            run_dir = tmp_path_factory.mktemp("trained") / name
            out = launch([*args, "--run-dir", run_dir, "--max-steps", 3, "--run-ckpt-every", 1], cache_dir,
                         NUM_GPUS=world)
            assert out.returncode == 0, output(out)
            done[key] = run_dir
        return done[key]

    return get
