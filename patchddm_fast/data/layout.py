"""Finding BraTS cases on disk, with the quirks of real releases, and reporting per-case problems.

Two layouts are recognised, and mixtures of them:

- BraTS2020 as distributed: one folder per case, `BraTS20_Training_001/` holding
  `BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz`;
- the original PatchDDM code's layout: numbered folders (`000001/`) holding
  `brats_train_001_{t1,t1ce,t2,flair,seg}_123_w.nii.gz`.

Any folder that directly holds NIfTI files (.nii or .nii.gz) is a case; its name is the case id
and its last group of digits is the case number (used by the train/validation/test split).
Folders that are symbolic links are followed (a folder reached twice, by a link and directly or
through a loop of links, is one case and is scanned once).
A file's sequence is found from the tokens of its name (split at `_ - .` and spaces, case
ignored): the last token naming a sequence wins, where two adjacent tokens joined may also name
one (`t1_ce`). Besides the usual names this accepts BraTS2023's (t1n, t1c, t2w, t2f) and the
segmentation spellings of real releases (`seg`, `Seg`, `segm`, `segmentation`, `label`, ...;
BraTS20_Training_355's is `W39_1998.09.19_Segm.nii`).

Problems never stop a scan: each becomes a `Problem` of its case. Errors make a case unusable
(a missing sequence, a missing segmentation where labels are required, and later, when read,
an unreadable file or mismatching shapes); warnings do not (a non-standard name, an extra
file, two files for one sequence). Two different folders with the same case id are an error of
that case naming both (outputs and the split are keyed by case id, so neither is used).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SEQUENCES = ("t1", "t1ce", "t2", "flair")  # the model's input channel order
LABEL = "seg"

_ALIASES = {
    "t1": ("t1", "t1n", "t1w", "t1native"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1post", "t1contrast"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f", "t2flair"),
    LABEL: ("seg", "segm", "segmentation", "label", "labels", "mask", "gt", "groundtruth"),
}
_TOKEN_TO_KIND = {alias: kind for kind, aliases in _ALIASES.items() for alias in aliases}
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class DataError(Exception):
    """A problem with input data that the user can fix; the message names the file or folder."""


class CaseError(DataError):
    """One case cannot be used; other cases are unaffected."""

    def __init__(self, case_id: str, message: str, path: Path | None = None):
        self.case_id, self.path = case_id, path
        super().__init__(f"{case_id}: {message}")


@dataclass(frozen=True)
class Problem:
    case_id: str
    severity: str  # "error" (case unusable) or "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.case_id}: {self.severity}: {self.message}"


@dataclass
class DatasetReport:
    """Every problem met while scanning and loading, case by case."""

    root: Path | None = None
    n_found: int = 0
    problems: list[Problem] = field(default_factory=list)

    def add(self, case_id: str, severity: str, message: str) -> None:
        problem = Problem(case_id, severity, message)
        if problem not in self.problems:  # a case that fails twice is reported once
            self.problems.append(problem)

    def add_error(self, error: CaseError) -> None:
        self.add(error.case_id, "error", str(error).removeprefix(f"{error.case_id}: "))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def failed_cases(self) -> list[str]:
        return sorted({p.case_id for p in self.errors})

    def summary(self) -> str:
        bad = len(self.failed_cases)
        warned = len({p.case_id for p in self.warnings} - set(self.failed_cases))
        return (f"{self.n_found} case(s) found: {self.n_found - bad} usable, {bad} with errors, "
                f"{warned} more with warnings")

    def format(self) -> str:
        """The summary line, then one line per problem, errors first."""
        ordered = sorted(self.problems, key=lambda p: (p.severity != "error", p.case_id))
        return "\n".join([self.summary()] + [f"  {p}" for p in ordered])


@dataclass
class CaseFiles:
    """The files of one case: sequence name -> path (t1, t1ce, t2, flair, and seg if present)."""

    case_id: str
    folder: Path
    number: int | None
    files: dict[str, Path]
    # The ids of every case folder the same find_cases scan found that holds an image (usable
    # or not): the split is made over these, so it does not depend on which cases are readable.
    scan_ids: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def has_label(self) -> bool:
        return LABEL in self.files

    def missing(self, with_label: bool) -> list[str]:
        wanted = SEQUENCES + ((LABEL,) if with_label else ())
        return [kind for kind in wanted if kind not in self.files]


def nifti_stem(name: str) -> str | None:
    """The file name without its NIfTI suffix, or None if it is not a NIfTI file."""
    lower = name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def sequence_of(name: str) -> str | None:
    """Which sequence (t1, t1ce, t2, flair) or seg a NIfTI file name holds, or None."""
    stem = nifti_stem(name)
    if stem is None:
        return None
    tokens = [t for t in re.split(r"[_\-.\s]+", stem.lower()) if t]
    found = None
    for i, token in enumerate(tokens):
        pair = token + tokens[i + 1] if i + 1 < len(tokens) else None
        if pair in _TOKEN_TO_KIND:  # `t1_ce` names t1ce, not t1
            found = _TOKEN_TO_KIND[pair]
        elif token in _TOKEN_TO_KIND and not (i > 0 and tokens[i - 1] + token in _TOKEN_TO_KIND):
            found = _TOKEN_TO_KIND[token]
    return found


def case_number(name: str) -> int | None:
    """The last group of digits of a case folder's name (BraTS20_Training_042 -> 42)."""
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else None


def _canonical(path: Path, case_id: str, kind: str) -> bool:
    stem = nifti_stem(path.name) or ""
    return stem.lower() == f"{case_id}_{kind}".lower()


def _case_from_folder(folder: Path, nifti_names: list[str], report: DatasetReport) -> CaseFiles:
    case_id = folder.name
    candidates: dict[str, list[Path]] = {}
    for name in sorted(nifti_names):
        kind = sequence_of(name)
        if kind is None:
            report.add(case_id, "warning", f"ignoring {name}: its name names no sequence")
            continue
        candidates.setdefault(kind, []).append(folder / name)
    files = {}
    for kind, paths in candidates.items():
        # Prefer the standard name, then .nii.gz over .nii, then the first in sorted order.
        paths.sort(key=lambda p: (not _canonical(p, case_id, kind), not p.name.lower().endswith(".gz"), p.name))
        files[kind] = paths[0]
        if len(paths) > 1:
            report.add(case_id, "warning", f"{len(paths)} files for {kind} "
                       f"({', '.join(p.name for p in paths)}); using {paths[0].name}")
        stem = (nifti_stem(paths[0].name) or "").lower()
        if kind == LABEL and not re.search(r"(^|_)seg(_\d+_w)?$", stem):  # the two layouts' names
            report.add(case_id, "warning", f"segmentation file has a non-standard name: {paths[0].name}")
    return CaseFiles(case_id, folder, case_number(case_id), files)


def find_cases(root: str | os.PathLike, *, with_label: bool = True) -> tuple[list[CaseFiles], DatasetReport]:
    """All usable cases under `root` (a folder of cases, or one case folder), and the report.

    with_label: a case without a segmentation is an error (training, evaluation); otherwise
    it is fine (inference). Raises DataError if root does not exist or holds no case at all.
    Cases come back sorted by case id.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a folder of cases or one case folder)")
    report = DatasetReport(root=root)
    # Folders holding NIfTI files, by real path (links are followed; a folder reached twice, by
    # a link and directly or through a loop, is scanned once, under its own name if reached so).
    folders: dict[str, tuple[Path, list[str]]] = {}
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            if real in folders and os.path.basename(dirpath) == os.path.basename(real):
                folders[real] = (Path(dirpath), folders[real][1])
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            link = os.path.join(dirpath, name)
            if (not name.startswith(".") and nifti_stem(name) is None and os.path.islink(link)
                    and not os.path.exists(link)):
                report.add(name, "warning", f"ignoring {link}: a symbolic link to nothing "
                           f"({os.readlink(link)})")
        names = [f for f in filenames if not f.startswith(".") and nifti_stem(f) is not None]
        if names:
            folders[real] = (Path(dirpath), names)
    found: dict[str, CaseFiles] = {}
    duplicates: dict[str, list[Path]] = {}
    with_images: set[str] = set()
    for folder, names in sorted(folders.values()):
        case = _case_from_folder(folder, names, report)
        if any(kind in case.files for kind in SEQUENCES):
            with_images.add(case.case_id)
        if case.case_id in found:
            duplicates.setdefault(case.case_id, [found[case.case_id].folder]).append(case.folder)
            continue
        report.n_found += 1
        missing = case.missing(with_label)
        if missing:
            report.add(case.case_id, "error", f"missing {', '.join(missing)} in {case.folder}")
        found[case.case_id] = case
    if not found:
        raise DataError(f"{root}: no NIfTI files (.nii or .nii.gz) found in it or its subfolders")
    for case_id, paths in duplicates.items():
        report.add(case_id, "error", f"{len(paths)} folders have this case id: "
                   f"{', '.join(str(p) for p in paths)}; none of them is used (rename or remove all but one)")
    scan_ids = tuple(sorted(with_images))
    for case in found.values():
        case.scan_ids = scan_ids
    failed = set(report.failed_cases)
    usable = [found[k] for k in sorted(found) if k not in failed]
    return usable, report
