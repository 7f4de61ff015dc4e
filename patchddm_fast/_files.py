"""Writing files so that nothing half-written ever lies under a final name, and nothing of a
failed write (a full disk, a read-only folder, Ctrl-C) is left behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the user's umask leaves it, as open() would create a file (tempfile.mkstemp
    makes files 0600 regardless)."""
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it...
    os.umask(mask)  # ...and set it back at once
    return mode & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, mode: str = "w", **open_options) -> Path:
    """Calls write(file) on a hidden temporary file beside `path` (.NAME.partial), then renames it
    to `path`. A failure anywhere removes the temporary file and leaves `path` as it was.
    A folder at `path` is refused before anything is written (IsADirectoryError)."""

    def save(partial: Path) -> None:
        with open(partial, mode, **open_options) as f:
            write(f)

    return atomic_save(path, save)


def atomic_save(path: str | os.PathLike, save: Callable[[Path], None], *, suffix: str = "") -> Path:
    """atomic_write for writers that take a file name: save(partial) writes the hidden
    temporary file .NAME.partial<suffix> (a suffix such as ".nii.gz" tells a library the
    format), which is then renamed to `path`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give the name of a file to write")
    partial = path.with_name(f".{path.name}.partial{suffix}")
    try:
        save(partial)
        os.replace(partial, path)
    except BaseException as error:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(error, OSError) and error.errno is not None and (error.filename is None or
                                                                        os.fspath(error.filename) == os.fspath(partial)):
            # name the file the user knows, not the hidden temporary one
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` into `path` through atomic_write."""
    return atomic_write(path, lambda f: f.write(text))
