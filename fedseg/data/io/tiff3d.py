"""3D TIFF stacks with their spacing in a ``.json`` beside them — nnU-Net's ``Tiff3DIO``.

nnU-Net's convention: ``CASE_0000.tif`` (pages = slices) and ``CASE.json`` holding
``{"spacing": [sk, sj, si]}`` in array order (for images the json is named without the channel
suffix); labels have their own ``CASE.json``. Read and written with tifffile.
"""

from __future__ import annotations

import json
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


def spacing_file(path: Path) -> Path:
    """``CASE_0000.tif`` -> ``CASE.json`` (images), ``CASE.tif`` -> ``CASE.json`` (labels)."""
    stem = path.name.rsplit(".", 1)[0]
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        cand = path.with_name(stem[:-5] + ".json")
        if cand.is_file():
            return cand
    return path.with_name(stem + ".json")


class Tiff3DIO(ImageIO):
    endings = (".tif", ".tiff")
    kind = "3D TIFF"

    def read(self, path: Path) -> LoadedImage:
        import tifffile

        open_check(path)
        sp_file = spacing_file(path)
        try:
            spacing = [float(s) for s in json.loads(sp_file.read_text())["spacing"]]
        except FileNotFoundError:
            raise FedsegError(
                f"{sp_file}: missing; a 3D TIFF needs its spacing as {{\"spacing\": [z, y, x]}}"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FedsegError(f"{sp_file}: unreadable spacing ({err}); write "
                              "{\"spacing\": [z, y, x]}") from None
        if len(spacing) != 3:
            raise FedsegError(f"{sp_file}: spacing needs 3 values (z, y, x), got {spacing}")
        try:
            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                check_size(path, series.shape, np.dtype(series.dtype).itemsize)
                arr = series.asarray()
        except FedsegError:
            raise
        except Exception as err:  # noqa: BLE001 - tifffile raises many types
            raise unreadable(path, self.kind, err) from None
        if arr.ndim != 3:
            raise FedsegError(f"{path}: shape {arr.shape}; a 3D TIFF holds one channel, 3 axes")
        sk, sj, si = spacing
        affine = np.diag([si, sj, sk, 1.0])
        return LoadedImage(np.ascontiguousarray(arr)[None], (sk, sj, si), affine)

    def write_seg(self, seg: np.ndarray, reference: Path, out_path: Path) -> Path:
        import tifffile

        spacing = json.loads(spacing_file(reference).read_text())["spacing"]
        tmp = self.tmp_path(out_path)
        tifffile.imwrite(tmp, seg.astype(self.seg_dtype(seg)), compression="zlib")
        tmp.replace(out_path)
        sp_out = out_path.with_name(out_path.name.rsplit(".", 1)[0] + ".json")
        sp_out.write_text(json.dumps({"spacing": spacing}) + "\n")
        return out_path
