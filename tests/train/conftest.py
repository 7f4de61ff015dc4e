"""Tiny phantoms shared by the trainer's tests."""

import pytest
import torch
from train_helpers import N_CASES, PHANTOM_SHAPE

from patchddm_fast.data import write_phantoms


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, n=N_CASES, shape=PHANTOM_SHAPE, seed=3)
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny networks gain nothing from threads, and on a busy machine idle OpenMP threads
    spin and slow the run down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
