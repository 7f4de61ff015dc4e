"""The train / validation / test split.

The paper's split of BraTS2020's 369 training cases is 295 / 37 / 37, drawn as the original
code does: `numpy.random.RandomState(0).permutation(numpy.arange(1, 370))` (the same order as
RandomState(0).shuffle of that array); its first 295 case numbers are the training set, the
next 37 the validation set, the last 37 the test set, each sorted ascending. Case numbers are
the digits of the case folders' names (BraTS20_Training_042 -> 42).

Other collections (synthetic phantoms, a subset) are split the same way over their own case
numbers, with sizes 10% / 10% (rounded) for validation and test and the rest for training.

The numbers split are those of every case folder that find_cases saw holding an image, usable
or not (CaseFiles.scan_ids), not only of the cases usable today: a case whose file is missing or
damaged drops out of its own part and moves no other case to another part.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .layout import CaseFiles, DataError, case_number

PAPER_CASES = 369
PAPER_SIZES = (295, 37, 37)
PAPER_SEED = 0
PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]

    def part_of(self, number: int) -> str | None:
        for part in PARTS:
            if number in getattr(self, part):
                return part
        return None


def default_sizes(n: int) -> tuple[int, int, int]:
    """(train, validation, test) sizes: 10% (rounded) each for validation and test; 369 gives
    the paper's 295 / 37 / 37. With 3 or more cases, validation and test get at least one."""
    held = max(1, round(n * 0.1)) if n >= 3 else 0
    return n - 2 * held, held, held


def make_split(numbers: Iterable[int], sizes: Sequence[int] | None = None, seed: int = PAPER_SEED) -> Split:
    """Splits the case numbers: permutes them (sorted ascending first) with RandomState(seed),
    then cuts the permutation into train, validation and test of the given sizes."""
    ordered = np.array(sorted({int(n) for n in numbers}), dtype=np.int64)
    sizes = tuple(int(s) for s in (sizes if sizes is not None else default_sizes(len(ordered))))
    if len(sizes) != 3 or min(sizes) < 0 or sum(sizes) != len(ordered):
        raise ValueError(f"make_split: sizes {sizes} must be 3 non-negative counts summing to the "
                         f"{len(ordered)} case numbers")
    permuted = np.random.RandomState(seed).permutation(ordered)
    cuts = np.cumsum(sizes)[:2]
    parts = [tuple(sorted(int(v) for v in part)) for part in np.split(permuted, cuts)]
    return Split(*parts)


def paper_split() -> Split:
    """The paper's 295 / 37 / 37 split of case numbers 1..369 (seed 0)."""
    return make_split(range(1, PAPER_CASES + 1), PAPER_SIZES, PAPER_SEED)


def split_cases(cases: Sequence[CaseFiles], split: Split | str = "auto") -> dict[str, list[CaseFiles]]:
    """Sorts cases into {"train", "validation", "test"} by case number.

    split: a Split; "paper" (paper_split()); "own" (make_split over these cases' numbers);
    "auto" = "paper" when the case numbers run up to 369 and no further (BraTS2020's training
    set, even with some cases missing or unusable), else "own". Cases without a number, or
    whose number the split does not hold, raise DataError (a fixed split must not silently
    drop data).

    The split ("own", and the choice of "auto") is made over the case numbers of every case
    folder the scan that found `cases` saw (their scan_ids), readable or not, so it does not
    change when a case becomes unusable.
    """
    numbers = {}
    for case in cases:
        if case.number is None:
            raise DataError(f"{case.case_id}: its folder name has no case number, needed for the split")
        if case.number in numbers:
            raise DataError(f"cases {numbers[case.number].case_id} and {case.case_id} have the same "
                            f"number {case.number}")
        numbers[case.number] = case
    scanned = set(numbers)
    for case in cases:
        scanned.update(n for n in map(case_number, case.scan_ids) if n is not None)
    if split == "auto":
        split = "paper" if scanned and min(scanned) >= 1 and max(scanned) == PAPER_CASES else "own"
    if split == "paper":
        split = paper_split()
    elif split == "own":
        split = make_split(scanned)
    elif not isinstance(split, Split):
        raise ValueError(f"split_cases: split must be a Split, 'paper', 'own' or 'auto', got {split!r}")
    out = {part: [] for part in PARTS}
    for number in sorted(numbers):
        part = split.part_of(number)
        if part is None:
            raise DataError(f"{numbers[number].case_id}: case number {number} is in none of the split's parts")
        out[part].append(numbers[number])
    return out


# The parts a command can pick: the split's three, the two held out from training together,
# or every case.
SUBSETS = ("all", "train", "validation", "test", "held-out")


def subset_cases(cases: Sequence[CaseFiles], subset: str) -> list[CaseFiles]:
    """The cases of one part of the split (split_cases); "held-out" is validation + test, the
    cases training never sees; "all" keeps every case."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if subset == "all":
        return list(cases)
    parts = split_cases(cases)
    return parts["validation"] + parts["test"] if subset == "held-out" else parts[subset]
