"""No tracked file may name a path that exists only on one machine.

A clone must work anywhere: a path into the folder our checkouts live in, a home or
temporary folder, or the shared folder beside the checkout is a dependency that a user who
clones the repository does not have.
"""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Written in pieces so that this file does not match itself.
_MACHINE_FOLDERS = ("work", "root", "home", "tmp", "Users", "mnt/data")
_FORBIDDEN = re.compile(
    r"(?<![\w.~$-])/(?:" + "|".join(re.escape(f) for f in _MACHINE_FOLDERS) + r")/"
    + "|" + re.escape(".." + "/" + "shared"))


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")


def offending_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if _FORBIDDEN.search(line)]


def _path(*parts):  # written in pieces, as above
    return "/".join(parts)


@pytest.mark.parametrize("line", [f"data = '{_path('', 'work', 'shared', 'golden')}'",
                                  f"see {_path('..', 'shared', 'DESIGN.md')}", f"cd {_path('', 'tmp', 'build')}",
                                  f"open('{_path('', 'root', '.cache', 'x')}')", _path("", "home", "me", "brats")])
def test_the_pattern_catches_machine_paths(line):
    assert offending_lines(line) == [line]


@pytest.mark.parametrize("line", ["CUDA_HOME=/usr/local/cuda", "open('/proc/meminfo')", "os.path.exists('/dev/nvidia0')",
                                  "tests/golden/README.md", "a/work/b is relative", "~/tmp/x", "$HOME/work/x"])
def test_the_pattern_leaves_ordinary_paths_alone(line):
    assert offending_lines(line) == []


def test_no_tracked_file_names_a_machine_path():
    found = {}
    for name in _tracked_files():
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:  # binary (the golden .npz)
            continue
        lines = offending_lines(data.decode("utf-8", errors="replace"))
        if lines:
            found[name] = lines[:3]
    assert not found, f"tracked files name paths of one machine: {found}"
