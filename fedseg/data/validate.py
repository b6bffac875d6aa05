"""``fedseg check-data``: find everything wrong with a site's dataset before training starts.

Why: in a federation a broken case at one hospital surfaces hours later as a crash deep inside
a training round, far from the file that caused it. The site engineer must instead get, up
front and all at once, one line per problem naming the file and the fix, e.g.::

    /data/imagesTr/case_007_0000.nii.gz: contains 12 NaN/Inf voxels; fix or remove the case

The checks follow nnU-Net v2's ``verify_dataset_integrity`` (files present, shapes and geometry
of channels and label agree, label values declared) plus what trips fedseg specifically
(2D and 3D cases not mixed, NaN/Inf, duplicate case ids, numTraining). File names are checked
in ``validate_files``, the decoded images here. :func:`validate_dataset` never raises on
bad data: everything becomes a problem line. Each case is read once and dropped, so a site
never holds its dataset in memory; progress is reported only through an optional callback so
the CLI can draw a bar and tests stay quiet.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedseg.data.dataset import DatasetJson, read_dataset_json
from fedseg.data.io import SUPPORTED_ENDINGS, io_for_ending
from fedseg.data.validate_files import check_files as _check_files
from fedseg.errors import FedsegError

Progress = Callable[[int, int], None]
"""Called as ``progress(cases_done, cases_total)`` after each case."""

AFFINE_RTOL = 1e-3  # like nnU-Net's geometry check: relative, forgiving float32 round-off


@dataclass
class _Volume:
    """What the checks need from one image file: data (C, i, j, k), affine, shape (i, j, k)."""

    data: np.ndarray
    affine: np.ndarray
    shape: tuple[int, ...]

    @property
    def is_2d(self) -> bool:
        return self.shape[2] == 1


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read(path: Path, problems: list[str]) -> _Volume | None:
    """Read one image file (any supported format); on failure add a problem line, None."""
    from fedseg.data.io import read_image

    if not path.is_file() and not path.is_symlink():
        return None  # the caller reports missing files with case context; the reader names
        # a broken or looping link (fedseg.data.io.base.open_check)
    try:
        img = read_image(path)
    except FedsegError as err:
        problems.append(_one_line(str(err), limit=400))
        return None
    except Exception as err:  # noqa: BLE001 - a reader's unexpected failure: still one line
        msg = _one_line(str(err)) or type(err).__name__
        problems.append(f"{path}: unreadable ({msg}); re-export the file from the source")
        return None
    # nibabel axis order (i, j, k) for messages, as before the readers came
    data = img.data.transpose(0, 3, 2, 1)
    return _Volume(data, img.affine, tuple(int(n) for n in data.shape[1:]))


def _affines_match(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(1.0, float(np.abs(a).max()))
    return bool(np.allclose(a, b, rtol=AFFINE_RTOL, atol=AFFINE_RTOL * scale))


def _fmt_affine_diff(a: np.ndarray, b: np.ndarray) -> str:
    sp_a = np.round(np.linalg.norm(a[:3, :3], axis=0), 4).tolist()
    sp_b = np.round(np.linalg.norm(b[:3, :3], axis=0), 4).tolist()
    if not np.allclose(sp_a, sp_b, rtol=AFFINE_RTOL):
        return f"spacing {sp_a} vs {sp_b}"
    org_a, org_b = np.round(a[:3, 3], 3).tolist(), np.round(b[:3, 3], 3).tolist()
    if not np.allclose(org_a, org_b, rtol=AFFINE_RTOL, atol=AFFINE_RTOL):
        return f"origin {org_a} vs {org_b}"
    return "direction differs"


def _check_case(
    root: Path, ds: DatasetJson, split: str, cid: str, problems: list[str],
    dims: dict[str, bool] | None = None,
) -> None:
    """Read one case (every channel and the label once) and check it; ``dims[cid]`` records
    whether it is 2D (one slice), for the dataset-wide check that 2D and 3D do not mix."""
    dims = {} if dims is None else dims
    ending = ds.file_ending
    ref: _Volume | None = None
    ref_path: Path | None = None
    multi = io_for_ending(ending).multichannel_files
    n_read = 0
    for c in range(ds.num_channels):
        path = root / f"images{split}" / f"{cid}_{c:04d}{ending}"
        if multi and c > 0 and (n_read > c or not path.is_file()):
            continue  # a multi-channel file (RGB) held this channel, or is checked below
        if not path.is_file():
            problems.append(
                f"{path}: missing channel {c} ('{ds.channel_names[str(c)]}') of case '{cid}'; "
                "add the file or remove the case's other files"
            )
            continue
        vol = _read(path, problems)
        if vol is None:
            n_read += 1
            continue
        n_read += vol.data.shape[0]
        if np.issubdtype(vol.data.dtype, np.floating):
            bad = int(vol.data.size - np.count_nonzero(np.isfinite(vol.data)))
            if bad:
                problems.append(
                    f"{path}: contains {bad} NaN/Inf voxel(s); replace them (e.g. by 0) "
                    "or remove the case"
                )
        if ref is None:
            ref, ref_path = vol, path
        elif vol.is_2d != ref.is_2d:
            problems.append(
                f"{path}: is {'2D' if vol.is_2d else '3D'} (shape {vol.shape}) but "
                f"{ref_path.name} is {'2D' if ref.is_2d else '3D'} {ref.shape}; export every "
                "channel of the case on one voxel grid"
            )
        elif vol.shape != ref.shape:
            problems.append(
                f"{path}: shape {vol.shape} differs from {ref_path.name} {ref.shape}; "
                "all channels of a case must be on one voxel grid (resample/register them)"
            )
        elif not _affines_match(vol.affine, ref.affine):
            problems.append(
                f"{path}: geometry differs from {ref_path.name} "
                f"({_fmt_affine_diff(vol.affine, ref.affine)}); all channels of a case must "
                "share one affine (resample/register them)"
            )
        del vol
    if ref is not None and n_read != ds.num_channels:
        first = root / f"images{split}" / f"{cid}_0000{ending}"
        problems.append(
            f"{first}: case '{cid}' holds {n_read} channel(s) but dataset.json declares "
            f"{ds.num_channels} ({', '.join(ds.channel_names.values())}); fix channel_names "
            "or convert the image (e.g. RGB to greyscale)"
        )
    if ref is not None:
        dims[f"images{split}/{cid}"] = ref.is_2d

    lab_dir = root / f"labels{split}"
    if split == "Ts" and not lab_dir.is_dir():
        return  # held-out labels are optional
    label_path = lab_dir / f"{cid}{ending}"
    if not label_path.is_file():
        problems.append(
            f"{label_path}: missing label of case '{cid}'; add the segmentation "
            f"or remove images{split}/{cid}_*{ending}"
        )
        return
    lab = _read(label_path, problems)
    if lab is None:
        return
    if lab.data.shape[0] != 1:
        problems.append(
            f"{label_path}: label has {lab.data.shape[0]} channels (RGB?); a label map is one "
            "greyscale channel of label values — re-export it"
        )
        return
    if ref is not None and lab.shape != ref.shape:
        problems.append(
            f"{label_path}: shape {lab.shape} differs from image {ref_path.name} {ref.shape}; "
            "the label must be on the image's voxel grid (resample it with nearest neighbour)"
        )
    elif ref is not None and not _affines_match(lab.affine, ref.affine):
        problems.append(
            f"{label_path}: geometry differs from image {ref_path.name} "
            f"({_fmt_affine_diff(lab.affine, ref.affine)}); export the label with the image's "
            "affine"
        )
    _check_label_values(label_path, lab.data[0], ds, problems)


def _check_label_values(
    path: Path, data: np.ndarray, ds: DatasetJson, problems: list[str]
) -> None:
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            problems.append(f"{path}: label contains NaN/Inf; re-export it with integer values")
            return
        values = np.unique(data)
        if not np.allclose(values, np.rint(values), atol=1e-3):
            odd = [float(v) for v in values if abs(v - round(float(v))) > 1e-3][:5]
            problems.append(
                f"{path}: non-integer label values {odd} (interpolated?); re-export the label "
                "with nearest-neighbour resampling"
            )
            return
        values = np.rint(values).astype(np.int64)
    else:
        values = np.unique(data).astype(np.int64)
    undeclared = sorted(set(values.tolist()) - set(ds.label_values))
    if undeclared:
        shown = ", ".join(str(v) for v in undeclared[:10])
        problems.append(
            f"{path}: label values {{{shown}}} not declared in dataset.json labels "
            f"(declared {ds.label_values}); declare them in 'labels' or fix the label"
        )


def _check_json_values(root: Path, ds: DatasetJson, problems: list[str]) -> None:
    """Values that parse but are still wrong."""
    path = root / "dataset.json"
    if ds.file_ending not in SUPPORTED_ENDINGS:
        problems.append(
            f"{path}: file_ending '{ds.file_ending}' is not supported; fedseg reads "
            f"{', '.join(SUPPORTED_ENDINGS)}"
        )
    seen: dict[int, str] = {}
    for name, val in ds.labels.items():
        if isinstance(val, list):  # nnU-Net region: may overlap other labels
            if any(v < 0 for v in val):
                problems.append(f"{path}: label '{name}' has a negative value; use 0..N")
            continue
        if val < 0:
            problems.append(f"{path}: label '{name}' = {val} is negative; use 0..N")
        elif val in seen:
            problems.append(
                f"{path}: labels '{seen[val]}' and '{name}' share value {val}; "
                "give each label its own integer"
            )
        seen.setdefault(val, name)
    if ds.numTraining is not None and ds.numTraining < 0:
        problems.append(f"{path}: numTraining = {ds.numTraining} is negative; fix it")


def validate_dataset(data_dir: str | Path, progress: Progress | None = None) -> list[str]:
    """Every problem of the nnU-Net v2 raw dataset in ``data_dir``, one line each.

    Each line reads ``<path>: <what is wrong>; <what to do>``. An empty list means the dataset
    is fine. Never raises on bad data.
    """
    root = Path(data_dir)
    problems: list[str] = []
    try:
        ds = read_dataset_json(root)
    except FedsegError as err:
        return [_one_line(str(err), limit=400)]
    _check_json_values(root, ds, problems)
    if ds.file_ending not in SUPPORTED_ENDINGS:
        return problems

    if not (root / "imagesTr").is_dir():
        problems.append(
            f"{root / 'imagesTr'}: missing; put the training images there "
            f"(CASE_0000{ds.file_ending})"
        )
    tr_ids = _check_files(root, ds, "Tr", problems)
    ts_ids = _check_files(root, ds, "Ts", problems) if (root / "imagesTs").is_dir() else []
    if (root / "imagesTr").is_dir() and not tr_ids:
        problems.append(
            f"{root / 'imagesTr'}: no training cases (expected files like "
            f"CASE_0000{ds.file_ending}); add the images or point to the right folder"
        )
    if tr_ids and not (root / "labelsTr").is_dir():
        problems.append(f"{root / 'labelsTr'}: missing; put one label per case there")
        return problems  # every case would repeat it
    if ds.numTraining is not None and tr_ids and ds.numTraining != len(tr_ids):
        problems.append(
            f"{root / 'dataset.json'}: numTraining is {ds.numTraining} but imagesTr holds "
            f"{len(tr_ids)} cases; set numTraining to {len(tr_ids)}"
        )

    work = [("Tr", c) for c in tr_ids] + [("Ts", c) for c in ts_ids]
    dims: dict[str, bool] = {}
    for done, (split, cid) in enumerate(work, start=1):
        try:
            _check_case(root, ds, split, cid, problems, dims)
        except MemoryError:
            problems.append(f"{root / ('images' + split)}/{cid}: too large to read; free memory")
        except (OSError, ValueError) as err:  # e.g. a file vanished or a permission error
            problems.append(f"{root / ('images' + split)}/{cid}: {_one_line(str(err))}; "
                            "check the case's files")
        if progress is not None:
            progress(done, len(work))
    _check_dims(root, ds, dims, problems)
    return problems


def _check_dims(root: Path, ds: DatasetJson, dims: dict[str, bool], problems: list[str]) -> None:
    """nnU-Net trains one dimensionality per dataset: a 2D case among 3D ones (a single slice
    exported by mistake) or the reverse is named, the minority being the odd one out."""
    n2 = sum(dims.values())
    if 0 < n2 < len(dims):
        odd_2d = n2 <= len(dims) - n2
        odd = sorted(c for c, is2 in dims.items() if is2 == odd_2d)
        what, rest = ("2D (one slice)", "3D") if odd_2d else ("3D", "2D")
        for key in odd[:10]:
            cid = key.split("/", 1)[1]
            problems.append(
                f"{root / key}_0000{ds.file_ending}: case '{cid}' is {what} but "
                f"the dataset's other cases are {rest}; export the case like the others or "
                "remove it"
            )


def summary(data_dir: str | Path) -> str:
    """The one-line description printed for a valid dataset."""
    root = Path(data_dir)
    ds = read_dataset_json(root)
    n_tr = len(_check_files(root, ds, "Tr", []))
    n_ts = len(_check_files(root, ds, "Ts", [])) if (root / "imagesTs").is_dir() else 0
    labels = ", ".join(f"{k}={v}" for k, v in ds.labels.items())
    test = f", {n_ts} test cases" if n_ts else ""
    return (
        f"OK: {root}: {n_tr} training cases{test}, {ds.num_channels} channel(s) "
        f"({', '.join(ds.channel_names.values())}), labels {labels}"
    )


def check_data_main(data_dir: str | Path, progress: Progress | None = None) -> int:
    """``fedseg check-data DIR``: print OK + summary (exit 0) or every problem (exit 1)."""
    problems = validate_dataset(data_dir, progress)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(problems)} problem(s) in {data_dir}", file=sys.stderr)
        return 1
    print(summary(data_dir))
    return 0
