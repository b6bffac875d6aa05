"""Image readers and writers, one per format, chosen by the dataset's ``file_ending``.

``io_for(path)`` is the one entry point: check-data, fingerprint, preprocessing, predict and
evaluate all read through it, so a format added here works everywhere at once.
"""

from __future__ import annotations

from pathlib import Path

from fedseg.data.io.base import ImageIO, LoadedImage
from fedseg.data.io.natural import NaturalImageIO
from fedseg.data.io.nifti import NiftiIO
from fedseg.data.io.sitk import SimpleITKIO
from fedseg.data.io.tiff3d import Tiff3DIO, spacing_file
from fedseg.errors import FedsegError

_IOS: tuple[ImageIO, ...] = (NiftiIO(), SimpleITKIO(), NaturalImageIO(), Tiff3DIO())
SUPPORTED_ENDINGS: tuple[str, ...] = tuple(dict.fromkeys(e for io in _IOS for e in io.endings))


def ending_of(name: str) -> str | None:
    """The supported ending ``name`` has (longest match: ``.nii.gz`` before ``.gz``)."""
    low = name.lower()
    for end in sorted(SUPPORTED_ENDINGS, key=len, reverse=True):
        if low.endswith(end):
            return end
    return None


def strip_ending(name: str) -> str | None:
    """``name`` without its supported image ending; None when it has none (e.g. a 3D TIFF's
    spacing ``.json``)."""
    end = ending_of(name)
    return name[: -len(end)] if end else None


def io_for_ending(ending: str, example: Path | None = None) -> ImageIO:
    """The reader for ``ending``; ``.tif`` is a 3D stack when ``example`` has a spacing json
    beside it (nnU-Net's ``Tiff3DIO``), else a natural 2D image."""
    low = ending.lower()
    if low in Tiff3DIO.endings and example is not None and spacing_file(example).is_file():
        return _IOS[3]
    for io in _IOS:
        if low in io.endings:
            return io
    raise FedsegError(
        f"file ending '{ending}' is not supported; fedseg reads {', '.join(SUPPORTED_ENDINGS)}"
    )


def io_for(path: Path) -> ImageIO:
    """The reader for one file, by its ending."""
    end = ending_of(path.name)
    if end is None:
        raise FedsegError(
            f"{path}: unsupported file type; fedseg reads {', '.join(SUPPORTED_ENDINGS)}"
        )
    return io_for_ending(end, path)


def read_image(path: Path) -> LoadedImage:
    return io_for(path).read(path)


__all__ = [
    "SUPPORTED_ENDINGS", "ImageIO", "LoadedImage", "ending_of", "io_for", "io_for_ending",
    "read_image", "strip_ending",
]
