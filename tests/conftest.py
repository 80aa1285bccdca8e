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
