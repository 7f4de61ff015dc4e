"""Tiny phantoms shared by the trainer's tests."""

import pytest
from train_helpers import N_CASES, PHANTOM_SHAPE

from patchddm_fast.data import write_phantoms


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, n=N_CASES, shape=PHANTOM_SHAPE, seed=3)
    return folder
