"""The FLAIR-threshold baseline: fitted on training cases, scored on others, shown beside a model."""

import numpy as np
import pytest

from patchddm_fast.baseline import FlairThreshold, baseline_for, format_comparison, largest_component
from patchddm_fast.data import find_cases, subset_cases, write_phantoms


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, n=10, shape=(32, 32, 32), seed=3, progress=False)
    return folder


def test_largest_component_keeps_the_biggest_blob():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:4, 1:4, 1:4] = True   # 27 voxels
    mask[6:8, 6:8, 6:8] = True   # 8 voxels, not touching
    kept = largest_component(mask)
    assert kept.sum() == 27 and kept[2, 2, 2] and not kept[7, 7, 7]
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_fit_picks_the_best_candidate_on_the_training_cases(phantoms):
    cases, _ = find_cases(phantoms, with_label=True)
    training = subset_cases(cases, "train")
    rule = FlairThreshold.fit(training)
    scores = rule.score(training)
    # The chosen threshold is at least as good as any other candidate on the same cases.
    for other in (0.3, 0.5, 0.9):
        assert np.mean(list(scores.values())) >= np.mean(list(FlairThreshold(other).score(training).values()))
    held_out = rule.score(subset_cases(cases, "held-out"))
    assert len(held_out) == 2 and all(0 <= v <= 1 for v in held_out.values())


def test_baseline_for_never_fits_on_the_scored_cases(phantoms, monkeypatch):
    cases, _ = find_cases(phantoms, with_label=True)
    scored = [c.case_id for c in subset_cases(cases, "held-out")] + [subset_cases(cases, "train")[0].case_id]
    fitted_on = []
    original = FlairThreshold.fit.__func__
    monkeypatch.setattr(FlairThreshold, "fit", classmethod(
        lambda cls, cases, **kw: fitted_on.extend(c.case_id for c in cases) or original(cls, cases, **kw)))
    rule, scores = baseline_for(phantoms, scored)
    assert set(scores) == set(scored) and not set(fitted_on) & set(scored)
    table = format_comparison({k: 0.5 for k in scored}, scores, rule.threshold)
    assert table.splitlines()[-1].split()[:2] == ["mean", "0.5000"]


def test_a_case_without_segmentation_is_refused(tmp_path):
    write_phantoms(tmp_path, n=1, shape=(24, 24, 24), seed=0, progress=False)
    (case,), _ = find_cases(tmp_path, with_label=True)
    for seg in case.folder.glob("*seg*"):
        seg.unlink()
    (case,), _ = find_cases(tmp_path, with_label=False)
    with pytest.raises(ValueError, match="needs the case's segmentation"):
        FlairThreshold(0.5).score([case])
