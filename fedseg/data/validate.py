"""``fedseg check-data``: find everything wrong with a site's dataset before training starts.

Why: in a federation a broken case at one hospital surfaces hours later as a crash deep inside
a training round, far from the file that caused it. The site engineer must instead get, up
front and all at once, one line per problem naming the file and the fix, e.g.::

    /data/imagesTr/case_007_0000.nii.gz: contains 12 NaN/Inf voxels; fix or remove the case

The checks follow nnU-Net v2's ``verify_dataset_integrity`` (files present, shapes and geometry
of channels and label agree, label values declared) plus what trips fedseg specifically
(3D only, NaN/Inf, duplicate case ids, numTraining). :func:`validate_dataset` never raises on
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
from fedseg.errors import FedsegError

Progress = Callable[[int, int], None]
"""Called as ``progress(cases_done, cases_total)`` after each case."""

NIFTI_ENDINGS = (".nii.gz", ".nii")
AFFINE_RTOL = 1e-3  # like nnU-Net's geometry check: relative, forgiving float32 round-off


@dataclass
class _Volume:
    """What the checks need from one NIfTI file (nibabel axis order)."""

    data: np.ndarray
    affine: np.ndarray
    shape: tuple[int, ...]


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _other_ending(name: str, ending: str) -> str | None:
    """The NIfTI ending of ``name`` if it is one other than the dataset's ``ending``."""
    for other in NIFTI_ENDINGS:
        if other != ending and name.endswith(other) and not name.endswith(ending):
            return other
    return None


def _split_channel(stem: str) -> tuple[str, int] | None:
    """``"case_0001" -> ("case", 1)``; None without a ``_XXXX`` channel suffix."""
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        return stem[:-5], int(stem[-4:])
    return None


def _read(path: Path, problems: list[str]) -> _Volume | None:
    """Read one NIfTI fully; on failure add a problem line and return None."""
    import nibabel as nib

    if not path.is_file():
        return None  # the caller reports missing files with case context
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel/gzip/zlib raise many types for corrupt or cut files
        msg = _one_line(str(err)) or type(err).__name__
        problems.append(
            f"{path}: unreadable or truncated NIfTI ({msg}); re-export the file from the source"
        )
        return None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        problems.append(
            f"{path}: is 4D (shape {data.shape}); store one 3D file per channel "
            "(CASE_0000, CASE_0001, ...) and declare the channels in dataset.json"
        )
        return None
    if data.ndim != 3 or min(data.shape) == 1:
        problems.append(
            f"{path}: is 2D (shape {data.shape}), fedseg trains 3D volumes; "
            "export the whole volume as one 3D NIfTI or drop the case"
        )
        return None
    return _Volume(data, affine, tuple(int(n) for n in data.shape))


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


def _check_files(
    root: Path, ds: DatasetJson, split: str, problems: list[str]
) -> list[str]:
    """Check file names of ``images{split}``/``labels{split}``; return the sorted case ids."""
    ending = ds.file_ending
    img_dir, lab_dir = root / f"images{split}", root / f"labels{split}"
    ids: set[str] = set()
    channels: dict[str, set[int]] = {}
    stray: list[tuple[Path, str, str | None]] = []  # (file, other ending, case id)
    for p in sorted(img_dir.iterdir()) if img_dir.is_dir() else []:
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.name.endswith(ending):
            parsed = _split_channel(p.name[: -len(ending)])
            if parsed is None:
                stem = p.name[: -len(ending)]
                problems.append(
                    f"{p}: no channel suffix; rename it to {stem}_0000{ending} "
                    "(nnU-Net names image files CASE_XXXX with XXXX the channel index)"
                )
                continue
            cid, chan = parsed
            ids.add(cid)
            channels.setdefault(cid, set()).add(chan)
            if chan >= ds.num_channels:
                problems.append(
                    f"{p}: channel {chan:04d}, but dataset.json declares {ds.num_channels} "
                    f"channel(s); remove the file or add the channel to channel_names"
                )
        elif (other := _other_ending(p.name, ending)) is not None:
            parsed = _split_channel(p.name[: -len(other)])
            stray.append((p, other, parsed[0] if parsed else None))
    if stray and not ids:  # the whole folder uses another ending: one line, not one per file
        other = stray[0][1]
        problems.append(
            f"{img_dir}: holds {len(stray)} {other} file(s) but dataset.json file_ending is "
            f"{ending}; set file_ending to \"{other}\" (or convert the files)"
        )
        return []
    for p, other, cid in stray:
        if cid is not None and cid in ids:
            problems.append(
                f"{p}: duplicate of case '{cid}' (also stored with ending {ending}); "
                "remove one of the two copies"
            )
        else:
            problems.append(
                f"{p}: file ending {other} differs from dataset.json file_ending {ending}, "
                f"so the file is ignored; convert/rename it to {ending} or fix file_ending"
            )
    _check_case_collisions(img_dir, ids, problems)

    if lab_dir.is_dir() and ids:  # without images, the folder-level line says it all
        label_ids: set[str] = set()
        for p in sorted(lab_dir.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            if p.name.endswith(ending):
                cid = p.name[: -len(ending)]
                label_ids.add(cid)
                if cid not in ids:
                    parsed = _split_channel(cid)
                    hint = (
                        f"rename it to {parsed[0]}{ending} (labels have no channel suffix)"
                        if parsed and parsed[0] in ids
                        else f"add images{split}/{cid}_0000{ending} or remove the label"
                    )
                    problems.append(f"{p}: label without a matching image; {hint}")
            elif (other := _other_ending(p.name, ending)) is not None:
                cid = p.name[: -len(other)]
                if (lab_dir / f"{cid}{ending}").is_file():
                    problems.append(
                        f"{p}: duplicate label of case '{cid}' (also stored with ending "
                        f"{ending}); remove one of the two copies"
                    )
                else:
                    problems.append(
                        f"{p}: file ending {other} differs from dataset.json file_ending "
                        f"{ending}, so the label is ignored; convert/rename it to {ending}"
                    )
        _check_case_collisions(lab_dir, label_ids, problems)
    return sorted(ids)


def _check_case_collisions(folder: Path, ids: set[str], problems: list[str]) -> None:
    """Case ids that differ only in letter case collide on Windows/macOS file systems."""
    by_lower: dict[str, list[str]] = {}
    for cid in ids:
        by_lower.setdefault(cid.lower(), []).append(cid)
    for group in by_lower.values():
        if len(group) > 1:
            names = " and ".join(f"'{c}'" for c in sorted(group))
            problems.append(
                f"{folder}: case ids {names} differ only in letter case (duplicates on "
                "Windows/macOS); rename one of them"
            )


def _check_case(
    root: Path, ds: DatasetJson, split: str, cid: str, problems: list[str]
) -> None:
    """Read one case (every channel and the label once) and check it."""
    ending = ds.file_ending
    ref: _Volume | None = None
    ref_path: Path | None = None
    for c in range(ds.num_channels):
        path = root / f"images{split}" / f"{cid}_{c:04d}{ending}"
        if not path.is_file():
            problems.append(
                f"{path}: missing channel {c} ('{ds.channel_names[str(c)]}') of case '{cid}'; "
                "add the file or remove the case's other files"
            )
            continue
        vol = _read(path, problems)
        if vol is None:
            continue
        if np.issubdtype(vol.data.dtype, np.floating):
            bad = int(vol.data.size - np.count_nonzero(np.isfinite(vol.data)))
            if bad:
                problems.append(
                    f"{path}: contains {bad} NaN/Inf voxel(s); replace them (e.g. by 0) "
                    "or remove the case"
                )
        if ref is None:
            ref, ref_path = vol, path
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
    _check_label_values(label_path, lab.data, ds, problems)


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
    if ds.file_ending not in NIFTI_ENDINGS:
        problems.append(
            f"{path}: file_ending '{ds.file_ending}' is not supported; fedseg reads NIfTI, "
            "use \".nii.gz\" or \".nii\""
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
    if ds.file_ending not in NIFTI_ENDINGS:
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
    for done, (split, cid) in enumerate(work, start=1):
        try:
            _check_case(root, ds, split, cid, problems)
        except MemoryError:
            problems.append(f"{root / ('images' + split)}/{cid}: too large to read; free memory")
        except (OSError, ValueError) as err:  # e.g. a file vanished or a permission error
            problems.append(f"{root / ('images' + split)}/{cid}: {_one_line(str(err))}; "
                            "check the case's files")
        if progress is not None:
            progress(done, len(work))
    return problems


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
