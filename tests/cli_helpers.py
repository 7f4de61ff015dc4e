"""What the tests of the `patchddm` command share: run it in-process, check a one-line error."""

from patchddm_fast.cli import main


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of `patchddm argv`, run in-process through cli.main."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(err: str, *fragments):
    """err is one line, `patchddm <command>: error: ...`, no traceback, not reported as an
    internal error, and holds every fragment."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and ": error: " in lines[0] and "internal error" not in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
