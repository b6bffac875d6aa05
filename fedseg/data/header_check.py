"""Refuse a NIfTI whose header claims more voxel bytes than its file can hold, before reading.

Why: nibabel allocates the whole array the header describes and only then finds the file too
short, so a header forged to claim 2 GiB (in a file of a few kB) cost a site 2.15 GB of memory
before it was refused; a size cap alone (``fedseg.data.io.base.MAX_IMAGE_BYTES``) lets any
claim under the cap through. The claim is held against the file instead, from its size and
(gzip) its trailer, reading a few bytes:

* ``.nii``: the file must be at least ``vox_offset + voxel bytes`` long;
* ``.nii.gz``: deflate expands at most ~1032:1, so a claim above that ratio of the compressed
  size is impossible; and a single-member gzip (what nibabel, gzip and pigz write) states its
  uncompressed size modulo 2**32 in its last four bytes (RFC 1952 ISIZE). Multi-member files
  (bgzip: the FEXTRA flag is set) are held to the ratio bound only.
"""

from __future__ import annotations

import struct
from pathlib import Path

from fedseg.errors import FedsegError

DEFLATE_MAX_RATIO = 1032  # zlib's documented limit of deflate's expansion
_FEXTRA = 0x04


def claimed_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Voxel bytes a header claims (Python ints: no overflow for any forged shape)."""
    n = int(itemsize)
    for s in shape:
        n *= max(0, int(s))
    return n


def _gzip_isize(path: Path) -> int | None:
    """RFC 1952 ISIZE of a single-member gzip file; None for a multi-member (FEXTRA) one."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\x1f\x8b" or head[3] & _FEXTRA:
            return None
        f.seek(-4, 2)
        tail = f.read(4)
    return struct.unpack("<I", tail)[0] if len(tail) == 4 else None


def check_nifti_payload(path: Path, shape: tuple[int, ...], itemsize: int,
                        vox_offset: int) -> None:
    """Raise a one-line :class:`FedsegError` when the header's claim cannot be true."""
    need = claimed_bytes(shape, itemsize)
    size = path.stat().st_size
    if path.name.endswith(".gz"):
        if need > size * DEFLATE_MAX_RATIO:
            raise _lie(path, shape, need, f"a {size}-byte compressed file cannot hold that")
        isize = _gzip_isize(path)
        total = (int(vox_offset) + need) % 2**32
        if isize is not None and isize < total:
            raise _lie(path, shape, need, f"the file decompresses to {isize} bytes")
    elif size < int(vox_offset) + need:
        raise _lie(path, shape, need, f"the file has {size} bytes")


def check_nifti_image(path: Path, img: object) -> None:
    """:func:`check_nifti_payload` for a ``nibabel`` image loaded with ``nib.load`` (header
    only: no voxel was read yet)."""
    import numpy as np

    header = img.header  # type: ignore[attr-defined]
    offset = int(header.get("vox_offset", 0) or 0) if hasattr(header, "get") else 0
    itemsize = np.dtype(img.get_data_dtype()).itemsize  # type: ignore[attr-defined]
    check_nifti_payload(path, tuple(img.shape), itemsize, offset)  # type: ignore[attr-defined]


def _lie(path: Path, shape: tuple[int, ...], need: int, why: str) -> FedsegError:
    size = f"{need / 2**20:.0f} MiB" if need >= 2**20 else f"{need} bytes"
    return FedsegError(
        f"{path}: unreadable or truncated NIfTI (its header claims {size} of voxels, shape "
        f"{tuple(shape)}, but {why}); re-export the file from the source")
