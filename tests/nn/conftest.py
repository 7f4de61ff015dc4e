"""One thread for the U-Net tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    # The networks here are tiny: threads gain nothing, and on a busy machine OpenMP's waits
    # for a descheduled thread made steps 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
