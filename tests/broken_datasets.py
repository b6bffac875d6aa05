"""A corpus of small nnU-Net datasets, each broken in exactly one realistic way.

Why: ``fedseg check-data`` is only as good as the mistakes it has been shown. Every builder here
writes a small valid dataset (8^3 voxels, 2 channels, 3 cases) with real NIfTI files, then
breaks it in one way a hospital engineer plausibly would. :data:`BROKEN` maps a kind to
``(builder, substring the problem line must contain)``; tests iterate over it.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (8, 8, 8)
CASES = ("case_000", "case_001", "case_002")
LABELS = {"background": 0, "organ": 1, "lesion": 2}
AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])
AFFINE[:3, 3] = (-4.0, 10.0, 2.0)


def save(arr: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def image(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)


def label(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:6, 2:6, 2:6] = 1
    lab[3 + seed % 2, 3:5, 3:5] = 2
    return lab


def write_json(root: Path, **changes: object) -> None:
    meta: dict[str, object] = {
        "name": "broken-test",
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": dict(LABELS),
        "numTraining": len(CASES),
        "file_ending": ".nii.gz",
    }
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "dataset.json").write_text(json.dumps(meta))


def make_valid(root: Path) -> Path:
    """A valid 2-channel dataset with 3 training and 1 labelled test case."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root)
    for n, cid in enumerate(CASES):
        for c in range(2):
            save(image(10 * n + c), root / "imagesTr" / f"{cid}_{c:04d}.nii.gz")
        save(label(n), root / "labelsTr" / f"{cid}.nii.gz")
    for c in range(2):
        save(image(99 + c), root / "imagesTs" / f"test_000_{c:04d}.nii.gz")
    save(label(0), root / "labelsTs" / "test_000.nii.gz")
    return root


def _img(root: Path, cid: str = "case_001", chan: int = 0, ending: str = ".nii.gz") -> Path:
    return root / "imagesTr" / f"{cid}_{chan:04d}{ending}"


def _lab(root: Path, cid: str = "case_001", ending: str = ".nii.gz") -> Path:
    return root / "labelsTr" / f"{cid}{ending}"


# --- dataset.json ---------------------------------------------------------------------------


def missing_dataset_json(root: Path) -> None:
    (make_valid(root) / "dataset.json").unlink()


def invalid_json(root: Path) -> None:
    (make_valid(root) / "dataset.json").write_text('{"channel_names": {"0": "T1"},')


def missing_labels_field(root: Path) -> None:
    write_json(make_valid(root), labels=None)


def no_background(root: Path) -> None:
    write_json(make_valid(root), labels={"organ": 1, "lesion": 2})


def channel_keys_wrong(root: Path) -> None:
    write_json(make_valid(root), channel_names={"1": "T1", "2": "T2"})


def unsupported_file_ending(root: Path) -> None:
    write_json(make_valid(root), file_ending=".xyz")


def duplicate_label_value(root: Path) -> None:
    write_json(make_valid(root), labels={"background": 0, "organ": 1, "lesion": 1})


def numtraining_mismatch(root: Path) -> None:
    write_json(make_valid(root), numTraining=5)


# --- files present / names ------------------------------------------------------------------


def missing_channel(root: Path) -> None:
    _img(make_valid(root), chan=1).unlink()


def missing_label(root: Path) -> None:
    _lab(make_valid(root)).unlink()


def missing_test_label(root: Path) -> None:
    (make_valid(root) / "labelsTs" / "test_000.nii.gz").unlink()


def empty_dataset(root: Path) -> None:
    make_valid(root)
    for p in (root / "imagesTr").iterdir():
        p.unlink()


def missing_images_tr(root: Path) -> None:
    shutil.rmtree(make_valid(root) / "imagesTr")


def missing_labels_tr(root: Path) -> None:
    shutil.rmtree(make_valid(root) / "labelsTr")


def label_without_image(root: Path) -> None:
    save(label(0), _lab(make_valid(root), "case_099"))


def label_with_channel_suffix(root: Path) -> None:
    make_valid(root)
    _lab(root).rename(root / "labelsTr" / "case_001_0000.nii.gz")


def no_channel_suffix(root: Path) -> None:
    save(image(5), make_valid(root) / "imagesTr" / "case_003.nii.gz")


def extra_channel(root: Path) -> None:
    save(image(5), _img(make_valid(root), chan=2))


def duplicate_case_other_ending(root: Path) -> None:
    """The same case exported twice, once as .nii and once as .nii.gz."""
    make_valid(root)
    save(image(10), _img(root, "case_000", 0, ".nii"))
    save(image(11), _img(root, "case_000", 1, ".nii"))


def duplicate_label_other_ending(root: Path) -> None:
    save(label(0), _lab(make_valid(root), "case_000", ".nii"))


def case_ids_differ_in_letter_case(root: Path) -> None:
    make_valid(root)
    for c in range(2):
        save(image(c), _img(root, "CASE_000", c))
    save(label(0), _lab(root, "CASE_000"))
    write_json(root, numTraining=4)


def wrong_file_ending(root: Path) -> None:
    """Everything stored as .nii while dataset.json says .nii.gz."""
    make_valid(root)
    for sub in ("imagesTr", "labelsTr"):
        for p in list((root / sub).iterdir()):
            p.rename(p.with_name(p.name.replace(".nii.gz", ".nii")))


def label_other_ending(root: Path) -> None:
    """One label exported as .nii: its case then lacks a label."""
    make_valid(root)
    _lab(root).rename(_lab(root, ending=".nii"))


# --- unreadable files -----------------------------------------------------------------------


def truncated_gz(root: Path) -> None:
    p = _img(make_valid(root))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def truncated_label(root: Path) -> None:
    p = _lab(make_valid(root))
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: len(raw) // 2]))


def random_bytes(root: Path) -> None:
    _img(make_valid(root)).write_bytes(np.random.default_rng(0).bytes(2000))


def empty_file(root: Path) -> None:
    _img(make_valid(root)).write_bytes(b"")


# --- geometry -------------------------------------------------------------------------------


def label_shape_mismatch(root: Path) -> None:
    save(label(1, (8, 8, 7)), _lab(make_valid(root)))


def label_affine_mismatch(root: Path) -> None:
    aff = AFFINE.copy()
    aff[2, 2] = 3.0  # slice spacing 3 mm instead of 1.5
    save(label(1), _lab(make_valid(root)), aff)


def label_origin_mismatch(root: Path) -> None:
    aff = AFFINE.copy()
    aff[:3, 3] += (0.0, 5.0, 0.0)
    save(label(1), _lab(make_valid(root)), aff)


def channel_shape_mismatch(root: Path) -> None:
    save(image(1, (8, 9, 8)), _img(make_valid(root), chan=1))


def channel_affine_mismatch(root: Path) -> None:
    aff = AFFINE.copy()
    aff[0, 0] = 0.5
    save(image(1), _img(make_valid(root), chan=1), aff)


def image_2d(root: Path) -> None:
    save(image(1, (8, 8)), _img(make_valid(root)))


def single_slice(root: Path) -> None:
    """A 2D slice stored as a 3D file in an otherwise 3D dataset."""
    make_valid(root)
    for c in range(2):
        save(image(c, (8, 8, 1)), _img(root, chan=c))
    save(label(1, (8, 8, 1)), _lab(root))


def image_4d(root: Path) -> None:
    save(image(1, (8, 8, 8, 2)), _img(make_valid(root)))


# --- values ---------------------------------------------------------------------------------


def undeclared_label_values(root: Path) -> None:
    lab = label(1)
    lab[0, 0, 0], lab[7, 7, 7] = 3, 7
    save(lab, _lab(make_valid(root)))


def interpolated_label(root: Path) -> None:
    save(label(1).astype(np.float32) * 0.75, _lab(make_valid(root)))


def nan_in_image(root: Path) -> None:
    img = image(1)
    img[1, 2, 3] = np.nan
    save(img, _img(make_valid(root)))


def inf_in_image(root: Path) -> None:
    img = image(1)
    img[0, 0, :] = np.inf
    save(img, _img(make_valid(root), chan=1))


def nan_in_label(root: Path) -> None:
    lab = label(1).astype(np.float32)
    lab[0, 0, 0] = np.nan
    save(lab, _lab(make_valid(root)))


Builder = Callable[[Path], None]

BROKEN: dict[str, tuple[Builder, str]] = {
    "missing_dataset_json": (missing_dataset_json, "dataset.json: missing"),
    "invalid_json": (invalid_json, "not valid JSON"),
    "missing_labels_field": (missing_labels_field, "field 'labels'"),
    "no_background": (no_background, "background"),
    "channel_keys_wrong": (channel_keys_wrong, "field 'channel_names'"),
    "unsupported_file_ending": (unsupported_file_ending, "'.xyz' is not supported"),
    "duplicate_label_value": (duplicate_label_value, "share value 1"),
    "numtraining_mismatch": (numtraining_mismatch, "numTraining is 5 but imagesTr holds 3"),
    "missing_channel": (missing_channel, "case_001_0001.nii.gz: missing channel 1"),
    "missing_label": (missing_label, "labelsTr/case_001.nii.gz: missing label"),
    "missing_test_label": (missing_test_label, "labelsTs/test_000.nii.gz: missing label"),
    "empty_dataset": (empty_dataset, "no training cases"),
    "missing_images_tr": (missing_images_tr, "imagesTr: missing"),
    "missing_labels_tr": (missing_labels_tr, "labelsTr: missing"),
    "label_without_image": (label_without_image, "case_099.nii.gz: label without a matching"),
    "label_with_channel_suffix": (label_with_channel_suffix, "labels have no channel suffix"),
    "no_channel_suffix": (no_channel_suffix, "rename it to case_003_0000.nii.gz"),
    "extra_channel": (extra_channel, "channel 0002, but dataset.json declares 2"),
    "duplicate_case_other_ending": (duplicate_case_other_ending, "duplicate of case 'case_000'"),
    "duplicate_label_other_ending": (duplicate_label_other_ending, "duplicate label"),
    "case_ids_differ_in_letter_case": (
        case_ids_differ_in_letter_case,
        "'CASE_000' and 'case_000' differ only in letter case",
    ),
    "wrong_file_ending": (wrong_file_ending, "holds 6 .nii file(s) but dataset.json"),
    "label_other_ending": (label_other_ending, "so the label is ignored"),
    "truncated_gz": (truncated_gz, "unreadable or truncated NIfTI"),
    "truncated_label": (truncated_label, "unreadable or truncated NIfTI"),
    "random_bytes": (random_bytes, "unreadable or truncated NIfTI"),
    "empty_file": (empty_file, "unreadable or truncated NIfTI"),
    "label_shape_mismatch": (label_shape_mismatch, "shape (8, 8, 7) differs from image"),
    "label_affine_mismatch": (label_affine_mismatch, "geometry differs from image"),
    "label_origin_mismatch": (label_origin_mismatch, "origin"),
    "channel_shape_mismatch": (channel_shape_mismatch, "differs from case_001_0000.nii.gz"),
    "channel_affine_mismatch": (channel_affine_mismatch, "spacing"),
    "image_2d": (image_2d, "is 3D (shape (8, 8, 8)) but case_001_0000.nii.gz is 2D"),
    "single_slice": (single_slice, "is 2D (one slice) but the dataset's other cases are 3D"),
    "image_4d": (image_4d, "is 4D"),
    "undeclared_label_values": (undeclared_label_values, "label values {3, 7} not declared"),
    "interpolated_label": (interpolated_label, "non-integer label values"),
    "nan_in_image": (nan_in_image, "1 NaN/Inf voxel"),
    "inf_in_image": (inf_in_image, "8 NaN/Inf voxel"),
    "nan_in_label": (nan_in_label, "label contains NaN/Inf"),
}
