"""Natural 2D images (``.png``, ``.bmp``, ``.tif``/``.tiff`` without a spacing file) through
Pillow — nnU-Net's ``NaturalImage2DIO``.

As in nnU-Net, one file may hold every channel (RGB in ``CASE_0000.png``), the image becomes a
volume of one slice ``(C, 1, H, W)`` and the spacing is ``(999, 1, 1)``: natural images have no
physical spacing, and 999 on the slice axis makes the planner choose a 2D configuration.
Predictions are written as 8-bit (or 16-bit where labels exceed 255) greyscale PNGs of the
input's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedseg.data.io.base import (
    ImageIO,
    LoadedImage,
    check_size,
    open_check,
    unreadable,
)
from fedseg.errors import FedsegError

NATURAL_SPACING = (999.0, 1.0, 1.0)


class NaturalImageIO(ImageIO):
    endings = (".png", ".bmp", ".tif", ".tiff")
    kind = "2D image"
    multichannel_files = True

    def read(self, path: Path) -> LoadedImage:
        from PIL import Image

        open_check(path)
        try:
            with Image.open(path) as im:
                bands = len(im.getbands())
                check_size(path, (im.height, im.width, bands), 4)
                arr = np.asarray(im)
        except FedsegError:
            raise
        except Exception as err:  # noqa: BLE001 - Pillow raises OSError, ValueError, ...
            raise unreadable(path, self.kind, err) from None
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3:
            arr = arr.transpose(2, 0, 1)
        else:
            raise FedsegError(f"{path}: image of shape {arr.shape}; expected a 2D image")
        data = np.ascontiguousarray(arr)[:, None]  # (C, 1, H, W)
        return LoadedImage(data, NATURAL_SPACING, np.eye(4))

    def write_seg(self, seg: np.ndarray, reference: Path, out_path: Path) -> Path:
        from PIL import Image

        if seg.shape[0] != 1:
            raise FedsegError(f"{out_path}: a 2D image format cannot hold {seg.shape[0]} slices")
        dtype = self.seg_dtype(seg)
        arr = seg[0].astype(np.uint8 if dtype == np.uint8 else np.uint16)
        tmp = self.tmp_path(out_path)
        Image.fromarray(arr).save(tmp, format=_format(out_path))
        tmp.replace(out_path)
        return out_path


def _format(path: Path) -> str:
    return {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}[path.suffix.lower()]
