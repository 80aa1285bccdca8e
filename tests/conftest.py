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
