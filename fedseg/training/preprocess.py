"""Preprocessing: raw case -> what the network sees, cached on the site's disk.

Why this module mirrors nnU-Net v2's ``DefaultPreprocessor`` step for step: the plan (patch size,
target spacing, normalisation) is made by nnU-Net's rules on the assumption that the data is then
preprocessed exactly this way, and prediction must invert exactly what training saw. The order is
nnU-Net's: transpose (``plan.transpose_forward``) -> crop to the non-zero region -> normalise
(BEFORE resampling, so the non-zero mask still fits the image) -> resample to the configuration's
spacing -> sample foreground locations for oversampling.

Deviations from nnU-Net (deliberate, all small):

* None in resampling any more: ``fedseg.training.resample`` follows the plan's
  ``resampling_fn_*_kwargs`` as nnU-Net does (images order 3, segmentations order 1).
* Hand-written rather than MONAI transforms because MONAI's ``Spacing`` derives the output grid
  from the affine (a different shape rule than nnU-Net's ``round(old_spacing / new_spacing *
  shape)``), ``CropForeground`` does not fill holes in the mask, and ``NormalizeIntensity``'s
  ``nonzero`` mask is not nnU-Net's hole-filled one.
* ``class_locations`` stores spatial coordinates only (nnU-Net keeps a leading channel index).
* Cases are stored as plain ``.npy`` (memory-mappable) plus a JSON of properties, not
  ``.npz``/``.pkl``: no pickle on a hospital's disk, and training reads patches without
  decompressing whole volumes.

Cache layout (read by the training loop through :class:`PreprocessedDataset`)::

    CACHE_ROOT/<plan.hash()>/plan.json
    CACHE_ROOT/<plan.hash()>/<config>/<case_id>.npy       float32 (C, *spatial), transposed axes
    CACHE_ROOT/<plan.hash()>/<config>/<case_id>_seg.npy   int8/int16 (1, *spatial); -1 = outside
                                                          the non-zero mask (nnU-Net's convention)
    CACHE_ROOT/<plan.hash()>/<config>/<case_id>.json      CaseProperties (incl. class_locations)
    CACHE_ROOT/<plan.hash()>/<config>.format              FORMAT_VERSION of every case there

Every file is written to a temporary name and renamed; the ``.json`` is renamed LAST and is the
commit marker: a case counts as cached only when its ``.json`` and both arrays exist, so a crash
never leaves a half-written case that looks valid.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ValidationError
from scipy.ndimage import binary_fill_holes

from fedseg.data.dataset import Case, list_cases, load_case, read_dataset_json
from fedseg.errors import FedsegError
from fedseg.planning.plan import Plan
from fedseg.training.resample import (  # noqa: F401  (predict and tests import them from here)
    compute_new_shape,
    resample_data,
    resample_seg,
    resample_tensor,
    separate_z_axis,
)

FORMAT_VERSION = 2  # 2: images resampled with the plan's spline order (was linear)
NUM_LOCATION_SAMPLES = 10000  # nnU-Net: at most this many voxels per class ...
MIN_LOCATION_COVERAGE = 0.01  # ... but at least 1% of the class's voxels
LOCATION_SEED = 1234  # nnU-Net's fixed seed for the foreground-location sampling

ProgressFn = Callable[[int, int], None]


class CaseProperties(BaseModel):
    """What is needed to train on a preprocessed case and to map a prediction back.

    Shapes/spacings named ``*_transposed`` and the bbox are in the plan's transposed axis order;
    ``original_*`` are in nnU-Net/SimpleITK array order (see ``fedseg.data.dataset``).
    """

    format_version: int = FORMAT_VERSION
    case_id: str
    plan_hash: str
    config: str
    original_shape: list[int]
    original_spacing: list[float]
    affine: list[list[float]]
    spacing_transposed: list[float]
    shape_before_cropping: list[int]
    bbox_used_for_cropping: list[list[int]]
    shape_after_cropping_and_before_resampling: list[int]
    target_spacing: list[float]
    shape_after_resampling: list[int]
    class_locations: dict[str, list[list[int]]] = {}


@dataclass
class PreprocessedCase:
    data: np.ndarray  # float32 (C, *spatial)
    seg: np.ndarray  # int8/int16 (1, *spatial); -1 outside the non-zero mask
    properties: CaseProperties


# --------------------------------------------------------------------------------------------
# cropping


def create_nonzero_mask(data: np.ndarray) -> np.ndarray:
    """True where any channel is non-zero, holes filled (nnU-Net's ``create_nonzero_mask``)."""
    mask = np.zeros(data.shape[1:], dtype=bool)
    for c in range(data.shape[0]):
        mask |= data[c] != 0
    return binary_fill_holes(mask)


def bbox_from_mask(mask: np.ndarray) -> list[list[int]]:
    """[[lo, hi), ...] per axis of the True region; the whole array when the mask is empty."""
    bbox = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return [[0, s] for s in mask.shape]
        bbox.append([int(hits[0]), int(hits[-1]) + 1])
    return bbox


def crop_to_nonzero(
    data: np.ndarray, seg: np.ndarray | None, nonzero_label: int = -1
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """nnU-Net's ``crop_to_nonzero``: crop to the bbox of the filled non-zero mask.

    Background voxels of ``seg`` outside the mask become ``nonzero_label`` (-1); without a
    ``seg`` one is made from the mask (0 inside, -1 outside), which z-score normalisation with
    ``use_mask_for_norm`` needs.
    """
    mask = create_nonzero_mask(data)
    bbox = bbox_from_mask(mask)
    if not mask.any():  # an all-zero image: nothing to crop, nothing to mask out
        mask[...] = True
    sl = tuple(slice(lo, hi) for lo, hi in bbox)
    data = data[(slice(None), *sl)]
    mask = mask[sl][None]
    if seg is not None:
        seg = seg[(slice(None), *sl)].copy()
        seg[(seg == 0) & ~mask] = nonzero_label
    else:
        seg = np.where(mask, 0, nonzero_label).astype(np.int8)
    return np.ascontiguousarray(data), seg, bbox


# --------------------------------------------------------------------------------------------
# normalisation


def normalize(data: np.ndarray, seg: np.ndarray, plan: Plan, config: str) -> np.ndarray:
    """Per-channel normalisation in place, nnU-Net's schemes: CT, z-score, none, rescale-to-[0,1]
    and RGB-to-[0,1] (the plan names the scheme from the channel name, as nnU-Net does)."""
    cfg = plan.config(config)
    for c in range(data.shape[0]):
        scheme = cfg.normalization_schemes[c]
        img = data[c]
        if scheme == "CTNormalization":
            props = plan.foreground_intensity_properties_per_channel.get(str(c))
            if props is None:
                raise FedsegError(
                    f"plan: channel {c} uses CTNormalization but "
                    "foreground_intensity_properties_per_channel has no entry "
                    f"'{c}'; re-make the plan"
                )
            np.clip(img, props.percentile_00_5, props.percentile_99_5, out=img)
            img -= props.mean
            img /= max(props.std, 1e-8)
        elif scheme == "NoNormalization":
            continue
        elif scheme == "RescaleTo01Normalization":  # nnU-Net: min-max of the image to [0, 1]
            lo, hi = float(img.min()), float(img.max())
            img -= lo
            img /= max(hi - lo, 1e-8)
        elif scheme == "RGBTo01Normalization":  # nnU-Net: 8-bit values to [0, 1]
            if img.min() < 0 or img.max() > 255:
                raise FedsegError(
                    f"channel {c} ('{plan.channel_names.get(str(c))}') uses RGBTo01Normalization "
                    "but has values outside 0..255; rename the channel or fix the data"
                )
            img /= 255.0
        elif cfg.use_mask_for_norm[c]:
            mask = seg[0] >= 0
            vals = img[mask]
            mean, std = (float(vals.mean()), float(vals.std())) if vals.size else (0.0, 1.0)
            img[mask] = (vals - mean) / max(std, 1e-8)
        else:
            mean, std = float(img.mean()), float(img.std())
            img -= mean
            img /= max(std, 1e-8)
    return data


# --------------------------------------------------------------------------------------------
# foreground locations


def foreground_label_groups(plan: Plan) -> dict[str, list[int]]:
    """Key -> label values, for every foreground label (a region's values are OR-ed)."""
    out: dict[str, list[int]] = {}
    for name, val in plan.labels.items():
        vals = val if isinstance(val, list) else [val]
        if vals == [0] or name == "ignore":  # nnU-Net never oversamples unlabelled voxels
            continue
        out[",".join(str(v) for v in vals)] = list(vals)
    return out


def sample_class_locations(
    seg: np.ndarray, groups: dict[str, list[int]], seed: int = LOCATION_SEED
) -> dict[str, list[list[int]]]:
    """nnU-Net's ``_sample_foreground_locations``: up to 10000 voxels per class (>= 1%), seeded.

    Returns spatial coordinates (no channel index) per class key.
    """
    rng = np.random.RandomState(seed)
    out: dict[str, list[list[int]]] = {}
    for key, vals in groups.items():
        locs = np.argwhere(np.isin(seg[0], vals))
        if len(locs) == 0:
            out[key] = []
            continue
        n = min(NUM_LOCATION_SAMPLES, len(locs))
        n = max(n, int(math.ceil(len(locs) * MIN_LOCATION_COVERAGE)))
        out[key] = locs[rng.choice(len(locs), n, replace=False)].tolist()
    return out


# --------------------------------------------------------------------------------------------
# one case


def config_target_spacing(plan: Plan, config: str, spacing_transposed: list[float]) -> list[float]:
    """The configuration's spacing; a 2d configuration keeps the first axis's own spacing."""
    target = list(plan.config(config).spacing)
    if len(target) < len(spacing_transposed):
        target = [spacing_transposed[0], *target]
    return target


def preprocess_case(case: Case, plan: Plan, config: str | None = None) -> PreprocessedCase:
    """Transpose, crop, normalise, resample one case (with or without label) per the plan
    (``config`` None: the plan's default configuration)."""
    config = config or plan.default_configuration
    cfg = plan.config(config)
    n_chan = len(plan.channel_names)
    if case.image.shape[0] != n_chan:
        raise FedsegError(
            f"case {case.case_id}: {case.image.shape[0]} channel(s) but the plan expects "
            f"{n_chan} ({', '.join(plan.channel_names.values())}); give one file per channel"
        )
    if len(cfg.normalization_schemes) != n_chan or len(cfg.use_mask_for_norm) != n_chan:
        raise FedsegError(
            f"plan: configuration '{config}' lists normalisation for "
            f"{len(cfg.normalization_schemes)} channel(s), the plan has {n_chan}; re-make the plan"
        )
    tf = list(plan.transpose_forward)
    data = case.image.astype(np.float32, copy=True).transpose([0, *[i + 1 for i in tf]])
    seg = None
    if case.label is not None:
        if case.label.shape[1:] != case.image.shape[1:]:
            raise FedsegError(
                f"case {case.case_id}: label shape {case.label.shape[1:][::-1]} differs from the "
                f"image's {case.image.shape[1:][::-1]}; the label must be on the image's grid"
            )
        seg = case.label.astype(np.int16, copy=True).transpose([0, *[i + 1 for i in tf]])
    spacing_t = [float(case.spacing[i]) for i in tf]
    shape_before = list(data.shape[1:])

    data, seg, bbox = crop_to_nonzero(np.ascontiguousarray(data), seg)
    shape_cropped = list(data.shape[1:])

    target = config_target_spacing(plan, config, spacing_t)
    new_shape = compute_new_shape(shape_cropped, spacing_t, target)
    data = normalize(data, seg, plan, config)
    data = resample_data(data, new_shape, spacing_t, target, cfg.resampling_fn_data_kwargs)
    seg = resample_seg(seg, new_shape, spacing_t, target, cfg.resampling_fn_seg_kwargs)

    locations: dict[str, list[list[int]]] = {}
    if case.label is not None:
        locations = sample_class_locations(seg, foreground_label_groups(plan))
    seg = seg.astype(np.int16 if seg.max(initial=0) > 127 else np.int8)

    props = CaseProperties(
        case_id=case.case_id,
        plan_hash=plan.hash(),
        config=config,
        original_shape=list(case.image.shape[1:]),
        original_spacing=[float(s) for s in case.spacing],
        affine=np.asarray(case.affine, dtype=float).tolist(),
        spacing_transposed=spacing_t,
        shape_before_cropping=shape_before,
        bbox_used_for_cropping=bbox,
        shape_after_cropping_and_before_resampling=shape_cropped,
        target_spacing=target,
        shape_after_resampling=list(data.shape[1:]),
        class_locations=locations,
    )
    return PreprocessedCase(np.ascontiguousarray(data, dtype=np.float32), seg, props)


# --------------------------------------------------------------------------------------------
# the cache


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def case_paths(folder: Path, case_id: str) -> tuple[Path, Path, Path]:
    """(data .npy, seg .npy, properties .json) of a cached case."""
    return folder / f"{case_id}.npy", folder / f"{case_id}_seg.npy", folder / f"{case_id}.json"


def is_cached(folder: Path, case_id: str) -> bool:
    return all(p.is_file() for p in case_paths(folder, case_id))


def save_preprocessed(folder: Path, pc: PreprocessedCase) -> None:
    """Write one case atomically; the .json goes last and marks the case complete."""
    data_p, seg_p, json_p = case_paths(folder, pc.properties.case_id)
    json_p.unlink(missing_ok=True)  # invalidate first: a rewrite must not look complete midway
    _atomic_save_npy(data_p, pc.data)
    _atomic_save_npy(seg_p, pc.seg)
    _atomic_write_text(json_p, pc.properties.model_dump_json() + "\n")


def cache_folder(cache_root: str | Path, plan: Plan, config: str | None = None) -> Path:
    return Path(cache_root) / plan.hash() / (config or plan.default_configuration)


def preprocess_dataset(
    data_dir: str | Path,
    plan: Plan,
    cache_root: str | Path,
    config: str | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Preprocess every training case of a site into the plan-keyed cache; returns the folder.

    Cases already cached (complete) are skipped, so re-running after a crash or in a later
    round costs only the directory listing. ``progress(done, total)`` is called after each case.
    """
    config = config or plan.default_configuration
    plan.trainable_config(config)  # clear error for a missing or untrainable configuration
    ds = read_dataset_json(data_dir)
    if ds.num_channels != len(plan.channel_names):
        raise FedsegError(
            f"{Path(data_dir) / 'dataset.json'}: {ds.num_channels} channel(s), the plan was made "
            f"for {len(plan.channel_names)}; use the plan made for this dataset"
        )
    cases = list_cases(data_dir, ds, "Tr")
    if not cases:
        raise FedsegError(
            f"{Path(data_dir) / 'imagesTr'}: no cases found (expected CASE_0000{ds.file_ending})"
        )
    folder = cache_folder(cache_root, plan, config)
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder.parent / "plan.json"
    if not plan_file.is_file():
        _atomic_write_text(plan_file, json.dumps(plan.model_dump(mode="json"), indent=2) + "\n")
    # cases written by an older fedseg (same plan hash, other preprocessing) are redone: their
    # commit markers go first, the format marker is written once every case is current
    format_marker = folder.parent / f"{folder.name}.format"
    current = format_marker.is_file() and format_marker.read_text().strip() == str(FORMAT_VERSION)
    if not current:
        for stale in folder.glob("*.json"):
            stale.unlink()
    for i, files in enumerate(cases):
        if not is_cached(folder, files.case_id):
            if files.label is None or not files.label.is_file():
                raise FedsegError(
                    f"{files.label}: missing label for training case {files.case_id}; "
                    "add it to labelsTr or remove the case's images"
                )
            pc = preprocess_case(load_case(files, with_label=True, num_channels=ds.num_channels),
                                 plan, config)
            save_preprocessed(folder, pc)
        if progress is not None:
            progress(i + 1, len(cases))
    if not current:
        _atomic_write_text(format_marker, f"{FORMAT_VERSION}\n")
    return folder


class PreprocessedDataset:
    """Reads a preprocessed cache folder (as returned by :func:`preprocess_dataset`).

    Arrays are memory-mapped by default, so a data loader touches only the patches it crops.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FedsegError(
                f"{self.folder}: no preprocessed data here; run preprocessing for this plan first"
            )
        self.case_ids = sorted(
            p.stem for p in self.folder.glob("*.json") if is_cached(self.folder, p.stem)
        )

    def __len__(self) -> int:
        return len(self.case_ids)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.case_ids

    def properties(self, case_id: str) -> CaseProperties:
        path = case_paths(self.folder, case_id)[2]
        try:
            return CaseProperties.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise FedsegError(f"{path}: missing; case '{case_id}' is not preprocessed") from None
        except ValidationError as err:
            raise FedsegError(
                f"{path}: invalid properties ({err.errors()[0]['msg']}); delete it and "
                "preprocess again"
            ) from None

    def load(
        self, case_id: str, mmap: bool = True
    ) -> tuple[np.ndarray, np.ndarray, CaseProperties]:
        """(data float32 (C, ...), seg int8/int16 (1, ...), properties) of one case."""
        props = self.properties(case_id)
        data_p, seg_p, _ = case_paths(self.folder, case_id)
        mode = "r" if mmap else None
        return np.load(data_p, mmap_mode=mode), np.load(seg_p, mmap_mode=mode), props

    def class_locations(self, case_id: str) -> dict[str, np.ndarray]:
        """Class key -> (N, ndim) int array of sampled voxel coordinates (may be empty)."""
        props = self.properties(case_id)
        ndim = len(props.shape_after_resampling)
        return {
            k: np.asarray(v, dtype=np.int64).reshape(-1, ndim)
            for k, v in props.class_locations.items()
        }
