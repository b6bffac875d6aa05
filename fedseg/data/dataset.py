"""A site's dataset in nnU-Net v2's raw layout, read through ``fedseg.data.io``.

Layout (nnU-Net v2 "raw"): ``DIR/dataset.json`` with ``channel_names``, ``labels``,
``file_ending`` (and optionally ``numTraining``); ``DIR/imagesTr/CASE_XXXX<ending>`` (one file
per channel, XXXX the 4-digit channel index) and ``DIR/labelsTr/CASE<ending>``; optional
``DIR/imagesTs/``.

Axis order. nnU-Net v2 reads NIfTI through SimpleITK, whose arrays are indexed (k, j, i) — the
reverse of nibabel's (i, j, k) — with the spacing reversed accordingly. fedseg's plans must be
the ones nnU-Net makes (tie-breaks in the planner depend on the axis order), so every array that
leaves this module is in nnU-Net's order: ``image[c, k, j, i]`` with ``spacing = (sk, sj, si)``.
:func:`to_nibabel_order` undoes it when writing predictions.

Reading is deliberately cheap to call again: the validator, the fingerprint and preprocessing
each read a case once and drop it, so a site never holds its whole dataset in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from fedseg.data.dataset_json import DatasetJson
from fedseg.errors import FedsegError, first_error


@dataclass(frozen=True)
class CaseFiles:
    """Where one case's files are (paths may not exist: the validator reports that)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass
class Case:
    """One case in memory, nnU-Net axis order (see module docstring)."""

    case_id: str
    image: np.ndarray  # float32, (C, k, j, i)
    label: np.ndarray | None  # int16, (1, k, j, i)
    spacing: tuple[float, float, float]  # (sk, sj, si) in mm
    affine: np.ndarray  # 4x4 affine of channel 0 as stored (nibabel convention)


def read_dataset_json(data_dir: str | Path) -> DatasetJson:
    """Parse and validate ``DIR/dataset.json``; raise :class:`FedsegError` with one clear line."""
    path = Path(data_dir) / "dataset.json"
    if not Path(data_dir).is_dir():
        raise FedsegError(f"{data_dir}: not a directory; give the folder that holds dataset.json")
    if not path.is_file():
        raise FedsegError(f"{path}: missing; every site folder needs nnU-Net's dataset.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedsegError(f"{path}: not valid JSON ({err}); fix the file") from None
    try:
        return DatasetJson.model_validate(raw)
    except ValidationError as err:
        field, msg = first_error(err)
        raise FedsegError(
            f"{path}: field '{field}': {msg}; fix dataset.json (nnU-Net v2 format)"
        ) from None


def list_cases(data_dir: str | Path, ds: DatasetJson, split: str = "Tr") -> list[CaseFiles]:
    """Cases of ``imagesTr`` (split="Tr") or ``imagesTs`` (split="Ts"), sorted by case id.

    A case id is every file name in the images folder with the ``_XXXX<ending>`` suffix removed.
    The expected channel files and label are listed even when missing, so that the validator can
    say exactly which file is absent. Formats whose files may hold several channels (RGB PNG)
    list the channel files that exist: the channel count is then checked on the decoded data.
    """
    from fedseg.data.io import io_for_ending

    root = Path(data_dir)
    img_dir = root / f"images{split}"
    if not img_dir.is_dir():
        return []
    ending = ds.file_ending
    found: dict[str, set[int]] = {}
    for p in img_dir.iterdir():
        name = p.name
        if not name.endswith(ending):
            continue
        stem = name[: -len(ending)]
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            found.setdefault(stem[:-5], set()).add(int(stem[-4:]))
    multi = io_for_ending(ending).multichannel_files
    cases = []
    for cid in sorted(found):
        chans = sorted(found[cid]) if multi else range(ds.num_channels)
        images = tuple(img_dir / f"{cid}_{c:04d}{ending}" for c in chans)
        label = root / f"labels{split}" / f"{cid}{ending}" if split == "Tr" else None
        cases.append(CaseFiles(cid, images, label))
    return cases


def to_nnunet_order(arr: np.ndarray) -> np.ndarray:
    """nibabel (i, j, k) -> nnU-Net/SimpleITK (k, j, i)."""
    return np.ascontiguousarray(arr.transpose(2, 1, 0))


def to_nibabel_order(arr: np.ndarray) -> np.ndarray:
    """nnU-Net/SimpleITK (k, j, i) -> nibabel (i, j, k)."""
    return np.ascontiguousarray(arr.transpose(2, 1, 0))


def load_image(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read one image file of any supported format: ((C, k, j, i), spacing, affine)."""
    from fedseg.data.io import read_image

    img = read_image(Path(path))
    return img.data, img.spacing, img.affine


def load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read one single-channel file (a label, or a channel): ((k, j, i), spacing, affine).

    Named for the format fedseg first read; any supported format is accepted. Raises
    :class:`FedsegError` naming the file for anything the reader cannot decode."""
    data, spacing, affine = load_image(path)
    if data.shape[0] != 1:
        raise FedsegError(
            f"{path}: holds {data.shape[0]} channels where one is expected (a label map is "
            "a single greyscale channel); re-export it as one channel"
        )
    return data[0], spacing, affine


def load_case(files: CaseFiles, with_label: bool = True,
              num_channels: int | None = None) -> Case:
    """Load every channel (and the label) of a case; channel shapes must agree.

    ``num_channels``: the dataset's channel count, checked against what the files hold (an RGB
    PNG where dataset.json declares one channel is refused here, naming the file)."""
    chans: list[np.ndarray] = []
    spacing: tuple[float, float, float] | None = None
    affine: np.ndarray | None = None
    for path in files.images:
        arr, sp, aff = load_image(path)
        if chans and arr.shape[1:] != chans[0].shape[1:]:
            raise FedsegError(
                f"{path}: shape {arr.shape[1:][::-1]} differs from channel 0 "
                f"({chans[0].shape[1:][::-1]}); all channels of a case must have one grid"
            )
        chans.append(arr.astype(np.float32, copy=False))
        if spacing is None:
            spacing, affine = sp, aff
    assert spacing is not None and affine is not None
    image = np.concatenate(chans) if len(chans) > 1 else chans[0]
    if num_channels is not None and image.shape[0] != num_channels:
        raise FedsegError(
            f"{files.images[0]}: case '{files.case_id}' holds {image.shape[0]} channel(s), "
            f"dataset.json declares {num_channels}; fix channel_names or the image"
        )
    label = None
    if with_label and files.label is not None:
        lab, _, _ = load_nifti(files.label)
        if lab.shape != image.shape[1:]:
            raise FedsegError(
                f"{files.label}: shape {lab.shape[::-1]} differs from the image's "
                f"{image.shape[1:][::-1]}; the label must be on the image's grid"
            )
        label = np.rint(lab).astype(np.int16)[None]
    return Case(files.case_id, image, label, spacing, affine)
