"""Fault injection for the `patchddm` command (issue 14): read-only and full output folders
(os.replace and writes raising OSError(EROFS / ENOSPC), no real tmpfs), user errors that must be
exit 2 with one line, Ctrl-C while the command starts (a real SIGINT to a subprocess), mixed and
partial outputs of `sample --skip-existing`, and the smaller defects of the command line.

Tiny data: 16^3 phantoms, a network of width 4, 2 sampling steps, 1 ensemble member.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
import patchddm_fast.inference.outputs as outputs_module
from patchddm_fast.cli import main
from patchddm_fast.data import write_phantoms
from patchddm_fast.inference import output_path
from patchddm_fast.nn import UNet3D, UNetConfig, save_checkpoint

TINY = UNetConfig(model_channels=4, channel_mult=(1, 2), num_res_blocks=1)
SHAPE = (16, 16, 16)
SAMPLE = ["--steps", "2", "--ensemble", "1", "--seed", "0", "-q", "--device", "cpu"]
TRAIN = ["--steps", "2", "--batch-size", "1", "--patch", "16", "--width", "4", "--num-workers", "0",
         "--save-every", "1", "--device", "cpu", "-q"]
NIFTI = ("mask", "mean", "uncertainty")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    model = UNet3D(TINY)
    with torch.no_grad():  # the output layer starts at zero: every fresh network predicts the same
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    save_checkpoint(model, path, volume_shape=[16, 16, 16], patch_shape=[16, 16, 16])
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two phantoms, two different checkpoints (A and B) of the same tiny network."""
    root = tmp_path_factory.mktemp("faults")
    write_phantoms(root / "data", n=2, shape=SHAPE, seed=1)
    return {"root": root, "data": root / "data", "a": _checkpoint(root / "a.pt", 0),
            "b": _checkpoint(root / "b.pt", 1), "case": "Phantom_001"}


@pytest.fixture(scope="module")
def trained(ws):
    """A checkpoint trained two steps by `patchddm train` (what --resume continues)."""
    out = ws["root"] / "run"
    assert main(["train", str(ws["data"]), str(out), *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def predicted(ws):
    """Both phantoms sampled by checkpoint A (what evaluate scores)."""
    out = ws["root"] / "pred"
    assert main(["sample", str(ws["a"]), str(ws["data"]), str(out), *SAMPLE, "--no-montage"]) == 0
    return out


def _leftovers(folder: Path):
    return sorted(p.name for p in Path(folder).rglob("*") if "partial" in p.name or p.name.endswith(".tmp"))


def _failing_replace(code, *, only=None):
    """os.replace that raises OSError(code) as a full or read-only device does (for targets whose
    name contains `only`, or all)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if only is None or only in os.fspath(dst):
            raise OSError(code, os.strerror(code), os.fspath(src))
        return real(src, dst, *args, **kwargs)

    return replace


# -- 4. user and environment errors: exit 2 with one line ----------------------------------------

@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_sample_into_a_read_only_or_full_folder_is_exit_2(ws, tmp_path, capsys, monkeypatch, code):
    out = tmp_path / "out"
    monkeypatch.setattr(os, "replace", _failing_replace(code))
    status, stdout, err = run_cli(capsys, "sample", ws["a"], ws["data"], out, *SAMPLE, "--no-montage")
    assert status == 2, err
    assert_one_line_error(err, "cannot write", os.strerror(code))
    assert _leftovers(out) == []  # no .sampling.json.partial, no .X.partial.nii.gz
    assert not any(output_path(out, ws["case"], kind).exists() for kind in NIFTI)


def test_full_disk_while_drawing_a_montage_stops_the_run_and_leaves_no_partial(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(os, "replace", _failing_replace(errno.ENOSPC, only="montage"))
    status, _, err = run_cli(capsys, "sample", ws["a"], ws["data"], out, *SAMPLE)
    assert status == 2, err
    assert_one_line_error(err, "montage.png", os.strerror(errno.ENOSPC))
    assert _leftovers(out) == []
    assert all(entry["status"] != "ok" for entry in json.loads((out / "sampling.json").read_text())["cases"].values())


def test_full_disk_while_writing_sampling_json_leaves_no_partial(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(os, "replace", _failing_replace(errno.ENOSPC, only="sampling.json"))
    status, _, err = run_cli(capsys, "sample", ws["a"], ws["data"], out, *SAMPLE, "--no-montage")
    assert status == 2, err
    assert_one_line_error(err, "sampling.json", os.strerror(errno.ENOSPC))
    assert _leftovers(out) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_phantoms_train_and_evaluate_on_a_read_only_or_full_disk_are_exit_2(ws, predicted, tmp_path, capsys,
                                                                           monkeypatch, code):
    monkeypatch.setattr(os, "replace", _failing_replace(code))
    status, _, err = run_cli(capsys, "evaluate", predicted, ws["data"], "--csv", tmp_path / "scores.csv", "-q")
    assert status == 2, err
    assert_one_line_error(err, "cannot write", "scores.csv", os.strerror(code))
    status, _, err = run_cli(capsys, "phantoms", tmp_path / "ph", "--n", "1", "--size", "16", "-q")
    assert status == 2, err
    assert_one_line_error(err)
    status, _, err = run_cli(capsys, "train", ws["data"], tmp_path / "run", *TRAIN)
    assert status == 2, err
    assert_one_line_error(err)
    assert _leftovers(tmp_path) == []


def test_a_full_disk_while_saving_a_checkpoint_is_exit_2_naming_it(ws, tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    status, _, err = run_cli(capsys, "train", ws["data"], tmp_path / "run", *TRAIN)
    monkeypatch.setattr(torch, "save", real_save)
    assert status == 2, err
    assert_one_line_error(err, "cannot write", "last.pt", os.strerror(errno.ENOSPC))
    assert _leftovers(tmp_path) == [] and not (tmp_path / "run" / "last.pt").exists()


def test_resume_with_other_settings_is_exit_2(ws, trained, capsys):
    for option, value, fragment in (("--width", "8", "differs from the one asked for"),
                                     ("--patch", "8", "--patch 8"), ("--volume", "48", "--volume 48")):
        argv = [a for a in TRAIN]
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
        status, _, err = run_cli(capsys, "train", ws["data"], trained, *argv, "--resume")
        assert status == 2, (option, err)
        assert_one_line_error(err, "last.pt", fragment)


def test_bad_sampling_options_are_exit_2(ws, tmp_path, capsys):
    out = tmp_path / "out"
    status, _, err = run_cli(capsys, "sample", ws["a"], ws["data"], out, *SAMPLE, "--eta", "-1")
    assert status == 2
    assert_one_line_error(err, "eta")
    status, _, err = run_cli(capsys, "sample", ws["a"], ws["data"], out, *SAMPLE, "--tiled", "--tile", "15")
    assert status == 2  # the tiny network halves the grid once: tiles are multiples of 2
    assert_one_line_error(err, "--tile 15,15,15", "multiple of 2")
    assert not out.exists() or not any(out.iterdir())  # refused before any work


def test_seeds_out_of_range_are_exit_2_and_the_largest_seed_trains(ws, tmp_path, capsys):
    status, _, err = run_cli(capsys, "train", ws["data"], tmp_path / "r1", *TRAIN, "--seed", "99999999999999999999999")
    assert status == 2
    assert_one_line_error(err, "seed")
    status, _, err = run_cli(capsys, "phantoms", tmp_path / "ph", "--n", "1", "--size", "16", "--seed", "-1")
    assert status == 2 and "--seed" in err and "Traceback" not in err
    status, _, err = run_cli(capsys, "sample", ws["a"], ws["data"], tmp_path / "o", *SAMPLE, "--seed", "-5")
    assert status == 2 and "--seed" in err
    status, _, err = run_cli(capsys, "train", ws["data"], tmp_path / "r2", *TRAIN, "--seed", str(2**63 - 1))
    assert status == 0, err


def test_garbage_given_to_import_checkpoint_is_exit_2(tmp_path, capsys):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    status, _, err = run_cli(capsys, "import-checkpoint", garbage, tmp_path / "out.pt")
    assert status == 2
    assert_one_line_error(err, "garbage.npz", "not a .npz")
    objects = tmp_path / "objects.npz"
    np.savez(objects, weights=np.array([{"a": 1}], dtype=object))
    status, _, err = run_cli(capsys, "import-checkpoint", objects, tmp_path / "out.pt")
    assert status == 2
    assert_one_line_error(err, "objects.npz")
    assert not (tmp_path / "out.pt").exists()


def test_a_diverging_run_is_exit_2_with_advice(ws, tmp_path, capsys):
    argv = [a for a in TRAIN]
    argv[argv.index("--steps") + 1] = "12"
    status, _, err = run_cli(capsys, "train", ws["data"], tmp_path / "run", *argv, "--lr", "1e9", "--grad-clip", "off")
    assert status == 2, err
    assert_one_line_error(err, "non-finite", "grad-clip")
    assert (tmp_path / "run" / "last.pt").is_file()  # the last good state is kept


# -- 8. partial files -----------------------------------------------------------------------------

def test_evaluate_refuses_a_folder_as_csv_before_writing_anything(ws, predicted, tmp_path, capsys, monkeypatch):
    pred = predicted
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    monkeypatch.chdir(work)
    status, stdout, err = run_cli(capsys, "evaluate", pred, ws["data"], "--csv", "data")
    assert status == 2
    assert_one_line_error(err, "--csv data", "folder")
    assert sorted(p.name for p in work.rglob("*")) == ["data"]  # no .data.partial
    assert not (pred / "evaluation.csv").exists() and stdout == ""


# -- 2. --skip-existing never accepts a mixture of two runs -------------------------------------

def _sample(ws, checkpoint, out, *extra):
    return main(["sample", str(checkpoint), str(ws["data"] / ws["case"]), str(out), *SAMPLE, *extra])


def _volumes(out, case):
    return {kind: np.asarray(nib.load(output_path(out, case, kind)).dataobj) for kind in NIFTI}


def _record(out, case):
    return json.loads((out / "sampling.json").read_text())["cases"][case]


def _interrupt_after_mean(monkeypatch):
    """The next sample run stops (Ctrl-C) right after a case's _mean.nii.gz is written."""
    real = outputs_module.output_path

    def output_path_then_stop(output_dir, case_id, kind):
        if kind == "uncertainty":
            raise KeyboardInterrupt
        return real(output_dir, case_id, kind)

    monkeypatch.setattr(outputs_module, "output_path", output_path_then_stop)


@pytest.fixture(scope="module")
def by_a(ws, tmp_path_factory):
    """The case sampled by checkpoint A, and by B, each into its own folder (for comparison)."""
    root = tmp_path_factory.mktemp("by")
    assert _sample(ws, ws["a"], root / "a") == 0 and _sample(ws, ws["b"], root / "b") == 0
    return {"a": _volumes(root / "a", ws["case"]), "b": _volumes(root / "b", ws["case"])}


def _assert_all_from(out, case, expected):
    volumes = _volumes(out, case)
    for kind in NIFTI:
        np.testing.assert_array_equal(volumes[kind], expected[kind], err_msg=kind)  # same model, seed: same bits


def test_an_interrupted_rewrite_is_redone_not_skipped(ws, by_a, tmp_path, capsys, monkeypatch):
    case, out = ws["case"], tmp_path / "out"
    assert not np.array_equal(by_a["a"]["mean"], by_a["b"]["mean"])  # the two models differ
    assert _sample(ws, ws["a"], out) == 0
    with monkeypatch.context() as patch:
        _interrupt_after_mean(patch)
        assert _sample(ws, ws["b"], out) == 130
    # mask and mean are B's now, uncertainty and montage A's: the record must not vouch for them
    np.testing.assert_array_equal(_volumes(out, case)["mean"], by_a["b"]["mean"])
    assert _record(out, case)["status"] != "ok"
    # resumed with the first run's checkpoint (whose record the old code trusted): redone by A
    status, stdout, _ = run_cli(capsys, "sample", ws["a"], ws["data"] / case, out, *SAMPLE, "--skip-existing")
    assert status == 0 and "skipped" not in stdout and "1 case(s) written" in stdout
    _assert_all_from(out, case, by_a["a"])
    assert _record(out, case)["status"] == "ok" and _record(out, case)["checkpoint"] == str(ws["a"])
    # interrupted by B again, resumed with B itself: still redone, since A's uncertainty is there
    with monkeypatch.context() as patch:
        _interrupt_after_mean(patch)
        assert _sample(ws, ws["b"], out) == 130
    status, stdout, _ = run_cli(capsys, "sample", ws["b"], ws["data"] / case, out, *SAMPLE, "--skip-existing")
    assert status == 0 and "skipped" not in stdout
    _assert_all_from(out, case, by_a["b"])
    assert _record(out, case)["status"] == "ok" and _record(out, case)["checkpoint"] == str(ws["b"])
    assert _leftovers(out) == []


def test_skip_existing_skips_only_outputs_of_the_same_checkpoint_and_settings(ws, by_a, tmp_path, capsys):
    case, out = ws["case"], tmp_path / "out"
    assert _sample(ws, ws["a"], out) == 0
    before = _record(out, case)
    # the same checkpoint and settings: skipped, and the record still credits the run that wrote it
    status, stdout, _ = run_cli(capsys, "sample", ws["a"], ws["data"] / case, out, *SAMPLE, "--skip-existing")
    assert status == 0 and "skipped (outputs exist)" in stdout
    assert _record(out, case) == before
    # another checkpoint: redone by it, and credited to it
    status, stdout, _ = run_cli(capsys, "sample", ws["b"], ws["data"] / case, out, *SAMPLE, "--skip-existing")
    assert status == 0 and "skipped" not in stdout
    _assert_all_from(out, case, by_a["b"])
    assert _record(out, case)["checkpoint"] == str(ws["b"])
    # other settings (more steps): redone
    status, stdout, _ = run_cli(capsys, "sample", ws["b"], ws["data"] / case, out, *SAMPLE, "--skip-existing",
                             "--steps", "3")
    assert status == 0 and "skipped" not in stdout and _record(out, case)["steps"] == 3


def test_skip_existing_redoes_a_case_whose_files_changed_since_its_record(ws, tmp_path, capsys):
    case, out = ws["case"], tmp_path / "out"
    assert _sample(ws, ws["a"], out) == 0
    mean = output_path(out, case, "mean")
    mean.write_bytes(output_path(out, case, "uncertainty").read_bytes())  # another file under its name
    status, stdout, _ = run_cli(capsys, "sample", ws["a"], ws["data"] / case, out, *SAMPLE, "--skip-existing")
    assert status == 0 and "skipped" not in stdout
    assert not np.array_equal(_volumes(out, case)["mean"], _volumes(out, case)["uncertainty"])


def test_a_case_rewritten_without_montage_keeps_no_montage_of_another_run(ws, tmp_path, capsys):
    case, out = ws["case"], tmp_path / "out"
    assert _sample(ws, ws["a"], out) == 0 and output_path(out, case, "montage").is_file()
    assert _sample(ws, ws["b"], out, "--no-montage") == 0
    assert not output_path(out, case, "montage").exists()  # A's montage beside B's masks would be a mixture
    assert _record(out, case)["checkpoint"] == str(ws["b"]) and "montage" not in _record(out, case)["outputs"]


# -- 10. the smaller ones -------------------------------------------------------------------------

def test_ctrl_c_while_the_command_starts_is_one_line_and_130():
    """A real SIGINT to `python -m patchddm_fast info` while it is still importing torch."""
    if not sys.platform.startswith("linux"):
        pytest.skip("watches /proc/PID/maps to know when torch is being imported")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for _ in range(3):  # a loaded machine may finish starting before the signal lands; try again
        # SIGINT as a terminal's Ctrl-C finds it: a test run started in the background (`cmd &`
        # in a script) ignores SIGINT, and a child inherits that (seen: exit 0 every time).
        process = subprocess.Popen([sys.executable, "-m", "patchddm_fast", "info"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if "libtorch" in Path(f"/proc/{process.pid}/maps").read_text():
                    break  # torch's import has begun and takes a while longer
            except OSError:
                pass
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
        if process.returncode != 0:
            break
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1 and "interrupted" in lines[0], stderr


def test_info_names_an_invalid_backend_override(capsys, monkeypatch):
    from patchddm_fast.ops import _backends

    monkeypatch.setenv("PATCHDDM_BACKEND", "bogus")
    monkeypatch.setitem(_backends._OVERRIDE, "backend", None)  # as read at import with the bad value
    status, stdout, _ = run_cli(capsys, "info")
    assert status == 0
    line = next(line for line in stdout.splitlines() if line.startswith("backend override"))
    assert "PATCHDDM_BACKEND='bogus' is invalid" in line and "cpp, cuda, triton, torch" in line
    assert "unset" not in line


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoints_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = tmp_path / "model.pt"
        save_checkpoint(UNet3D(TINY), path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_evaluate_warns_when_predictions_are_their_ground_truth(ws, predicted, tmp_path, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(predicted, pred)
    status, stdout, err = run_cli(capsys, "evaluate", pred, pred)
    assert status == 0 and "PRED_DIR and GT_DIR are the same folder" in err and "WARNING" in stdout
    # a prediction that is the ground-truth file itself (a link), in another folder
    linked = tmp_path / "linked"
    linked.mkdir()
    seg = ws["data"] / ws["case"] / f"{ws['case']}_seg.nii.gz"
    (linked / f"{ws['case']}.nii.gz").symlink_to(seg)
    status, stdout, err = run_cli(capsys, "evaluate", linked, ws["data"], "--csv", tmp_path / "e.csv")
    assert status == 0 and "very file of their ground truth" in err and ws["case"] in err
    status, stdout, err = run_cli(capsys, "evaluate", pred, ws["data"], "--csv", tmp_path / "e.csv")
    assert status == 0 and "warning" not in err.lower()
