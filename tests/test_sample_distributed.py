"""`patchddm sample` under torchrun: 2 gloo processes on the CPU share out the cases of a folder,
write what one process writes, and rank 0 writes sampling.json and carries the exit status."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchddm_fast.cli import main
from patchddm_fast.data import find_cases, write_phantoms
from patchddm_fast.inference import case_seed, output_path
from patchddm_fast.nn import UNet3D, UNetConfig, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--steps", "2", "--ensemble", "2", "--seed", "7", "-q", "--device", "cpu", "--no-montage"]
KINDS = ("mask", "mean", "uncertainty")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Three 17x16x16 phantoms and an untrained 4-channel network on an 18^3 volume grid."""
    root = tmp_path_factory.mktemp("sample_ddp")
    write_phantoms(root / "data", n=3, shape=(17, 16, 16), seed=2)
    torch.manual_seed(3)
    network = UNet3D(UNetConfig(model_channels=4, channel_mult=(1, 2), num_res_blocks=1))
    save_checkpoint(network, root / "tiny.pt", volume_shape=[18, 18, 18], patch_shape=[16, 16, 16])
    return root


def torchrun_sample(checkpoint, data, out, *extra) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m patchddm_fast sample ...`, one thread per process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "patchddm_fast", "sample", str(checkpoint), str(data), str(out), *ARGS, *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=out.parent, timeout=600)


def case_records(folder: Path) -> dict:
    """sampling.json's records without the time each case took."""
    log = json.loads((folder / "sampling.json").read_text())["cases"]
    return {case: {k: v for k, v in entry.items() if k != "seconds"} for case, entry in log.items()}


def test_two_processes_write_what_one_process_writes(workspace):
    data, checkpoint = workspace / "data", workspace / "tiny.pt"
    run = torchrun_sample(checkpoint, data, workspace / "two")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun process
    try:
        assert main(["sample", str(checkpoint), str(data), str(workspace / "one"), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)

    cases = [c.case_id for c in find_cases(data)[0]]
    assert len(cases) == 3
    assert "on 2 processes" in run.stdout and run.stdout.count("3 case(s) written") == 1  # rank 0 reports
    for case in cases:
        assert run.stdout.count(f"{case}: done") == 1, run.stdout  # sampled by one process only
        for kind in KINDS:
            # The seed depends on the run's seed and the case only: the same arithmetic, the
            # same files byte for byte.
            assert output_path(workspace / "two", case, kind).read_bytes() == \
                output_path(workspace / "one", case, kind).read_bytes(), (case, kind)
    names = [sorted(p.name for p in (workspace / folder).iterdir()) for folder in ("two", "one")]
    assert names[0] == names[1]
    records = case_records(workspace / "two")
    assert sorted(records) == sorted(cases)
    assert all(records[case]["status"] == "ok" and records[case]["case_seed"] == case_seed(7, case) for case in cases)
    assert records == case_records(workspace / "one")

    # --skip-existing as with one process: each process skips its own cases, rank 0 counts them all.
    stamps = {p.name: p.stat().st_mtime_ns for p in (workspace / "two").glob("*.nii.gz")}
    again = torchrun_sample(checkpoint, data, workspace / "two", "--skip-existing")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "0 case(s) written" in again.stdout and "3 skipped" in again.stdout
    assert all(again.stdout.count(f"{case}: skipped (outputs exist)") == 1 for case in cases)
    assert {p.name: p.stat().st_mtime_ns for p in (workspace / "two").glob("*.nii.gz")} == stamps


def test_a_case_failing_on_the_other_process_fails_the_run(workspace, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    first, bad, third = [c.case_id for c in find_cases(data)[0]]  # case 2 of 3 is rank 1's
    t1 = data / bad / f"{bad}_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[: len(t1.read_bytes()) // 2])  # a truncated download
    out = tmp_path / "out"
    run = torchrun_sample(workspace / "tiny.pt", data, out)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"[2/3] {bad}: FAILED:" in run.stdout  # rank 1's own line
    assert run.stdout.count("2 case(s) written") == 1 and "1 FAILED:" in run.stdout
    assert f"\n  {bad}: " in run.stdout  # rank 0's summary names it
    statuses = {case: entry["status"] for case, entry in case_records(out).items()}
    assert statuses == {first: "ok", bad: "failed", third: "ok"}
    for case in (first, third):
        assert all(output_path(out, case, kind).exists() for kind in KINDS)
    assert not any(output_path(out, bad, kind).exists() for kind in KINDS)
