"""Prediction (geometry of the written NIfTI, inverse of preprocessing) and evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedseg.data.dataset import CaseFiles, DatasetJson, load_case
from fedseg.errors import FedsegError
from fedseg.models.bundle import BundleInfo, save_bundle
from fedseg.models.network import build_network
from fedseg.planning.plan import ConfigurationPlan, IntensityProperties, Plan
from fedseg.training.evaluate import evaluate_folders
from fedseg.training.predict import logits_to_segmentation, predict_files
from fedseg.training.preprocess import preprocess_case

torch.set_num_threads(1)

LABELS = {"background": 0, "organ": 1, "lesion": 2}
ZOOMS = (0.8, 0.8, 3.0)  # nibabel order: anisotropic, coarse along k
SHAPE = (40, 36, 12)


def make_plan(n_channels: int = 1, spacing: list[float] | None = None) -> Plan:
    # nnU-Net order spacing is (3.0, 0.8, 0.8); transpose so the coarse axis comes last
    tf = [1, 2, 0]
    cfg = ConfigurationPlan(
        data_identifier="nnUNetPlans_3d_fullres",
        spacing=spacing or [1.6, 1.6, 3.0],
        median_image_size_in_voxels=[20.0, 20.0, 12.0],
        patch_size=[32, 32, 32],
        batch_size=2,
        normalization_schemes=["ZScoreNormalization"] * n_channels,
        use_mask_for_norm=[True] * n_channels,
        n_stages=3,
        features_per_stage=[8, 16, 32],
        kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        n_conv_per_stage=[2, 2, 2],
        n_conv_per_stage_decoder=[2, 2],
        batch_dice=False,
    )
    props = IntensityProperties(mean=0.0, std=1.0, median=0.0, min=0.0, max=1.0,
                                percentile_00_5=0.0, percentile_99_5=1.0)
    return Plan(
        dataset_name="Dataset001_Test",
        channel_names={str(c): f"MR{c}" for c in range(n_channels)},
        labels=LABELS,
        num_training_cases=2,
        gpu_memory_gb=8.0,
        transpose_forward=tf,
        transpose_backward=[tf.index(i) for i in range(3)],
        original_median_spacing_after_transp=[0.8, 0.8, 3.0],
        original_median_shape_after_transp=[36.0, 40.0, 12.0],
        foreground_intensity_properties_per_channel={str(c): props for c in range(n_channels)},
        configurations={"3d_fullres": cfg},
    )


def make_bundle(path: Path, n_channels: int = 1) -> Path:
    torch.manual_seed(0)
    plan = make_plan(n_channels)
    ds = DatasetJson(channel_names=plan.channel_names, labels=LABELS)
    return save_bundle(path, plan, ds, build_network(plan).state_dict(), BundleInfo())


def oblique_affine() -> np.ndarray:
    """Rotated, permuted-sign, translated voxel->world map with spacing ZOOMS."""
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, -1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(ZOOMS)
    aff[:3, 3] = [-12.5, 30.0, 7.25]
    return aff


def synth(seed: int = 0):
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    body = (ii / 0.85) ** 2 + (jj / 0.8) ** 2 + (kk / 0.8) ** 2 < 1
    organ = ((ii - 0.1) / 0.45) ** 2 + (jj / 0.4) ** 2 + (kk / 0.6) ** 2 < 1
    lesion = ((ii - 0.2) / 0.2) ** 2 + (jj / 0.2) ** 2 + (kk / 0.4) ** 2 < 1
    img = np.where(body, 200 + 100 * (organ + 2.0 * lesion) + rng.normal(0, 10, SHAPE), 0)
    lab = np.zeros(SHAPE, np.uint8)
    lab[organ & body] = 1
    lab[lesion & body] = 2
    return img.astype(np.float32), lab


def save(path: Path, arr: np.ndarray, affine: np.ndarray, zooms=ZOOMS) -> Path:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


# -------------------------------------------------------------------------------- predict


def test_predict_writes_input_geometry(tmp_path):
    bundle = make_bundle(tmp_path / "model")
    img, _ = synth()
    aff = oblique_affine()
    src = save(tmp_path / "in" / "pat7_0000.nii.gz", img, aff)
    seen = []
    out = predict_files(bundle, [src], tmp_path / "out", device="cpu",
                        progress=lambda d, t: seen.append((d, t)))
    assert out == [tmp_path / "out" / "pat7.nii.gz"] and seen == [(1, 1)]
    res = nib.load(str(out[0]))
    assert res.shape == SHAPE
    assert np.allclose(res.affine, nib.load(str(src)).affine)
    assert np.allclose(res.header.get_zooms(), ZOOMS)
    arr = np.asarray(res.dataobj)
    assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 1, 2}
    nz = np.argwhere(img != 0)
    inside = np.zeros(SHAPE, bool)
    inside[tuple(slice(lo, hi + 1) for lo, hi in zip(nz.min(0), nz.max(0), strict=True))] = True
    assert (arr[~inside] == 0).all()  # outside the non-zero bbox: background

    # a folder in nnU-Net layout gives the same file; no mirroring is faster, same geometry
    out2 = predict_files(bundle, tmp_path / "in", tmp_path / "out2", device="cpu",
                         mirror_tta=False)
    assert nib.load(str(out2[0])).shape == SHAPE


@pytest.mark.parametrize("spacing", [[0.8, 0.8, 3.0], [1.6, 1.6, 3.0], [1.2, 1.0, 1.5]])
def test_inverse_geometry_round_trip(tmp_path, spacing):
    """One-hot of the preprocessed label as 'logits' must map back onto the original label.

    At the native spacing (only transpose + crop) exactly; resampled, up to resolution loss.
    """
    plan = make_plan(spacing=spacing)
    img, lab = synth(1)
    aff = oblique_affine()
    ip = save(tmp_path / "c_0000.nii.gz", img, aff)
    lp = save(tmp_path / "c.nii.gz", lab, aff)
    pc = preprocess_case(load_case(CaseFiles("c", (ip,), lp)), plan)
    seg = torch.from_numpy(np.clip(pc.seg[0], 0, None).astype(np.int64))
    logits = torch.nn.functional.one_hot(seg, 3).permute(3, 0, 1, 2).float()
    back = logits_to_segmentation(logits, pc.properties, plan, [0, 1, 2])
    back = back.transpose(2, 1, 0)  # nnU-Net -> nibabel order
    assert back.shape == lab.shape
    if spacing == [0.8, 0.8, 3.0]:
        p = pc.properties
        assert p.shape_after_cropping_and_before_resampling != p.shape_before_cropping
        assert p.shape_after_resampling == p.shape_after_cropping_and_before_resampling
        assert (back == lab).all()
        return
    for c, min_dice in ((1, 0.85), (2, 0.75)):  # the lesion is ~100 voxels: coarse grids hurt
        a, b = back == c, lab == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > min_dice


def test_predict_errors(tmp_path):
    with pytest.raises(FedsegError, match="no such folder"):
        predict_files(tmp_path / "nope", [], tmp_path / "o", device="cpu")
    (tmp_path / "broken").mkdir()
    with pytest.raises(FedsegError, match="plan.json: missing"):
        predict_files(tmp_path / "broken", [], tmp_path / "o", device="cpu")

    bundle = make_bundle(tmp_path / "model2", n_channels=2)
    img, _ = synth()
    one = save(tmp_path / "in" / "scan.nii.gz", img, oblique_affine())
    with pytest.raises(FedsegError, match="takes 2 channels"):
        predict_files(bundle, [one], tmp_path / "o", device="cpu")
    c0 = save(tmp_path / "in" / "pat_0000.nii.gz", img, oblique_affine())
    with pytest.raises(FedsegError, match="pat_0001.nii.gz: missing"):
        predict_files(bundle, [c0], tmp_path / "o", device="cpu")
    c2 = save(tmp_path / "in" / "pat_0002.nii.gz", img, oblique_affine())
    with pytest.raises(FedsegError, match="channel 2 but the model takes 2"):
        predict_files(bundle, [c0, c2], tmp_path / "o", device="cpu")

    torch.save({"w": torch.zeros(1)}, tmp_path / "model2" / "model.pt")
    c1 = save(tmp_path / "in" / "pat_0001.nii.gz", img, oblique_affine())
    with pytest.raises(FedsegError, match="weights do not fit"):
        predict_files(bundle, [c0, c1], tmp_path / "o", device="cpu")
    (tmp_path / "model2" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FedsegError, match="model.pt: unreadable"):
        predict_files(bundle, [c0, c1], tmp_path / "o", device="cpu")


# -------------------------------------------------------------------------------- evaluate


def cube(shape, lo, size, value=1):
    a = np.zeros(shape, np.uint8)
    a[tuple(slice(lo_i, lo_i + size) for lo_i in lo)] = value
    return a


def test_evaluate_identity_shift_and_empty(tmp_path):
    shape, zooms = (30, 30, 20), (1.0, 1.0, 3.0)
    aff = np.diag([*zooms, 1.0])
    ref = cube(shape, (5, 5, 5), 10)
    ref[20:24, 20:24, 2:4] = 2
    save(tmp_path / "ref" / "same.nii.gz", ref, aff, zooms)
    save(tmp_path / "pred" / "same.nii.gz", ref, aff, zooms)
    # shifted by 2 voxels along k (3 mm): overlap 8/10 -> Dice 0.8, HD95 = 6 mm; no class 2
    ref2 = cube(shape, (5, 5, 5), 10)
    save(tmp_path / "ref" / "shift.nii.gz", ref2, aff, zooms)
    save(tmp_path / "pred" / "shift.nii.gz", cube(shape, (5, 5, 7), 10), aff, zooms)

    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval" / "summary.json",
                           labels=LABELS)
    by = {c["case_id"]: c["metrics"] for c in res["metric_per_case"]}
    assert by["same"]["1"]["Dice"] == 1.0 and by["same"]["1"]["HD95"] == 0.0
    assert by["same"]["2"]["Dice"] == 1.0 and by["same"]["2"]["HD95"] == 0.0
    assert by["shift"]["1"]["Dice"] == pytest.approx(0.8)
    assert by["shift"]["1"]["HD95"] == pytest.approx(6.0)
    assert math.isnan(by["shift"]["2"]["Dice"]) and math.isnan(by["shift"]["2"]["HD95"])
    assert res["mean"]["1"]["Dice"] == pytest.approx(0.9)
    assert res["mean"]["2"]["Dice"] == 1.0  # the both-empty case does not count (nnU-Net)
    assert res["foreground_mean"]["Dice"] == pytest.approx(0.95)

    written = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert written["mean"]["1"]["HD95"] == pytest.approx(3.0)
    shift = next(c for c in written["metric_per_case"] if c["case_id"] == "shift")
    assert shift["metrics"]["2"]["Dice"] is None

    assert res["mean"]["2"]["HD95_missing"] == 0 and res["foreground_mean"]["HD95_missing"] == 0

    # labels inferred from the files; a missed structure: Dice 0, HD95 missing and counted (not
    # a made-up distance such as the image diagonal, which would swamp the mean)
    save(tmp_path / "pred" / "same.nii.gz", cube(shape, (5, 5, 5), 10), aff, zooms)
    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "s2.json")
    m = {c["case_id"]: c["metrics"] for c in res["metric_per_case"]}["same"]["2"]
    assert m["Dice"] == 0.0 and math.isnan(m["HD95"]) and m["HD95_missing"] == 1
    assert res["mean"]["2"]["HD95_missing"] == 1 and res["foreground_mean"]["HD95_missing"] == 1
    assert res["mean"]["1"]["HD95"] == pytest.approx(3.0)  # the other class's mean unchanged
    assert math.isnan(res["mean"]["2"]["HD95"])  # no case where class 2's HD95 is defined


def test_evaluate_errors(tmp_path):
    aff = np.eye(4)
    save(tmp_path / "ref" / "a.nii.gz", cube((10, 10, 10), (2, 2, 2), 4), aff, (1, 1, 1))
    save(tmp_path / "pred" / "b.nii.gz", cube((10, 10, 10), (2, 2, 2), 4), aff, (1, 1, 1))
    with pytest.raises(FedsegError, match="a.nii.gz: missing prediction"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "s.json")
    save(tmp_path / "pred" / "a.nii.gz", cube((10, 10, 12), (2, 2, 2), 4), aff, (1, 1, 1))
    with pytest.raises(FedsegError, match="differs from the reference"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "s.json")


def test_batched_mirrors_predict_the_same_logits() -> None:
    """Mirrored copies of the windows through the network together (8 per call on a CPU, 16 on a
    GPU: the faster path) or one by one (the previous CPU path) give the same logits, hence the
    same label map."""
    from fedseg.training.predict import make_predictor, predict_logits

    torch.manual_seed(0)
    plan = make_plan()
    net = build_network(plan).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    one, many = (make_predictor(net, torch.device("cpu"), True, 3, max_batch=b) for b in (1, 16))
    with torch.inference_mode():
        a, b = one(x), many(x)
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
        data = np.random.default_rng(0).normal(size=(1, 40, 36, 44)).astype(np.float32)
        ref = predict_logits(data, net, [32, 32, 32], torch.device("cpu"), mirror_tta=True,
                             max_batch=1)
        for sw in (1, 2):
            fast = predict_logits(data, net, [32, 32, 32], torch.device("cpu"), mirror_tta=True,
                                  sw_batch_size=sw)
            assert torch.allclose(fast, ref, atol=1e-5), float((fast - ref).abs().max())
            assert torch.equal(fast.argmax(0), ref.argmax(0))
