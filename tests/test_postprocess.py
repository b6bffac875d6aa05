"""Largest-component postprocessing decided from Dice sums (fedseg.training.postprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedseg.training.postprocess import (
    DiceSums,
    Postprocessing,
    decide,
    keep_largest_component,
    variant_dice,
)

GROUPS = {"1": [1], "2": [2]}


def test_keep_largest_component_full_connectivity_and_copy() -> None:
    seg = np.zeros((1, 12, 12), dtype=np.int16)
    seg[0, 1:5, 1:5] = 1          # 16 voxels
    seg[0, 5, 5] = 1              # touches the square only diagonally: same component
    seg[0, 9:11, 9:11] = 1        # 4 voxels, separate
    seg[0, 9:11, 1:3] = 2         # another label: untouched by a step on label 1
    out = keep_largest_component(seg, [1])
    assert out[0, 5, 5] == 1 and out[0, 1:5, 1:5].all()
    assert (out[0, 9:11, 9:11] == 0).all()
    assert (out[0, 9:11, 1:3] == 2).all()
    assert (seg[0, 9:11, 9:11] == 1).all()  # input unchanged


def _case(rng: np.random.Generator, fp_blob: bool, two_ref_parts: bool) -> tuple[np.ndarray, ...]:
    """Reference: class 1 a square with class 2 nested inside (disc and cup), optionally a true
    second class-2 part far away; prediction: the reference shifted by one voxel, optionally with
    a false class-1 blob far away."""
    ref = np.zeros((24, 24), dtype=np.int16)
    o = int(rng.integers(2, 5))
    ref[o:o + 10, o:o + 10] = 1
    ref[o + 3:o + 7, o + 3:o + 7] = 2
    if two_ref_parts:
        ref[18:21, 18:21] = 2
    pred = np.roll(ref, 1, axis=0)
    if fp_blob:
        pred[20:23, 2:5] = 1
    return pred[None], ref[None]


def test_decision_follows_nnunet_rules_and_sums_add_across_sites() -> None:
    rng = np.random.default_rng(0)
    # class 1 has false blobs (removing them helps); class 2 is truly in two parts (keeping only
    # the largest hurts it), so "all foreground" is refused: it makes class 2 worse
    cases = [_case(rng, fp_blob=True, two_ref_parts=True) for _ in range(6)]
    site_a, site_b, pooled = (DiceSums.empty(GROUPS) for _ in range(3))
    for i, (pred, ref) in enumerate(cases):
        d = variant_dice(pred, ref, GROUPS)
        (site_a if i < 2 else site_b).add(d)
        pooled.add(d)
    summed = DiceSums.from_vector(GROUPS, site_a.to_vector() + site_b.to_vector())
    assert np.allclose(summed.to_vector(), pooled.to_vector(), rtol=0, atol=1e-12)
    pp, report = decide(summed, GROUPS)
    assert report["foreground"]["applied"] is False
    assert report["classes"]["1"]["applied"] is True
    assert report["classes"]["2"]["applied"] is False
    assert pp == Postprocessing(keep_largest=[[1]])
    pred, ref = cases[0]
    assert not (pp.apply(pred)[0, 20:23, 2:5]).any()


def test_foreground_step_when_it_helps_and_harms_no_class() -> None:
    rng = np.random.default_rng(1)
    sums = DiceSums.empty(GROUPS)
    for _ in range(4):
        pred, ref = _case(rng, fp_blob=False, two_ref_parts=False)
        pred = pred.copy()
        pred[0, 0:2, 20:23] = 2  # a false class-2 blob, away from everything
        sums.add(variant_dice(pred, ref, GROUPS))
    pp, report = decide(sums, GROUPS)
    assert report["foreground"]["applied"] is True
    assert report["foreground"]["after"] > report["foreground"]["before"]
    assert pp.keep_largest[0] == [1, 2]


def test_nothing_chosen_when_nothing_helps() -> None:
    rng = np.random.default_rng(2)
    sums = DiceSums.empty(GROUPS)
    for _ in range(3):
        sums.add(variant_dice(*_case(rng, fp_blob=False, two_ref_parts=False), GROUPS))
    pp, _ = decide(sums, GROUPS)
    assert pp.keep_largest == []


def test_vector_length_is_checked() -> None:
    with pytest.raises(ValueError, match="expected"):
        DiceSums.from_vector(GROUPS, np.zeros(3))


def test_decided_on_validation_files_and_applied_to_test_predictions(tmp_path: Path) -> None:
    """Real files: a tiny 2D region model is trained, its postprocessing decided on the site's
    validation fifth (the sums equal the candidates' Dice recomputed from the written
    predictions) and applied to test predictions through the scorer."""
    from inprocess_cli import fedseg
    from scipy import ndimage
    from test_regions_2d import fundus_site

    from fedseg.data.io import read_image
    from fedseg.training.postprocess_eval import decide_on_validation
    from fedseg.training.test_split import score_sites

    site = fundus_site(tmp_path / "site", n_train=10)
    fedseg("plan", str(site), "--out", str(tmp_path / "plan.json"), "--preset", "tiny")
    model = tmp_path / "model"
    res = fedseg("train", "--data", str(site), "--plan", str(tmp_path / "plan.json"),
                 "--iterations", "4", "--out", str(model), "--cache", str(tmp_path / "cache"),
                 "--device", "cpu")
    assert res.returncode == 0, res.stderr

    dec = decide_on_validation(model, [site], tmp_path / "work", device="cpu")
    groups = {"1,2": [1, 2], "2": [2]}
    preds = sorted((tmp_path / "work" / "validation" / "site").glob("*.png"))
    assert dec["validation_cases"] == len(preds) == 2  # 1 in 5 of 10 training cases
    again = DiceSums.empty(groups)
    for p in preds:
        again.add(variant_dice(read_image(p).data[0],
                               read_image(site / "labelsTr" / p.name).data[0], groups))
    assert json.dumps(decide(again, groups)[1]) == json.dumps(dec["decision"])  # NaN-safe

    forced = Postprocessing(keep_largest=[[1, 2]])
    score_sites(model, [site], tmp_path / "scored", device="cpu", keep_predictions=True,
                postprocessing=forced)
    for p in sorted((tmp_path / "scored" / "predictions" / "site").glob("*.png")):
        fg = read_image(p).data[0] > 0
        assert ndimage.label(fg, structure=np.ones((3,) * fg.ndim))[1] <= 1, p
