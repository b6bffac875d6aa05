"""Issue #12: a 2D dataset trains and predicts through the CLI as nnU-Net's 2d configuration;
region-based labels train with sigmoid outputs and are painted back by regions_class_order; an
ignore label changes neither the loss nor the Dice."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from inprocess_cli import fedseg
from PIL import Image

from fedseg.data.labels import LabelLayout
from fedseg.training.evaluate import case_metrics, evaluate_folders, label_groups
from fedseg.training.losses import RegionDiceBCELoss, make_loss, mark_ignored

REGIONS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}


def _fundus_like(root: Path, n: int, split: str = "Tr", seed: int = 0) -> None:
    """RGB 64x48 images: a bright disc (label 1 rim, 2 cup) on a darker, noisy background."""
    rng = np.random.default_rng(seed)
    (root / f"images{split}").mkdir(parents=True, exist_ok=True)
    (root / f"labels{split}").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:48, :64]
    for i in range(n):
        cy, cx, r = rng.uniform(16, 32), rng.uniform(20, 44), rng.uniform(8, 12)
        d = np.hypot(yy - cy, xx - cx)
        lab = np.where(d < r, 1, 0).astype(np.uint8)
        lab[d < r * 0.5] = 2
        img = rng.normal(60, 10, size=(48, 64, 3))
        img[lab == 1] += [120, 80, 20]
        img[lab == 2] += [180, 160, 90]
        name = f"eye{seed}_{i:02d}"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            root / f"images{split}" / f"{name}_0000.png")
        Image.fromarray(lab).save(root / f"labels{split}" / f"{name}.png")


def fundus_site(root: Path, n_train: int = 8) -> Path:
    """A fundus-like site: ``n_train`` training and 2 test cases, disc and cup as regions."""
    _fundus_like(root, n_train)
    _fundus_like(root, 2, "Ts", seed=1)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "file_ending": ".png",
        "labels": {"background": 0, "optic_disc": [1, 2], "optic_cup": 2},
        "regions_class_order": [1, 2], "numTraining": n_train}))
    return root


@pytest.fixture(scope="module")
def fundus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fundus_site(tmp_path_factory.mktemp("fundus") / "site")


def test_2d_png_check_plan_train_predict_evaluate(fundus: Path, tmp_path: Path) -> None:
    from fedseg.planning.plan import Plan

    res = fedseg("check-data", str(fundus))
    assert res.returncode == 0 and res.stdout.startswith("OK:"), res.stderr
    plan_path = tmp_path / "plan.json"
    res = fedseg("plan", str(fundus), "--out", str(plan_path), "--preset", "tiny")
    assert res.returncode == 0, res.stderr
    plan = Plan.load(plan_path)
    assert list(plan.configurations) == ["2d"] and plan.default_configuration == "2d"
    assert plan.num_outputs == 2  # one sigmoid per region, no background output
    assert "2d spacing [1.0, 1.0]" in res.stdout

    model = tmp_path / "model"
    res = fedseg("train", "--data", str(fundus), "--plan", str(plan_path), "--iterations", "6",
                 "--out", str(model), "--cache", str(tmp_path / "cache"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    info = json.loads((model / "bundle.json").read_text())
    assert info["config"] == "2d"

    pred = tmp_path / "pred"
    res = fedseg("predict", "--model", str(model), "-i", str(fundus / "imagesTs"), "-o",
                 str(pred), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    outs = sorted(pred.glob("*.png"))
    assert [p.name for p in outs] == ["eye1_00.png", "eye1_01.png"]
    for p in outs:
        with Image.open(p) as im:
            assert im.size == (64, 48) and im.mode == "L"
            assert set(np.unique(np.asarray(im)).tolist()) <= {0, 1, 2}
    res = fedseg("evaluate", "--pred", str(pred), "--labels", str(fundus / "labelsTs"),
                 "--json", str(tmp_path / "scores.json"))
    assert res.returncode == 0, res.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["mean"]) == {"1,2", "2"}  # one entry per region, as nnU-Net scores them


def test_2d_configuration_trains_a_2d_network(fundus: Path, tmp_path: Path) -> None:
    """The trainer builds a 2D DynUNet and feeds it (B, C, y, x) patches."""
    from fedseg.data.dataset import read_dataset_json
    from fedseg.planning.fingerprint import compute_fingerprint
    from fedseg.planning.planner import make_plan
    from fedseg.planning.presets import apply_preset
    from fedseg.training.preprocess import preprocess_dataset
    from fedseg.training.trainer import LocalTrainer, TrainConfig

    fp = compute_fingerprint(fundus)
    plan = apply_preset(make_plan(fp, read_dataset_json(fundus)), "tiny")
    folder = preprocess_dataset(fundus, plan, tmp_path / "cache")
    tr = LocalTrainer(plan, folder, tmp_path / "state",
                      TrainConfig(device="cpu", total_iterations=4, num_workers=0))
    assert tr.net.spatial_dims == 2
    seen: list[tuple[int, ...]] = []
    hook = tr.model.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    res = tr.run(2, 0, 4)
    hook.remove()
    assert np.isfinite(res.loss)
    assert seen and all(len(s) == 4 and s[1] == 3 for s in seen), seen


# --------------------------------------------------------------------------------------------
# regions (BraTS-like) and the ignore label


def _brats_like(root: Path, n: int = 4) -> None:
    """Nested regions as BraTS: 1 = oedema shell, 2 = core, 3 = enhancing centre."""
    rng = np.random.default_rng(7)
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True, exist_ok=True)
    g = np.stack(np.mgrid[:24, :24, :24], -1).astype(float)
    for i in range(n):
        c = rng.uniform(9, 15, size=3)
        d = np.linalg.norm(g - c, axis=-1)
        lab = np.zeros((24, 24, 24), np.uint8)
        lab[d < 8] = 1
        lab[d < 5] = 2
        lab[d < 2.5] = 3
        img = rng.normal(0, 0.3, size=lab.shape) + lab * 1.0
        aff = np.eye(4)
        nib.save(nib.Nifti1Image(img.astype(np.float32), aff),
                 str(root / "imagesTr" / f"b{i}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(root / "labelsTr" / f"b{i}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR"}, "labels": REGIONS, "regions_class_order": [1, 2, 3],
        "file_ending": ".nii.gz", "numTraining": n}))


def _masks(lab: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.isin(lab[:, 0], torch.tensor(v)) for v in
                        ([1, 2, 3], [2, 3], [3])], 1)


def test_region_loss_is_sigmoid_dice_bce() -> None:
    layout = LabelLayout.of(REGIONS, [1, 2, 3])
    assert layout.has_regions and layout.num_outputs == 3
    loss = make_loss(layout, batch_dice=True, ignore=False)
    assert isinstance(loss, RegionDiceBCELoss)
    lab = torch.zeros((2, 1, 8, 8, 8), dtype=torch.long)
    lab[:, :, 2:6, 2:6, 2:6] = 1
    lab[:, :, 3:5, 3:5, 3:5] = 2
    lab[:, :, 3, 3, 3] = 3
    m = _masks(lab).float()
    perfect = torch.where(m > 0, 20.0, -20.0)
    assert float(loss(perfect, lab)) < 1e-3  # independent sigmoids, overlapping targets
    wrong = perfect.clone()
    wrong[:, 1] = -wrong[:, 1]  # the core region inverted
    assert float(loss(wrong, lab)) > 0.5
    # a region's output alone decides its term: softmax coupling would change region 0's loss
    half = perfect.clone()
    half[:, 2] = 0.0
    base = RegionDiceBCELoss([[1, 2, 3]], batch_dice=True)
    assert float(base(half[:, :1], lab)) == pytest.approx(float(base(perfect[:, :1], lab)))


def test_regions_painted_in_regions_class_order() -> None:
    from fedseg.training.predict import segment

    layout = LabelLayout.of(REGIONS, [1, 2, 3])
    logits = torch.full((3, 1, 1, 4), -5.0)
    logits[0, ..., 1:] = 5  # whole tumour at voxels 1, 2, 3
    logits[1, ..., 2:] = 5  # core at 2, 3
    logits[2, ..., 3:] = 5  # enhancing at 3
    assert segment(logits, layout).ravel().tolist() == [0, 1, 2, 3]
    # the order decides what a voxel in several regions becomes (later regions overwrite)
    reordered = LabelLayout.of({"background": 0, "a": [1, 2], "b": 2}, [2, 1])
    lg = torch.full((2, 1, 1, 2), 5.0)
    assert segment(lg, reordered).ravel().tolist() == [1, 1]


def test_region_training_writes_label_map_by_order(tmp_path: Path) -> None:
    site = tmp_path / "brats"
    _brats_like(site)
    plan_path = tmp_path / "plan.json"
    assert fedseg("plan", str(site), "--out", str(plan_path), "--preset", "tiny").returncode == 0
    model = tmp_path / "model"
    res = fedseg("train", "--data", str(site), "--plan", str(plan_path), "--iterations", "4",
                 "--out", str(model), "--cache", str(tmp_path / "cache"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    pred = tmp_path / "pred"
    res = fedseg("predict", "--model", str(model), "-i", str(site / "imagesTr"), "-o",
                 str(pred), "--device", "cpu", "--no-tta")
    assert res.returncode == 0, res.stderr
    out = np.asarray(nib.load(str(pred / "b0.nii.gz")).dataobj)
    assert out.shape == (24, 24, 24) and set(np.unique(out).tolist()) <= {0, 1, 2, 3}
    scores = evaluate_folders(pred, site / "labelsTr", tmp_path / "s.json")
    assert set(scores["mean"]) == {"1,2,3", "2,3", "3"}


IGNORE = {"background": 0, "organ": 1, "ignore": 2}


def test_ignored_voxels_change_neither_loss_nor_dice() -> None:
    layout = LabelLayout.of(IGNORE)
    assert layout.ignore_label == 2 and layout.num_outputs == 2  # no output for "ignore"
    loss = make_loss(layout, batch_dice=False, ignore=True)
    rng = torch.Generator().manual_seed(0)
    lab = torch.zeros((1, 1, 6, 6, 6), dtype=torch.int16)
    lab[..., 1:4, 1:4, 1:4] = 1
    lab[..., 4:, :, :] = 2  # unlabelled slab
    target = mark_ignored(lab, layout, ignore_outside=False)
    logits = torch.randn((1, 2, 6, 6, 6), generator=rng)
    other = logits.clone()
    other[..., 4:, :, :] = torch.randn((1, 2, 2, 6, 6), generator=rng) * 10
    assert float(loss(logits, target)) == pytest.approx(float(loss(other, target)), rel=1e-6)
    # ...while a change on labelled voxels does change it
    moved = logits.clone()
    moved[:, 1, :2] += 3  # more "organ" on labelled background
    assert float(loss(moved, target)) != pytest.approx(float(loss(logits, target)))

    ref = lab[0, 0].numpy().astype(np.int64)
    pred = (ref == 1).astype(np.int64)
    pred2 = pred.copy()
    pred2[4:] = 1  # predicted organ where the reference is unlabelled
    groups = label_groups(IGNORE)
    assert list(groups) == ["1"]
    a = case_metrics(pred, ref, (1, 1, 1), groups, ignore_label=2)
    b = case_metrics(pred2, ref, (1, 1, 1), groups, ignore_label=2)
    assert a["1"]["Dice"] == b["1"]["Dice"] == 1.0
    c = case_metrics(pred2, ref, (1, 1, 1), groups)  # without the ignore rule it would count
    assert c["1"]["Dice"] < 1.0


def test_ignore_label_is_never_predicted() -> None:
    from fedseg.training.predict import segment

    layout = LabelLayout.of(IGNORE)
    logits = torch.randn((2, 4, 4, 4))
    assert set(np.unique(segment(logits, layout)).tolist()) <= {0, 1}


def test_2d_configuration_on_3d_data_travels_with_the_plan(tmp_path: Path) -> None:
    """server.toml ``configuration = "2d"`` on 3D data: the plan says so, and everything at a
    site that reads the plan — preprocessing, the trainer, the bundle, predict — follows it."""
    from fedseg.data.dataset import read_dataset_json
    from fedseg.data.demo import make_demo_data
    from fedseg.errors import FedsegError
    from fedseg.models.bundle import BundleInfo, save_bundle
    from fedseg.planning.fingerprint import compute_fingerprint
    from fedseg.planning.plan import with_configuration
    from fedseg.planning.planner import make_plan
    from fedseg.planning.presets import apply_preset
    from fedseg.training.predict import predict_files
    from fedseg.training.preprocess import preprocess_dataset
    from fedseg.training.trainer import LocalTrainer, TrainConfig

    site = make_demo_data(tmp_path / "demo", sites=1, cases=3, test_cases=1)[0]
    ds = read_dataset_json(site)
    plan3d = apply_preset(make_plan(compute_fingerprint(site), ds), "tiny")
    assert plan3d.default_configuration == "3d_fullres"
    plan = with_configuration(plan3d, "2d")
    assert plan.default_configuration == "2d" and plan.hash() != plan3d.hash()
    folder = preprocess_dataset(site, plan, tmp_path / "cache")
    assert folder.name == "2d"
    tr = LocalTrainer(plan, folder, tmp_path / "state",
                      TrainConfig(device="cpu", total_iterations=2, num_workers=0))
    assert tr.net.spatial_dims == 2
    res = tr.run(2, 0, 2)
    save_bundle(tmp_path / "model", plan, ds, res.weights, BundleInfo(trained_iterations=2))
    out = predict_files(tmp_path / "model", site / "imagesTs", tmp_path / "pred", device="cpu",
                        mirror_tta=False)
    src = nib.load(str(sorted((site / "imagesTs").iterdir())[0]))
    assert nib.load(str(out[0])).shape == src.shape  # slice by slice back to the 3D grid

    only_2d = plan.model_copy(update={"configurations": {"2d": plan.configurations["2d"]},
                                      "configuration": None})
    with pytest.raises(FedsegError, match="no configuration '3d_fullres'"):
        with_configuration(only_2d, "3d_fullres")
