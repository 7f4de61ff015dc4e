"""The `patchddm` command end to end on tiny phantoms with a tiny network (2 sampling steps).

Commands run in-process through cli.main(argv) (its exit status is checked, as scripts would);
one test runs `python -m patchddm_fast` as a real subprocess.
"""

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from patchddm_fast.cli import main
from patchddm_fast.data import find_cases, write_phantoms
from patchddm_fast.inference import SamplingSettings, Segmenter, case_seed, load_model, output_path
from patchddm_fast.metrics import dice
from patchddm_fast.nn import UNet3D, UNetConfig, save_checkpoint

TINY = UNetConfig(model_channels=4, channel_mult=(1, 2), num_res_blocks=1)
PHANTOM_SHAPE = (17, 16, 16)  # not the volume grid: outputs must come back to this grid
VOLUME = [18, 18, 18]
SAMPLE_ARGS = ["--steps", "2", "--ensemble", "2", "--seed", "0", "-q", "--device", "cpu"]
NIFTI_OUTPUTS = ("mask", "mean", "uncertainty")


def _tiny_checkpoint(path, config=TINY, seed=0, **extra):
    torch.manual_seed(seed)
    model = UNet3D(config)
    save_checkpoint(model, path, **({"volume_shape": VOLUME, "patch_shape": [16, 16, 16]} | extra))
    return model


def _partials(folder: Path):
    return [p for p in folder.rglob("*") if "partial" in p.name or p.name.endswith(".tmp")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tiny convolutions gain nothing from more, and on a shared
    machine OpenMP threads waiting for each other make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    write_phantoms(data, n=3, shape=PHANTOM_SHAPE, seed=1)
    checkpoint = root / "tiny.pt"
    _tiny_checkpoint(checkpoint)
    return root, data, checkpoint


@pytest.fixture(scope="module")
def sampled(workspace):
    """One `patchddm sample` run over the three phantoms, shared by the tests that read it."""
    root, data, checkpoint = workspace
    out = root / "pred"
    status = main(["sample", str(checkpoint), str(data), str(out), *SAMPLE_ARGS])
    assert status == 0
    return out


def _case_ids(data):
    return [c.case_id for c in find_cases(data)[0]]


# -- sample -----------------------------------------------------------------------------------

def test_sample_writes_each_case_on_its_original_grid(workspace, sampled):
    root, data, checkpoint = workspace
    cases = find_cases(data)[0]
    assert len(cases) == 3
    for case in cases:
        reference = nib.load(case.files["t1"])
        volumes = {}
        for kind in NIFTI_OUTPUTS:
            image = nib.load(output_path(sampled, case.case_id, kind))
            assert image.shape == PHANTOM_SHAPE
            # Both through a float32 NIfTI sform: numpy's default rtol 1e-7, about 1 ulp.
            np.testing.assert_allclose(image.affine, reference.affine)
            assert image.header.get_zooms()[:3] == reference.header.get_zooms()[:3]
            volumes[kind] = np.asarray(image.dataobj)
        assert volumes["mask"].dtype == np.uint8 and set(np.unique(volumes["mask"])) <= {0, 1}
        np.testing.assert_array_equal(volumes["mask"], volumes["mean"] > 0.5)
        assert volumes["uncertainty"].dtype == np.float32 and volumes["uncertainty"].min() >= 0
        png = matplotlib.image.imread(output_path(sampled, case.case_id, "montage"))
        assert png.ndim == 3 and png.shape[0] > 100
    log = json.loads((sampled / "sampling.json").read_text())["cases"]
    assert sorted(log) == sorted(c.case_id for c in cases)
    assert all(entry["status"] == "ok" and entry["steps"] == 2 and entry["ensemble"] == 2 for entry in log.values())
    assert not _partials(sampled)

    # The written mean is the sampler's, mapped back to the case grid: recompute one case directly.
    case = cases[1]
    segmenter = Segmenter(load_model(checkpoint), SamplingSettings(steps=2, ensemble=2, seed=0), progress=False)
    prepared = segmenter.prepare(case)
    assert tuple(prepared.image.shape[1:]) == tuple(VOLUME)
    result = segmenter.segment(prepared, seed=case_seed(0, case.case_id))
    written = np.asarray(nib.load(output_path(sampled, case.case_id, "mean")).dataobj)
    # The file stores float32; values in [-1, 1]: a few ulps.
    np.testing.assert_allclose(written, prepared.meta.to_original(result.mean.numpy()), atol=1e-6)
    assert log[case.case_id]["case_seed"] == case_seed(0, case.case_id)


def test_sample_reports_bad_cases_and_keeps_other_outputs(workspace, sampled, tmp_path, capsys):
    root, data, checkpoint = workspace
    good, no_flair, corrupt = _case_ids(data)
    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    os.remove(bad_data / no_flair / f"{no_flair}_flair.nii.gz")
    t1 = bad_data / corrupt / f"{corrupt}_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[: len(t1.read_bytes()) // 2])  # a truncated download
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "Earlier_001_mask.nii.gz"
    shutil.copy(output_path(sampled, good, "mask"), earlier)
    before = earlier.read_bytes()

    status, stdout, _ = run_cli(capsys, "sample", checkpoint, bad_data, out, *SAMPLE_ARGS, "--no-montage")
    assert status == 1
    assert f"{no_flair}: FAILED: missing flair" in stdout
    assert f"{corrupt}: FAILED:" in stdout and f"{corrupt}_t1.nii.gz" in stdout
    assert "1 case(s) written" in stdout and "2 FAILED" in stdout
    assert earlier.read_bytes() == before
    for kind in NIFTI_OUTPUTS:
        assert nib.load(output_path(out, good, kind)).shape == PHANTOM_SHAPE
        assert not output_path(out, no_flair, kind).exists() and not output_path(out, corrupt, kind).exists()
    statuses = {k: v["status"] for k, v in json.loads((out / "sampling.json").read_text())["cases"].items()}
    assert statuses == {good: "ok", corrupt: "failed"}  # a case with a file missing is never sampled
    assert not _partials(out)


def test_sample_interrupted_keeps_finished_cases(workspace, tmp_path, capsys, monkeypatch):
    root, data, checkpoint = workspace
    first, second, _ = _case_ids(data)
    original = Segmenter.segment

    def segment(self, prepared, **kwargs):
        if prepared.case_id == second:
            raise KeyboardInterrupt
        return original(self, prepared, **kwargs)

    monkeypatch.setattr(Segmenter, "segment", segment)
    out = tmp_path / "out"
    status, _, err = run_cli(capsys, "sample", checkpoint, data, out, *SAMPLE_ARGS, "--no-montage")
    assert status == 130 and "interrupted" in err
    assert all(nib.load(output_path(out, first, kind)).shape == PHANTOM_SHAPE for kind in NIFTI_OUTPUTS)
    assert not any(output_path(out, second, kind).exists() for kind in NIFTI_OUTPUTS)
    assert list(json.loads((out / "sampling.json").read_text())["cases"]) == [first]
    assert not _partials(out)


def test_sample_one_case_folder_and_skip_existing(workspace, tmp_path, capsys):
    """INPUT may be one case folder; OUTPUT may lie inside INPUT (it is not taken for a case)."""
    root, data, checkpoint = workspace
    case = _case_ids(data)[0]
    shutil.copytree(data / case, tmp_path / case)
    out = tmp_path / case / "predictions"
    status, stdout, _ = run_cli(capsys, "sample", checkpoint, tmp_path / case, out, *SAMPLE_ARGS, "--no-montage")
    assert status == 0 and "1 case(s) written" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [output_path(out, case, kind).name for kind in NIFTI_OUTPUTS] + ["sampling.json"])
    stamp = output_path(out, case, "mask").stat().st_mtime_ns
    status, stdout, _ = run_cli(capsys, "sample", checkpoint, tmp_path / case, out, *SAMPLE_ARGS, "--no-montage",
                             "--skip-existing")
    assert status == 0 and "skipped (outputs exist)" in stdout and "FAILED" not in stdout
    assert output_path(out, case, "mask").stat().st_mtime_ns == stamp


def _bad_checkpoints(folder: Path) -> dict:
    """name -> (path, fragment the error message must contain)."""
    wrong = folder / "wrong_channels.pt"
    _tiny_checkpoint(wrong, TINY.replace(in_channels=5))
    bare = folder / "bare_state_dict.pt"
    torch.save(UNet3D(TINY).state_dict(), bare)
    garbage = folder / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    tampered = folder / "tampered.pt"
    _tiny_checkpoint(tampered)
    payload = torch.load(tampered, weights_only=True)
    payload["config"]["model_channels"] = 8
    payload["config"]["groups"] = 8
    torch.save(payload, tampered)
    return {"missing": (folder / "nope.pt", "no such checkpoint file"), "wrong architecture": (wrong, "8 in"),
            "bare state_dict": (bare, "patchddm import-checkpoint"), "not a checkpoint": (garbage, "garbage.pt"),
            "weights do not fit": (tampered, "mis-shaped")}


def test_sample_input_errors_are_one_line(workspace, tmp_path, capsys):
    root, data, checkpoint = workspace
    out = tmp_path / "out"
    for name, (path, fragment) in _bad_checkpoints(tmp_path).items():
        status, _, err = run_cli(capsys, "sample", path, data, out, *SAMPLE_ARGS)
        assert status == 2, name
        assert_one_line_error(err, fragment)
    status, _, err = run_cli(capsys, "sample", checkpoint, tmp_path / "no_such_data", out, *SAMPLE_ARGS)
    assert status == 2
    assert_one_line_error(err, "no_such_data: no such folder")
    status, _, err = run_cli(capsys, "sample", checkpoint, data, out, *SAMPLE_ARGS[:-2], "--device", "tpu")
    assert status == 2
    assert_one_line_error(err, "tpu")
    assert not out.exists()  # nothing is created before the run can start
    # usage errors: argparse's message and status 2
    assert run_cli(capsys, "sample", checkpoint, data, out, "--steps", "0")[0] == 2
    assert run_cli(capsys, "sample", checkpoint)[0] == 2
    assert run_cli(capsys)[0] == 2
    assert run_cli(capsys, "sample", "--help")[0] == 0


# -- evaluate and sweep -----------------------------------------------------------------------

def test_evaluate_command(workspace, sampled, tmp_path, capsys):
    root, data, checkpoint = workspace
    status, stdout, _ = run_cli(capsys, "evaluate", sampled, data, "-q")
    assert status == 0 and "median" in stdout
    rows = list(csv.DictReader(open(sampled / "evaluation.csv")))
    cases = find_cases(data)[0]
    assert [r["case"] for r in rows] == [c.case_id for c in cases] + ["mean", "std", "median"]
    for row, case in zip(rows, cases):
        truth = np.asarray(nib.load(case.files["seg"]).dataobj) > 0
        predicted = np.asarray(nib.load(output_path(sampled, case.case_id, "mask")).dataobj) > 0
        assert float(row["dice"]) == pytest.approx(dice(predicted, truth), abs=1e-6)

    # one unreadable prediction: that case fails (status 1), the others are scored
    broken = tmp_path / "pred"
    shutil.copytree(sampled, broken)
    victim = cases[0].case_id
    output_path(broken, victim, "mask").write_bytes(gzip.compress(b"garbage"))
    status, stdout, _ = run_cli(capsys, "evaluate", broken, data, "-q", "--csv", tmp_path / "e.csv")
    assert status == 1 and f"{victim}" in stdout and "FAILED" in stdout
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "e.csv"))}
    assert rows[victim]["error"] and rows[cases[1].case_id]["dice"] != "nan"

    status, _, err = run_cli(capsys, "evaluate", tmp_path / "missing", data)
    assert status == 2
    assert_one_line_error(err, "no such folder")


def test_sweep_matches_sample(workspace, sampled, tmp_path, capsys):
    """The sweep's (2 steps, ensemble 2) ensembles are those of `patchddm sample --steps 2
    --ensemble 2` with the same seed, so their scores agree case by case."""
    root, data, checkpoint = workspace
    out = tmp_path / "sweep"
    status, stdout, _ = run_cli(capsys, "sweep", checkpoint, data, out, "--steps", "1", "2", "--ensemble", "1", "2",
                             "--max-cases", "2", "--seed", "0", "-q", "--device", "cpu")
    assert status == 0, stdout
    rows = list(csv.DictReader(open(out / "sweep_cases.csv")))
    assert len(rows) == 2 * 2 * 2
    summary = list(csv.DictReader(open(out / "sweep_summary.csv")))
    assert [(int(r["steps"]), int(r["ensemble"])) for r in summary] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    png = matplotlib.image.imread(out / "sweep.png")
    assert png.ndim == 3
    run_cli(capsys, "evaluate", sampled, data, "-q", "--csv", tmp_path / "eval.csv")
    evaluated = {r["case"]: float(r["dice"]) for r in csv.DictReader(open(tmp_path / "eval.csv"))}
    for row in rows:
        if row["steps"] == "2" and row["ensemble"] == "2":
            assert float(row["dice"]) == pytest.approx(evaluated[row["case"]], abs=1e-6)


# -- phantoms, info, import-checkpoint ---------------------------------------------------------

def test_phantoms_and_info(tmp_path, capsys):
    status, stdout, _ = run_cli(capsys, "phantoms", tmp_path / "ph", "--n", "2", "--size", "16", "--seed", "3", "-q")
    assert status == 0 and "2 phantom case(s)" in stdout
    cases, report = find_cases(tmp_path / "ph")
    assert len(cases) == 2 and not report.problems
    assert nib.load(cases[0].files["flair"]).shape == (16, 16, 16)
    status, _, err = run_cli(capsys, "phantoms", tmp_path / "small", "--size", "8")
    assert status == 2
    assert_one_line_error(err, "at least 16")
    status, stdout, _ = run_cli(capsys, "info")
    assert status == 0 and "patchddm_fast" in stdout and "torch" in stdout
    from patchddm_fast.nn.conv import conv_status

    assert f"3x3x3 convolutions: {conv_status()}" in stdout


def test_import_checkpoint(tmp_path, capsys):
    torch.manual_seed(3)
    original = UNet3D(TINY.replace(groups=2), fused=False)
    state = {f"module.{k}": v for k, v in original.state_dict().items()}  # as DDP saves it
    torch.save(state, tmp_path / "savedmodel.pt")
    out = tmp_path / "converted.pt"
    status, stdout, _ = run_cli(capsys, "import-checkpoint", tmp_path / "savedmodel.pt", out, "--groups", "2",
                             "--volume", "32", "--patch", "16", "-q")
    assert status == 0 and "written to" in stdout
    loaded = load_model(out)
    assert loaded.volume_shape == (32, 32, 32) and loaded.patch_shape == (16, 16, 16)
    assert loaded.model.config.groups == 2
    for name, tensor in original.state_dict().items():
        # Import copies tensors: exact.
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)
    status, _, err = run_cli(capsys, "import-checkpoint", tmp_path / "savedmodel.pt", out)
    assert status == 2
    assert_one_line_error(err, "--force")
    (tmp_path / "notes.pt").write_text("hello")
    status, _, err = run_cli(capsys, "import-checkpoint", tmp_path / "notes.pt", tmp_path / "x.pt")
    assert status == 2
    assert_one_line_error(err, "notes.pt")
    assert not (tmp_path / "x.pt").exists()


def test_python_dash_m_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-m", "patchddm_fast", "phantoms", str(tmp_path / "ph"), "--n", "1",
                           "--size", "16", "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 phantom case(s)" in done.stdout
    assert len(list((tmp_path / "ph" / "Phantom_001").glob("*.nii.gz"))) == 5


# -- train and demo (through patchddm_fast.train) ----------------------------------------------

TINY_TRAIN = ["--steps", "2", "--batch-size", "1", "--patch", "16", "--width", "4", "--num-workers", "0",
              "--save-every", "1", "--device", "cpu", "-q"]


def test_train_command(workspace, tmp_path, capsys):
    root, data, checkpoint = workspace
    out = tmp_path / "run"
    status, stdout, _ = run_cli(capsys, "train", data, out, *TINY_TRAIN)
    assert status == 0, stdout
    assert "steps: 2" in stdout
    loaded = load_model(out / "last.pt")
    assert loaded.patch_shape == (16, 16, 16) and loaded.volume_shape == (32, 32, 32)  # 17 -> 32: from the data
    assert loaded.model.config.model_channels == 4
    status, _, err = run_cli(capsys, "train", data, tmp_path / "bad", *TINY_TRAIN[:4], "--patch", "12")
    assert status == 2
    assert_one_line_error(err, "invalid training settings", "patch")
    status, _, err = run_cli(capsys, "train", tmp_path / "nothing", tmp_path / "bad", *TINY_TRAIN)
    assert status == 2
    assert_one_line_error(err, "nothing")


def test_demo_command(tmp_path, capsys, monkeypatch):
    """`patchddm demo --quick` end to end, with the quick recipe shrunk to seconds."""
    import patchddm_fast.demo as demo

    monkeypatch.setattr(demo, "quick_recipe", lambda recipe: recipe.replace(
        cases=3, size=16, patch=16, width=4, steps=2, batch_size=1, warmup_steps=0, sample_steps=1, ensemble=2))
    out = tmp_path / "demo"
    status, stdout, _ = run_cli(capsys, "demo", "--quick", "--out", out, "--device", "cpu", "-q")
    assert status == 0, stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("mean Dice ")
    rows = {r["case"]: r for r in csv.DictReader(open(out / "evaluation.csv"))}
    assert float(last.split()[-1]) == pytest.approx(float(rows["mean"]["dice"]), abs=1e-4)
    held_out = [case for case in rows if case not in ("mean", "std", "median")]
    assert len(held_out) == 2  # the split of 3 cases holds out one validation and one test case
    assert (out / "train" / "last.pt").is_file()
    for case in held_out:
        assert nib.load(output_path(out / "predictions", case, "mask")).shape == (16, 16, 16)
        assert matplotlib.image.imread(output_path(out / "predictions", case, "montage")).ndim == 3


def test_demo_on_a_data_folder_reports_the_baseline(tmp_path, capsys, monkeypatch):
    """`patchddm demo --data DIR` trains on DIR's training part, scores its held-out part and
    prints the FLAIR baseline on the same cases before the mean Dice."""
    import patchddm_fast.demo as demo

    monkeypatch.setattr(demo, "quick_recipe", lambda recipe: recipe.replace(
        patch=16, width=4, steps=2, batch_size=1, warmup_steps=0, sample_steps=1, ensemble=1))
    data = tmp_path / "mine"
    write_phantoms(data, n=10, shape=(16, 16, 16), seed=5)
    out = tmp_path / "demo"
    status, stdout, _ = run_cli(capsys, "demo", "--quick", "--data", data, "--out", out, "--device", "cpu", "-q")
    assert status == 0, stdout
    assert not (out / "data").exists()  # no phantoms written: the user's folder is used
    split = json.loads((out / "train" / "split.json").read_text())
    scored = {r["case"] for r in csv.DictReader(open(out / "evaluation.csv"))} - {"mean", "std", "median"}
    assert scored == set(split["validation"] + split["test"]) and not scored & set(split["train"])
    baseline, last = stdout.strip().splitlines()[-2:]
    assert baseline.startswith("FLAIR threshold baseline on the same cases: mean Dice ")
    assert last.startswith("mean Dice ")
    status, _, err = run_cli(capsys, "demo", "--quick", "--data", tmp_path / "none", "--out", tmp_path / "d2")
    assert status == 2
    assert_one_line_error(err, "no such folder")


def test_sample_held_out_subset_and_evaluate_baseline(tmp_path, capsys):
    data = tmp_path / "data"
    write_phantoms(data, n=10, shape=(16, 16, 16), seed=6)
    checkpoint = tmp_path / "tiny.pt"
    _tiny_checkpoint(checkpoint, volume_shape=[16, 16, 16])
    out = tmp_path / "pred"
    status, stdout, _ = run_cli(capsys, "sample", checkpoint, data, out, *SAMPLE_ARGS, "--subset", "held-out",
                             "--no-montage")
    assert status == 0, stdout
    cases, _ = find_cases(data)
    from patchddm_fast.data import subset_cases
    held_out = {c.case_id for c in subset_cases(cases, "held-out")}
    written = {p.name.removesuffix("_mask.nii.gz") for p in out.glob("*_mask.nii.gz")}
    assert written == held_out and len(written) == 2
    status, stdout, _ = run_cli(capsys, "evaluate", out, data, "-q", "--baseline")
    assert status == 0, stdout
    table = stdout[stdout.index("FLAIR baseline"):].splitlines()
    assert {line.split()[0] for line in table[3:5]} == held_out and table[-1].startswith("mean")
    # Ground truth as flat <case>_seg.nii.gz files: scores work, but there is no FLAIR to fit on.
    flat = tmp_path / "flat"
    flat.mkdir()
    for seg in data.glob("*/*_seg.nii.gz"):
        shutil.copy(seg, flat / seg.name)
    status, _, err = run_cli(capsys, "evaluate", out, flat, "--baseline", "-q")
    assert status == 2
    assert_one_line_error(err, "--baseline", "no training case")
