"""The one interface every image format implements: read a file, write a label map like it.

Why an interface of our own: nnU-Net v2 has the same idea (``BaseReaderWriter`` with one class
per format, chosen by ``file_ending``), but importing nnU-Net would pull its whole training
stack into every site. The formats themselves are read by well-kept libraries — nibabel,
SimpleITK, Pillow, tifffile — each in its own module; nothing here parses a file format.

Every reader returns arrays in nnU-Net's axis order ``(C, k, j, i)`` (the reverse of nibabel's
``(i, j, k)``, see ``fedseg.data.dataset``) with the spacing in the same order, and a 4x4
``affine`` (voxel index ``(i, j, k, 1)`` -> world mm) that lets the validator compare the
geometry of a case's files whatever their format. A 2D image is a volume of ONE slice
(``k = 1``, spacing 999 on that axis as nnU-Net's ``NaturalImage2DIO`` sets it), so the
fingerprint, planner and preprocessing see 2D data as what it is: a 3D array one voxel thick.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedseg.errors import FedsegError

MAX_IMAGE_BYTES = 8 * 2**30
"""Largest decoded image accepted (8 GiB): a header claiming more is refused before reading."""


@dataclass
class LoadedImage:
    """One file, decoded."""

    data: np.ndarray  # (C, k, j, i), the file's own dtype
    spacing: tuple[float, float, float]  # (sk, sj, si), mm
    affine: np.ndarray  # 4x4, voxel (i, j, k) -> world


def check_size(path: Path, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse an image whose header claims more than :data:`MAX_IMAGE_BYTES` before decoding."""
    n = int(np.prod([int(s) for s in shape], dtype=np.float64)) * int(itemsize)
    if n > MAX_IMAGE_BYTES:
        raise FedsegError(
            f"{path}: header claims {n / 2**30:.1f} GiB of voxels (shape {tuple(shape)}), above "
            f"fedseg's {MAX_IMAGE_BYTES // 2**30} GiB limit; is the file corrupt?"
        )


def unreadable(path: Path, kind: str, err: BaseException) -> FedsegError:
    """The one-line error for a file a library could not decode."""
    msg = " ".join(str(err).split())[:160] or type(err).__name__
    return FedsegError(f"{path}: unreadable or truncated {kind} ({msg}); re-export the file "
                       "from the source")


def open_check(path: Path) -> None:
    """A missing file or a symlink loop named as such (libraries report both confusingly)."""
    if path.is_symlink() and not path.exists():
        raise FedsegError(f"{path}: broken or looping symbolic link; point it at a real file")
    if not path.is_file():
        raise FedsegError(f"{path}: missing file; add it or remove the case")


class ImageIO(ABC):
    """A reader/writer for the file endings in :attr:`endings`."""

    endings: tuple[str, ...] = ()
    kind: str = "image"
    multichannel_files: bool = False
    """True where one file may hold several channels (RGB PNG): the case's channel count is
    then the sum over its files, not the number of files."""

    @abstractmethod
    def read(self, path: Path) -> LoadedImage:
        """Decode ``path``; raise :class:`FedsegError` naming it for anything wrong."""

    @abstractmethod
    def write_seg(self, seg: np.ndarray, reference: Path, out_path: Path) -> Path:
        """Write label map ``seg`` (nnU-Net order ``(k, j, i)``) with ``reference``'s geometry."""

    @staticmethod
    def seg_dtype(seg: np.ndarray) -> type:
        return np.uint8 if seg.max(initial=0) <= 255 and seg.min(initial=0) >= 0 else np.int16

    @staticmethod
    def tmp_path(out_path: Path) -> Path:
        """A sibling with the same ending (libraries pick the format from it), hidden."""
        out_path.parent.mkdir(parents=True, exist_ok=True)
        return out_path.with_name(f".tmp-{out_path.name}")


def affine_from(spacing_ijk: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """A 4x4 voxel (i, j, k) -> world affine from ITK-style spacing, origin, direction."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing_ijk)
    a[:3, 3] = origin
    return a
