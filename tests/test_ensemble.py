"""Issue #14 point 2: ensembles. Two tiny models trained here (a 3d_fullres and a 2d one, as
nnU-Net ensembles configurations) are bundled with ``fedseg ensemble``; ``fedseg predict -m``
with the ensemble writes the argmax of the MEAN of the two models' probabilities (checked
numerically), and members that do not predict the same labels from the same channels are
refused with one line naming the member."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from inprocess_cli import fedseg

LABELS = {"background": 0, "organ": 1, "lesion": 2}
SHAPE = (26, 22, 10)  # nibabel order; coarse along k
ZOOMS = (0.9, 0.9, 2.0)


def _write_case(root: Path, split: str, name: str, rng: np.random.Generator) -> None:
    """A body (zero outside: cropping matters) holding an organ with a darker lesion."""
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    c = rng.uniform(-0.15, 0.15, size=3)
    body = (ii / 0.85) ** 2 + (jj / 0.8) ** 2 + (kk / 0.9) ** 2 < 1
    organ = ((ii - c[0]) / 0.5) ** 2 + ((jj - c[1]) / 0.45) ** 2 + ((kk - c[2]) / 0.6) ** 2 < 1
    lesion = ((ii - c[0] - 0.15) / 0.2) ** 2 + ((jj - c[1]) / 0.2) ** 2 + (kk / 0.4) ** 2 < 1
    lab = np.zeros(SHAPE, np.uint8)
    lab[organ & body] = 1
    lab[lesion & organ & body] = 2
    img = np.where(body, 100 + 80 * (lab == 1) + 30 * (lab == 2) + rng.normal(0, 8, SHAPE), 0)
    aff = np.diag([*ZOOMS, 1.0])
    aff[:3, 3] = [-10.0, 4.0, 2.5]
    for d in (f"images{split}", f"labels{split}"):
        (root / d).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img.astype(np.float32), aff),
             str(root / f"images{split}" / f"{name}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(root / f"labels{split}" / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny dataset, its plan, and two models trained on it: 3d_fullres and 2d."""
    root = tmp_path_factory.mktemp("ensemble")
    site = root / "site"
    rng = np.random.default_rng(14)
    for i in range(3):
        _write_case(site, "Tr", f"c{i}", rng)
    for i in range(2):
        _write_case(site, "Ts", f"t{i}", rng)
    (site / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": LABELS, "file_ending": ".nii.gz",
        "numTraining": 3}))
    plan = root / "plan.json"
    res = fedseg("plan", str(site), "--out", str(plan), "--preset", "tiny")
    assert res.returncode == 0, res.stderr
    out = {"site": site, "root": root}
    for config in ("3d_fullres", "2d"):
        model = root / f"model_{config}"
        res = fedseg("train", "--data", str(site), "--plan", str(plan), "--iterations", "3",
                     "--out", str(model), "--cache", str(root / "cache"), "--device", "cpu",
                     "--configuration", config, "--seed", "1")
        assert res.returncode == 0, res.stderr
        assert json.loads((model / "bundle.json").read_text())["config"] == config
        out[config] = model
    return out


def test_ensemble_predicts_the_mean_of_its_members_probabilities(
    models: dict[str, Path], tmp_path: Path,
) -> None:
    from fedseg.data.dataset import load_image
    from fedseg.training.ensemble_predict import case_probabilities

    ens = tmp_path / "ens"
    res = fedseg("ensemble", str(models["3d_fullres"]), str(models["2d"]), "--out", str(ens),
                 "--names", "full,flat")
    assert res.returncode == 0, res.stderr
    info = json.loads((ens / "bundle.json").read_text())
    assert info["kind"] == "ensemble"
    assert [(m["name"], m["config"]) for m in info["members"]] == [("full", "3d_fullres"),
                                                                    ("flat", "2d")]
    for name in ("full", "flat"):  # ordinary bundles, no training checkpoint copied
        assert sorted(p.name for p in (ens / "members" / name).iterdir()) == [
            "bundle.json", "dataset.json", "model.pt", "plan.json"]

    ts = models["site"] / "imagesTs"
    pred = tmp_path / "pred"
    res = fedseg("predict", "-m", str(ens), "-i", str(ts), "-o", str(pred), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("predict: ")]
    assert "ensemble of 2 models" in lines[0] and "[2d]" in lines[0]
    assert [ln.split(" (")[0] for ln in lines[1:]] == ["predict: 1/2 cases, t0",
                                                      "predict: 2/2 cases, t1"]

    p3d = case_probabilities([models["3d_fullres"]], ts, device="cpu")
    p2d = case_probabilities([models["2d"]], ts, device="cpu")
    pens = case_probabilities([ens], ts, device="cpu")
    assert sorted(pens) == ["t0", "t1"]
    for case in ("t0", "t1"):
        mean = (p3d[case] + p2d[case]) / 2
        assert pens[case].shape == (3, *SHAPE[::-1])  # nnU-Net order, original grid
        np.testing.assert_allclose(pens[case], mean, rtol=0, atol=1e-6)
        np.testing.assert_allclose(pens[case].sum(0), 1.0, atol=1e-5)
        assert not np.allclose(p3d[case], p2d[case], atol=1e-3)  # the mean is not trivial
        written, _, _ = load_image(pred / f"{case}.nii.gz")
        assert np.array_equal(written[0], mean.argmax(0))  # label values 0, 1, 2 = channels
        assert nib.load(str(pred / f"{case}.nii.gz")).shape == SHAPE

    # the same members passed as two -m bundles: the same segmentation
    pred2 = tmp_path / "pred2"
    res = fedseg("predict", "-m", str(models["3d_fullres"]), "-m", str(models["2d"]),
                 "-i", str(ts), "-o", str(pred2), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    for case in ("t0", "t1"):
        a = np.asarray(nib.load(str(pred / f"{case}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(pred2 / f"{case}.nii.gz")).dataobj)
        assert np.array_equal(a, b)


def test_an_ensemble_beside_another_model_weighs_as_one_model(
    models: dict[str, Path], tmp_path: Path,
) -> None:
    """nnU-Net's configuration ensemble averages each configuration's fold mean: an ensemble
    given beside a model (to predict, or to the builder) shares one model's weight."""
    from fedseg.models.ensemble import build_ensemble, read_ensemble
    from fedseg.training.ensemble_predict import case_probabilities

    m3d, m2d = models["3d_fullres"], models["2d"]
    inner = build_ensemble({"a": m3d, "b": m2d}, tmp_path / "inner")
    outer = build_ensemble({"pair": inner, "solo": m2d}, tmp_path / "outer")
    info, members = read_ensemble(outer)
    assert [(m.name, m.weight) for m in info.members] == [("pair_a", 0.5), ("pair_b", 0.5),
                                                           ("solo", 1.0)]
    assert [m.weight for m in members] == [0.25, 0.25, 0.5]

    ts = models["site"] / "imagesTs"
    p3d, p2d = (case_probabilities([m], ts, device="cpu", mirror_tta=False)["t0"]
                for m in (m3d, m2d))
    want = ((p3d + p2d) / 2 + p2d) / 2
    for given in ([outer], [inner, m2d]):
        got = case_probabilities(given, ts, device="cpu", mirror_tta=False)["t0"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_one_model_probabilities_agree_with_plain_predict(
    models: dict[str, Path], tmp_path: Path,
) -> None:
    """The probability path (softmax after resampling) segments as the logit path of a single
    bundle does (argmax after resampling)."""
    from fedseg.data.dataset import load_image
    from fedseg.training.ensemble_predict import case_probabilities

    ts = models["site"] / "imagesTs"
    res = fedseg("predict", "-m", str(models["3d_fullres"]), "-i", str(ts), "-o",
                 str(tmp_path / "p"), "--device", "cpu", "--no-tta")
    assert res.returncode == 0, res.stderr
    assert [ln.split(" (")[0] for ln in res.stderr.splitlines()
            if ln.startswith("predict: ")] == ["predict: 1/2 cases", "predict: 2/2 cases"]
    probs = case_probabilities([models["3d_fullres"]], ts, device="cpu", mirror_tta=False)
    for case, p in probs.items():
        written, _, _ = load_image(tmp_path / "p" / f"{case}.nii.gz")
        assert np.array_equal(written[0], p.argmax(0))


def _edit(bundle: Path, **fields: object) -> None:
    """Change dataset.json fields (and the plan's, where the plan declares them too)."""
    for name in ("dataset.json", "plan.json"):
        path = bundle / name
        data = json.loads(path.read_text())
        for k, v in fields.items():
            if name == "dataset.json" or k in data:
                data[k] = v
        path.write_text(json.dumps(data))


@pytest.mark.parametrize("field, value", [
    ("labels", {"background": 0, "organ": 1, "tumour": 2}),
    ("channel_names", {"0": "CT"}),
    ("file_ending", ".mha"),
])
def test_members_that_differ_are_refused_naming_the_member(
    models: dict[str, Path], tmp_path: Path, field: str, value: object,
) -> None:
    other = tmp_path / "other"
    shutil.copytree(models["2d"], other)
    _edit(other, **{field: value})
    out = tmp_path / "ens"
    res = fedseg("ensemble", str(models["3d_fullres"]), str(other), "--out", str(out))
    assert res.returncode == 2
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"fedseg: error: {other}: dataset.json field '{field}'"), err
    assert "must share" in err
    assert not out.exists()  # nothing written
    res = fedseg("predict", "-m", str(models["3d_fullres"]), "-m", str(other), "-i",
                 str(models["site"] / "imagesTs"), "-o", str(tmp_path / "pred"))
    assert res.returncode == 2 and f"{other}: dataset.json field '{field}'" in res.stderr


def test_a_member_changed_after_building_and_other_misuse(
    models: dict[str, Path], tmp_path: Path,
) -> None:
    ens = tmp_path / "ens"
    assert fedseg("ensemble", str(models["3d_fullres"]), str(models["2d"]),
                  "--out", str(ens)).returncode == 0
    # an ensemble is not a single model (e.g. for train --init-from)
    from fedseg.errors import FedsegError
    from fedseg.models.bundle_files import check_bundle_folder

    with pytest.raises(FedsegError, match="an ensemble bundle"):
        check_bundle_folder(ens)
    # --out must be new
    res = fedseg("ensemble", str(models["2d"]), "--out", str(ens))
    assert res.returncode == 2 and "not an empty folder" in res.stderr
    # a member whose plan was replaced is named
    member = ens / "members" / "member_1"
    plan = json.loads((member / "plan.json").read_text())
    plan["num_training_cases"] += 1
    (member / "plan.json").write_text(json.dumps(plan))
    res = fedseg("predict", "-m", str(ens), "-i", str(models["site"] / "imagesTs"),
                 "-o", str(tmp_path / "pred"))
    assert res.returncode == 2 and f"{member}: its plan" in res.stderr
    assert "re-build it" in res.stderr


def test_region_probabilities_outside_the_crop_and_painting(models: dict[str, Path]) -> None:
    """Regions: sigmoid per region, 0 outside the crop (softmax: background 1 there), painted
    above 0.5 in regions_class_order."""
    import torch

    from fedseg.data.labels import LabelLayout
    from fedseg.planning.plan import Plan
    from fedseg.training.ensemble_predict import (
        logits_to_probabilities,
        probabilities_to_segmentation,
    )
    from fedseg.training.preprocess import CaseProperties

    props = CaseProperties(
        case_id="x", plan_hash="h", config="3d_fullres", original_shape=[2, 3, 4],
        original_spacing=[1.0, 1.0, 1.0], affine=np.eye(4).tolist(),
        spacing_transposed=[1.0, 1.0, 1.0], shape_before_cropping=[2, 3, 4],
        bbox_used_for_cropping=[[0, 2], [1, 3], [1, 3]],
        shape_after_cropping_and_before_resampling=[2, 2, 2], target_spacing=[1.0, 1.0, 1.0],
        shape_after_resampling=[2, 2, 2])

    base = Plan.load(models["root"] / "plan.json").model_copy(
        update={"transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2]})
    region_labels = {"background": 0, "whole": [1, 2], "core": 2}
    plan = base.model_copy(update={"labels": region_labels, "regions_class_order": [1, 2]})
    regions = plan.layout
    logits = torch.tensor([3.0, -3.0]).reshape(2, 1, 1, 1).expand(2, 2, 2, 2).contiguous()
    p = logits_to_probabilities(logits, props, plan)
    assert p.shape == (2, 2, 3, 4)
    assert p[:, :, 0].max() == 0.0 and p[:, :, :, 0].max() == 0.0  # outside the crop
    assert np.allclose(p[0, :, 1:3, 1:3], 1 / (1 + np.exp(-3.0)))
    seg = probabilities_to_segmentation(p, regions)
    assert seg[:, 1:3, 1:3].tolist() == [[[1, 1], [1, 1]]] * 2 and seg.sum() == 8
    p[1, :, 1, 1] = 0.6  # core above 0.5 wins where both regions hold
    assert probabilities_to_segmentation(p, regions)[:, 1, 1].tolist() == [2, 2]

    assert base.layout == LabelLayout.of(LABELS)
    p = logits_to_probabilities(torch.zeros(3, 2, 2, 2), props, base)
    assert np.allclose(p.sum(0), 1.0) and p[0, :, 0].min() == 1.0
    assert np.allclose(p[:, :, 1:3, 1:3], 1 / 3)
