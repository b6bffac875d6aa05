"""Preprocessing on real (tiny) NIfTI files: shapes, normalisation, cropping, the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedseg.data.dataset import CaseFiles, load_case
from fedseg.errors import FedsegError
from fedseg.planning.plan import ConfigurationPlan, IntensityProperties, Plan
from fedseg.training.preprocess import (
    PreprocessedDataset,
    compute_new_shape,
    preprocess_case,
    preprocess_dataset,
    resample_seg,
)

torch.set_num_threads(1)

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def make_plan(
    spacing: list[float],
    norm: str = "ZScoreNormalization",
    use_mask: bool = True,
    transpose_forward: list[int] | None = None,
    ct: IntensityProperties | None = None,
) -> Plan:
    tf = transpose_forward or [0, 1, 2]
    tb = [tf.index(i) for i in range(3)]
    props = ct or IntensityProperties(
        mean=0.0, std=1.0, median=0.0, min=0.0, max=1.0, percentile_00_5=0.0,
        percentile_99_5=1.0,
    )
    cfg = ConfigurationPlan(
        data_identifier="nnUNetPlans_3d_fullres",
        spacing=spacing,
        median_image_size_in_voxels=[32.0, 32.0, 32.0],
        patch_size=[32, 32, 32],
        batch_size=2,
        normalization_schemes=[norm],
        use_mask_for_norm=[use_mask],
        n_stages=3,
        features_per_stage=[8, 16, 32],
        kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        n_conv_per_stage=[2, 2, 2],
        n_conv_per_stage_decoder=[2, 2],
        batch_dice=False,
    )
    return Plan(
        dataset_name="Dataset001_Test",
        channel_names={"0": "CT" if norm == "CTNormalization" else "MR"},
        labels=LABELS,
        num_training_cases=2,
        gpu_memory_gb=8.0,
        transpose_forward=tf,
        transpose_backward=tb,
        original_median_spacing_after_transp=spacing,
        original_median_shape_after_transp=[32.0, 32.0, 32.0],
        foreground_intensity_properties_per_channel={"0": props},
        configurations={"3d_fullres": cfg},
    )


def synth_case(shape=(40, 30, 12), seed=0, scale=100.0, offset=50.0):
    """(image, label) in nibabel order: an ellipsoidal body (zeros outside) with two classes."""
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (ii / 0.8) ** 2 + (jj / 0.7) ** 2 + (kk / 0.75) ** 2 < 1
    organ = ((ii - 0.1) / 0.4) ** 2 + (jj / 0.35) ** 2 + (kk / 0.5) ** 2 < 1
    lesion = ((ii - 0.2) / 0.15) ** 2 + (jj / 0.15) ** 2 + (kk / 0.3) ** 2 < 1
    img = offset + scale * (1.0 + rng.normal(0, 0.2, shape) + organ + 2.0 * lesion)
    img = np.where(body, img, 0.0).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[organ & body] = 1
    lab[lesion & body] = 2
    return img, lab


def write_nifti(path: Path, arr: np.ndarray, zooms, affine: np.ndarray | None = None) -> Path:
    if affine is None:
        affine = np.diag([*zooms, 1.0])
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_dataset(root: Path, n_cases: int = 2, zooms=(1.0, 1.0, 3.0), shape=(40, 30, 12)):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": LABELS, "file_ending": ".nii.gz",
        "numTraining": n_cases,
    }))
    for n in range(n_cases):
        img, lab = synth_case(shape, seed=n)
        write_nifti(root / "imagesTr" / f"case{n:03d}_0000.nii.gz", img, zooms)
        write_nifti(root / "labelsTr" / f"case{n:03d}.nii.gz", lab, zooms)
    return root


def load_written_case(tmp_path: Path, zooms=(1.0, 1.0, 3.0), shape=(40, 30, 12), **kw):
    img, lab = synth_case(shape, **kw)
    ip = write_nifti(tmp_path / "img_0000.nii.gz", img, zooms)
    lp = write_nifti(tmp_path / "lab.nii.gz", lab, zooms)
    return load_case(CaseFiles("c0", (ip,), lp)), img, lab


def test_shape_crop_and_resampling(tmp_path):
    case, img, lab = load_written_case(tmp_path)
    # nnU-Net order: shape (12, 30, 40), spacing (3, 1, 1); transpose so the coarse axis is last
    plan = make_plan([2.0, 2.0, 3.0], transpose_forward=[1, 2, 0])
    pc = preprocess_case(case, plan)
    p = pc.properties
    assert p.original_shape == [12, 30, 40]
    assert p.spacing_transposed == [1.0, 1.0, 3.0]
    assert p.shape_before_cropping == [30, 40, 12]
    # the bbox is that of the non-zero body, in transposed order
    body = img.transpose(1, 0, 2) != 0  # nibabel (i, j, k) -> transposed (j, i, k)
    for ax, (lo, hi) in enumerate(p.bbox_used_for_cropping):
        other = tuple(a for a in range(3) if a != ax)
        hits = np.flatnonzero(body.any(axis=other))
        assert (lo, hi) == (hits[0], hits[-1] + 1)
    crop = p.shape_after_cropping_and_before_resampling
    assert crop == [hi - lo for lo, hi in p.bbox_used_for_cropping]
    expected = compute_new_shape(crop, [1.0, 1.0, 3.0], [2.0, 2.0, 3.0])
    assert list(pc.data.shape) == [1, *expected] == [1, *p.shape_after_resampling]
    assert pc.seg.shape == pc.data.shape and pc.seg.dtype == np.int8
    assert pc.data.dtype == np.float32
    # -1 marks background outside the body; labels survive resampling
    assert set(np.unique(pc.seg)) == {-1, 0, 1, 2}
    assert (pc.seg[pc.data == 0] <= 0).all()
    # sampled foreground locations lie on their class, deterministically
    for key, val in (("1", 1), ("2", 2)):
        locs = np.asarray(p.class_locations[key])
        assert len(locs) == (pc.seg == val).sum()  # < 10000 voxels: all of them
        assert (pc.seg[0][tuple(locs.T)] == val).all()
    assert preprocess_case(case, plan).properties.class_locations == p.class_locations


def test_zscore_inside_mask_and_ct_clipping(tmp_path):
    case, _, _ = load_written_case(tmp_path)
    native = [3.0, 1.0, 1.0]  # = the case's spacing: no resampling, statistics are exact
    pc = preprocess_case(case, make_plan(native, use_mask=True))
    inside = pc.seg[0] >= 0
    vals = pc.data[0][inside]
    assert abs(vals.mean()) < 1e-4 and abs(vals.std() - 1) < 1e-4
    assert (pc.data[0][~inside] == 0).all()  # outside the mask stays zero

    pc = preprocess_case(case, make_plan(native, use_mask=False))
    assert abs(pc.data.mean()) < 1e-4 and abs(pc.data.std() - 1) < 1e-4

    ct = IntensityProperties(mean=250.0, std=100.0, median=250.0, min=0.0, max=600.0,
                             percentile_00_5=100.0, percentile_99_5=300.0)
    pc = preprocess_case(case, make_plan(native, norm="CTNormalization", ct=ct))
    assert np.isclose(pc.data.max(), (300 - 250) / 100) and np.isclose(pc.data.min(), -1.5)
    # resampling (order 3, clipped to its input's range) never leaves the clipped range
    pc = preprocess_case(case, make_plan([2.0, 1.7, 1.3], norm="CTNormalization", ct=ct))
    assert pc.data.max() <= 0.5 + 1e-6 and pc.data.min() >= -1.5 - 1e-6


def test_seg_resampling_keeps_labels_and_geometry():
    seg = np.zeros((1, 20, 20, 20), np.int16)
    seg[0, 5:15, 5:15, 5:15] = 1
    seg[0, 8:12, 8:12, 8:12] = 2
    up = resample_seg(seg, [40, 40, 40], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    assert up.shape == (1, 40, 40, 40) and set(np.unique(up)) == {0, 1, 2}
    # faces land where they should (linear interpolation rounds the cube's corners off, as
    # nnU-Net's order-1 resize_segmentation does)
    assert (up[0, 10:30, 20, 20] > 0).all() and up[0, 9, 20, 20] == 0 and up[0, 30, 20, 20] == 0
    assert (up[0, 11:29, 11:29, 11:29] > 0).all()
    assert (up[0, 16:24, 20, 20] == 2).all() and (up[0, 17:23, 17:23, 17:23] == 2).all()
    assert up[0, 15, 20, 20] == 1 and up[0, 24, 20, 20] == 1


def test_channel_mismatch_is_a_clear_error(tmp_path):
    case, _, _ = load_written_case(tmp_path)
    case.image = np.concatenate([case.image, case.image])
    with pytest.raises(FedsegError, match="2 channel"):
        preprocess_case(case, make_plan([3.0, 1.0, 1.0]))


def test_dataset_cache_hit_atomic_and_keyed_by_plan(tmp_path):
    data_dir = write_dataset(tmp_path / "site", n_cases=2)
    plan = make_plan([3.0, 2.0, 2.0])
    calls = []
    folder = preprocess_dataset(data_dir, plan, tmp_path / "cache",
                                progress=lambda d, t: calls.append((d, t)))
    assert folder == tmp_path / "cache" / plan.hash() / "3d_fullres"
    assert calls == [(1, 2), (2, 2)]
    assert (folder.parent / "plan.json").is_file()
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["case000.json", "case000.npy", "case000_seg.npy",
                     "case001.json", "case001.npy", "case001_seg.npy"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    ds = PreprocessedDataset(folder)
    assert ds.case_ids == ["case000", "case001"] and len(ds) == 2
    data, seg, props = ds.load("case000")
    assert isinstance(data, np.memmap) and data.dtype == np.float32 and data.ndim == 4
    assert seg.dtype == np.int8 and seg.shape[1:] == data.shape[1:]
    assert list(data.shape[1:]) == props.shape_after_resampling
    locs = ds.class_locations("case000")
    assert locs["1"].shape[1] == 3 and (seg[0][tuple(locs["1"].T)] == 1).all()

    # second call: nothing rewritten
    assert preprocess_dataset(data_dir, plan, tmp_path / "cache") == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes

    # a case whose commit marker (.json) is missing is redone; the other is not touched
    (folder / "case001.json").unlink()
    assert PreprocessedDataset(folder).case_ids == ["case000"]
    os.utime(folder / "case001.npy", ns=(0, 0))
    preprocess_dataset(data_dir, plan, tmp_path / "cache")
    assert (folder / "case001.npy").stat().st_mtime_ns != 0
    assert (folder / "case000.npy").stat().st_mtime_ns == mtimes["case000.npy"]
    assert not list(folder.glob(".*tmp*"))

    # another plan -> another folder
    other = make_plan([3.0, 1.5, 1.5])
    folder2 = preprocess_dataset(data_dir, other, tmp_path / "cache")
    assert folder2 != folder and folder2.parent.name == other.hash()
    assert PreprocessedDataset(folder2).load("case000")[0].shape != data.shape


def test_other_normalization_schemes() -> None:
    """The planner can name nnU-Net's non-default schemes; preprocessing must honour them."""
    from fedseg.training.preprocess import normalize

    plan = _rescale_plan()
    data = np.stack([np.linspace(-5, 15, 64, dtype=np.float32).reshape(4, 4, 4)] * 3)
    data[2] = np.abs(data[2]) * 10  # 8-bit-like values
    seg = np.zeros((1, 4, 4, 4), dtype=np.int16)
    out = normalize(data.copy(), seg, plan, "3d_fullres")
    np.testing.assert_array_equal(out[0], data[0])  # NoNormalization
    assert out[1].min() == 0.0 and out[1].max() == pytest.approx(1.0)  # RescaleTo01
    np.testing.assert_allclose(out[2], data[2] / 255)  # RGBTo01
    bad = data.copy()
    bad[2] += 1000
    with pytest.raises(FedsegError, match="RGBTo01Normalization"):
        normalize(bad, seg, plan, "3d_fullres")


def _rescale_plan() -> Plan:
    plan = make_plan([1.0, 1.0, 1.0])
    cfg = plan.configurations["3d_fullres"]
    cfg.normalization_schemes = ["NoNormalization", "RescaleTo01Normalization", "RGBTo01Normalization"]
    cfg.use_mask_for_norm = [False, False, False]
    plan.channel_names = {"0": "noNorm", "1": "rescale_to_0_1", "2": "rgb_to_0_1"}
    return plan
