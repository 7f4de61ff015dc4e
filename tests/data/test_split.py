"""The paper's 295 / 37 / 37 split and splits of other collections."""

import numpy as np
import pytest

from patchddm_fast.data import CaseFiles, DataError, split_cases
from patchddm_fast.data.split import default_sizes, make_split, paper_split


def test_paper_split_sizes_disjoint_covering_and_fixed():
    split = paper_split()
    assert (len(split.train), len(split.validation), len(split.test)) == (295, 37, 37)
    union = set(split.train) | set(split.validation) | set(split.test)
    assert union == set(range(1, 370)) and len(union) == 369
    assert split == paper_split()  # the same lists on every call
    assert all(list(part) == sorted(part) for part in (split.train, split.validation, split.test))


def test_paper_split_is_drawn_as_the_original():
    """The original shuffled numpy.arange(1, 370) in place with RandomState(0), then cut it
    295 / 37 / 37 and sorted each part."""
    numbers = np.arange(1, 370)
    np.random.RandomState(0).shuffle(numbers)
    split = paper_split()
    assert split.train == tuple(sorted(numbers[:295].tolist()))
    assert split.validation == tuple(sorted(numbers[295:332].tolist()))
    assert split.test == tuple(sorted(numbers[332:].tolist()))


def test_default_sizes():
    assert default_sizes(369) == (295, 37, 37)
    assert default_sizes(8) == (6, 1, 1)
    assert default_sizes(3) == (1, 1, 1)
    assert default_sizes(2) == (2, 0, 0)


def _cases(numbers):
    return [CaseFiles(f"Case_{n:03d}", None, n, {}) for n in numbers]


def test_split_cases():
    cases = _cases(range(1, 11))
    parts = split_cases(cases)  # numbers stop at 10: a seeded 8 / 1 / 1 split of these cases
    assert [len(parts[p]) for p in ("train", "validation", "test")] == [8, 1, 1]
    assert parts == split_cases(cases)
    brats = _cases([n for n in range(1, 370) if n != 17])  # BraTS2020 with one case unusable
    parts = split_cases(brats)
    expected = paper_split()
    assert [c.number for c in parts["validation"]] == list(expected.validation)
    assert len(parts["train"]) + len(parts["test"]) == 331
    with pytest.raises(DataError, match="none of the split's parts"):
        split_cases(_cases([1, 2, 400]), "paper")
    with pytest.raises(DataError, match="no case number"):
        split_cases([CaseFiles("patient", None, None, {})])
    with pytest.raises(ValueError, match="sizes"):
        make_split(range(5), (3, 1, 2))
