import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    """Every test starts from the same RNG state and a small thread count (CI has 2 cores)."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
