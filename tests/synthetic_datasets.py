"""Deterministic synthetic datasets that exercise nnU-Net's planning rules.

Why: the planner must reproduce nnU-Net v2's plan on data whose plans differ in the ways that
matter — an anisotropic CT dataset (10th-percentile target spacing, transpose, CTNormalization
with integer HU statistics) and a large two-channel MRI dataset (patch-size reduction under the
8 GB budget, use_mask_for_norm False). ``tools/make_nnunet_goldens.py`` writes them, runs the
real nnU-Net on the pooled sites and stores its plans; ``tests/test_planner.py`` rebuilds them
and checks fedseg's plan from the SUM of per-site fingerprints. Both import this file, so the
data are the same bytes.

Every case is drawn from ``numpy.random.default_rng([SEED, dataset, site, case])``; volumes are
built from cheap separable shapes (no filtering), stored as int16 (integer intensities, small
files, exactly the same float32 values for nnU-Net's SimpleITK and fedseg's nibabel reader).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

SEED = 20261124
ENDING = ".nii.gz"
LABELS = {"background": 0, "organ": 1, "tumor": 2}


@dataclass(frozen=True)
class SynthCase:
    """One case in NIBABEL order (i, j, k): channels, label, spacing (si, sj, sk)."""

    site: str
    case_id: str
    channels: tuple[np.ndarray, ...]
    label: np.ndarray
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class SynthDataset:
    name: str
    dataset_id: int  # nnU-Net's DatasetXXX number for the golden
    channel_names: dict[str, str]
    sites: dict[str, int]  # site -> number of cases
    kind: str

    def cases(self, site: str | None = None) -> Iterator[SynthCase]:
        for s_idx, (s, n) in enumerate(self.sites.items()):
            if site is not None and s != site:
                continue
            for c in range(n):
                rng = np.random.default_rng([SEED, self.dataset_id, s_idx, c])
                yield _BUILDERS[self.kind](rng, s, f"{s}_{c:03d}")


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1] per axis, broadcastable."""
    return tuple(  # type: ignore[return-value]
        np.linspace(-1, 1, n).reshape([-1 if a == i else 1 for a in range(3)])
        for i, n in enumerate(shape)
    )


def _ellipsoid(coords: tuple[np.ndarray, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, center, radii, strict=True)) < 1.0


def _aniso_ct(rng: np.random.Generator, site: str, case_id: str) -> SynthCase:
    """CT, 3-5 mm along nibabel axis i (so nnU-Net transposes), 0.6-0.8 mm in-plane.

    Air (-1000) outside an elliptic body, a zero-padded margin around the field of view (so
    cropping matters), soft tissue ~40 HU, organ ~80 HU, tumour ~30 HU with calcifications.
    """
    thick = float(rng.choice([3.0, 3.5, 4.0, 4.5, 5.0]))
    inplane = round(float(rng.uniform(0.6, 0.8)), 3)
    shape = (int(rng.integers(12, 21)), int(rng.integers(96, 129)), int(rng.integers(96, 129)))
    x, y, z = _grid(shape)
    img = np.full(shape, -1000.0)
    body = _ellipsoid((y, z), rng.uniform(-0.05, 0.05, 2), rng.uniform(0.75, 0.95, 2))
    body = np.broadcast_to(body, shape)
    img[body] = rng.normal(40, 15, shape)[body]
    organ = _ellipsoid((x, y, z), rng.uniform(-0.1, 0.1, 3), rng.uniform([0.6, 0.3, 0.3],
                                                                           [0.9, 0.45, 0.45]))
    tumor = _ellipsoid((x, y, z), rng.uniform(-0.1, 0.1, 3) + [0, 0.15, 0],
                       rng.uniform([0.3, 0.08, 0.08], [0.5, 0.18, 0.18]))
    organ &= body
    tumor &= body
    img[organ] = rng.normal(80, 20, shape)[organ]
    img[tumor] = rng.normal(30, 25, shape)[tumor]
    calc = tumor & (rng.random(shape) < 0.02)
    img[calc] = rng.uniform(300, 1200, shape)[calc]
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[tumor] = 2
    m = rng.integers(0, 7, 4)  # zero padding outside the scanner's field of view
    img[:, : m[0]] = 0
    img[:, shape[1] - m[1] :] = 0
    img[:, :, : m[2]] = 0
    img[:, :, shape[2] - m[3] :] = 0
    ct = np.rint(img).astype(np.int16)
    return SynthCase(site, case_id, (ct,), label, (thick, inplane, inplane))


def _big_mri(rng: np.random.Generator, site: str, case_id: str) -> SynthCase:
    """Two MRI channels (T2, ADC), ~150-180 voxels per axis at 1.0-1.3 mm: a median shape
    larger than nnU-Net's 8 GB patch budget, so the patch-size reduction loop runs. The body
    fills most of the field of view (median relative size after cropping > 0.75)."""
    sp = round(float(rng.uniform(1.0, 1.3)), 2)
    spacing = (sp, sp, round(sp * float(rng.uniform(1.0, 1.25)), 2))
    shape = tuple(int(v) for v in rng.integers(150, 181, 3))
    x, y, z = _grid(shape)  # type: ignore[arg-type]
    body = _ellipsoid((x, y, z), np.zeros(3), rng.uniform(1.15, 1.3, 3))
    organ = _ellipsoid((x, y, z), rng.uniform(-0.1, 0.1, 3), rng.uniform(0.25, 0.4, 3))
    tumor = _ellipsoid((x, y, z), rng.uniform(-0.1, 0.1, 3) + [0.2, 0, 0],
                       rng.uniform(0.06, 0.12, 3))
    ramp = (x + 2 * y + 3 * z).astype(np.float32)  # smooth, cheap "bias field"
    t2 = np.where(body, 300 + 20 * ramp, 0).astype(np.float32)
    adc = np.where(body, 900 - 30 * ramp, 0).astype(np.float32)
    t2 = np.where(organ, 500 + 10 * ramp, t2)
    adc = np.where(organ, 1400 + 15 * ramp, adc)
    t2 = np.where(tumor, 700 + 25 * ramp, t2)
    adc = np.where(tumor, 600 + 5 * ramp, adc)
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[tumor] = 2
    noise = rng.integers(-3, 4, (2, *shape), dtype=np.int16)
    t2i = (np.rint(t2).astype(np.int16) + noise[0]) * body
    adci = (np.rint(adc).astype(np.int16) + noise[1]) * body
    return SynthCase(site, case_id, (t2i.astype(np.int16), adci.astype(np.int16)), label,
                     spacing)  # type: ignore[arg-type]


_BUILDERS = {"aniso_ct": _aniso_ct, "big_mri": _big_mri}

DATASETS: dict[str, SynthDataset] = {
    "aniso_ct": SynthDataset(
        "aniso_ct", 2, {"0": "CT"}, {"siteA": 7, "siteB": 5}, "aniso_ct"
    ),
    "big_mri": SynthDataset(
        "big_mri", 3, {"0": "T2", "1": "ADC"}, {"siteA": 3, "siteB": 2}, "big_mri"
    ),
}


def write_case(case: SynthCase, root: Path) -> None:
    """Write one case into ``root/imagesTr`` and ``root/labelsTr`` (nnU-Net raw layout)."""
    affine = np.diag([*case.spacing, 1.0])
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for c, arr in enumerate(case.channels):
        nib.save(nib.Nifti1Image(arr, affine), str(root / "imagesTr" / f"{case.case_id}_{c:04d}{ENDING}"))
    nib.save(nib.Nifti1Image(case.label, affine), str(root / "labelsTr" / f"{case.case_id}{ENDING}"))


def write_dataset_json(root: Path, ds: SynthDataset, num_training: int, name: str) -> None:
    meta = {
        "name": name,
        "channel_names": ds.channel_names,
        "labels": LABELS,
        "numTraining": num_training,
        "file_ending": ENDING,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def write_sites(name: str, root: Path) -> list[Path]:
    """Write every site of dataset ``name`` to ``root/<site>``; returns the site folders."""
    ds = DATASETS[name]
    dirs = []
    for site, n in ds.sites.items():
        d = root / site
        for case in ds.cases(site):
            write_case(case, d)
        write_dataset_json(d, ds, n, f"{name}-{site}")
        dirs.append(d)
    return dirs


def nnunet_order(case: SynthCase) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image (C, k, j, i) float32, label (1, k, j, i), spacing (sk, sj, si)) exactly as
    ``fedseg.data.dataset.load_case`` would return them after a NIfTI round trip (spacings
    stored as float32 in the header)."""
    img = np.stack([np.ascontiguousarray(c.transpose(2, 1, 0)) for c in case.channels])
    lab = np.ascontiguousarray(case.label.transpose(2, 1, 0))[None].astype(np.int16)
    sp = tuple(float(np.float32(s)) for s in case.spacing[::-1])
    return img.astype(np.float32), lab, sp  # type: ignore[return-value]


# ---- large_ct: nnU-Net's fingerprint lists only (no images) -----------------------------

LARGE_CT_CHANNELS = {"0": "CT"}
LARGE_CT_GPU_TARGETS = [8.0, 4.0, 24.0]
LARGE_CT: dict[str, list[dict]] = {
    # per site, per case: spacing and cropped shape in nnU-Net array order (z, y, x), the
    # spacings float32 values as a NIfTI header holds them; relative size after cropping
    "siteA": [
        {"spacing": [0.8, 0.78125, 0.78125], "shape_after_crop": [320, 320, 320],
         "relative_size": 1.0},
        {"spacing": [0.75, 0.8203125, 0.8203125], "shape_after_crop": [300, 330, 318],
         "relative_size": 0.93},
    ],
    "siteB": [
        {"spacing": [0.8, 0.7421875, 0.7421875], "shape_after_crop": [336, 312, 324],
         "relative_size": 0.88},
        {"spacing": [1.0, 0.80078125, 0.80078125], "shape_after_crop": [290, 322, 316],
         "relative_size": 1.0},
    ],
}
"""Why no images: four 320^3 CT volumes are 130 M voxels to write and read for what the planner
needs — spacing, cropped shape and relative size per case — so ``tools/make_nnunet_goldens.py``
writes these lists straight into nnU-Net's ``dataset_fingerprint.json`` (as for the random
fingerprints) and ``tests/test_planner.py`` builds fedseg's fingerprints from the same lists.
nnU-Net makes 3d_lowres and 3d_cascade_fullres for it at 8 and 4 GB; at 24 GB its lowres search
runs but the lowres median image is not 2x smaller than fullres', so it is dropped."""


def large_ct_lists(site: str | None = None) -> tuple[list, list, list, list[str]]:
    """(spacings, shapes_after_crop, relative_sizes, case ids) of one site or of all sites."""
    sp, sh, rel, ids = [], [], [], []
    for s, cases in LARGE_CT.items():
        if site is not None and s != site:
            continue
        for i, c in enumerate(cases):
            sp.append([float(np.float32(v)) for v in c["spacing"]])
            sh.append(list(c["shape_after_crop"]))
            rel.append(float(c["relative_size"]))
            ids.append(f"{s}_{i:03d}")
    return sp, sh, rel, ids
