"""The README's Python examples run as written, and its two fresh-machine commands stay in place."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


PYTHON_BLOCKS = _blocks("python")


def test_readme_has_python_examples_and_both_commands():
    assert PYTHON_BLOCKS, "README.md lost its Python examples"
    text = README.read_text()
    test_command = text.split("<!-- test-command -->", 1)[1]
    assert "python -m pytest" in _blocks("bash")[0] or "python -m pytest" in test_command
    assert any("patchddm demo" in block for block in _blocks("bash")), "README.md lost the demo command"


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_example_runs(index, tmp_path):
    # A fresh interpreter, as a reader pasting the block would have, finding this checkout's package.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(README.parent), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", PYTHON_BLOCKS[index]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, f"README example {index} failed:\n{PYTHON_BLOCKS[index]}\n{result.stderr}"
