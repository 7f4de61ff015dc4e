"""Fixtures of the data tests."""

import pytest
from cases import write_case


@pytest.fixture
def make_case(tmp_path):
    def make(case_id, **kwargs):
        return write_case(tmp_path, case_id, **kwargs)
    return make
