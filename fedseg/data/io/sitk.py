"""Formats SimpleITK reads: MetaImage (``.mha``, ``.mhd``), NRRD (``.nrrd``, ``.nhdr``),
``.gipl.gz`` — nnU-Net's ``SimpleITKIO``.

The header is read first (``ImageFileReader.ReadImageInformation``) so that a file claiming an
absurd size is refused before its voxels are decoded. The affine is built from SimpleITK's
spacing, origin and direction, so a label whose direction matrix differs from its image's is
caught by the validator like a NIfTI with another affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedseg.data.io.base import (
    ImageIO,
    LoadedImage,
    affine_from,
    check_size,
    open_check,
    unreadable,
)
from fedseg.errors import FedsegError


class SimpleITKIO(ImageIO):
    endings = (".mha", ".mhd", ".nrrd", ".nhdr", ".gipl.gz", ".gipl")
    kind = "SimpleITK image"

    def read(self, path: Path) -> LoadedImage:
        import SimpleITK as sitk

        open_check(path)
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = reader.GetSize()
            comps = reader.GetNumberOfComponents()
            probe = sitk.Image([1] * len(size), reader.GetPixelID(), comps)
            check_size(path, (*size, comps), probe.GetSizeOfPixelComponent())
            img = reader.Execute()
        except FedsegError:
            raise
        except Exception as err:  # noqa: BLE001 - SimpleITK raises RuntimeError with ITK text
            raise unreadable(path, self.kind, err) from None
        dim = img.GetDimension()
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise FedsegError(
                f"{path}: {img.GetNumberOfComponentsPerPixel()} components per voxel; store one "
                "file per channel (CASE_0000, CASE_0001, ...)"
            )
        arr = sitk.GetArrayFromImage(img)  # (k, j, i) already
        spacing, origin = list(img.GetSpacing()), list(img.GetOrigin())
        direction = np.asarray(img.GetDirection(), dtype=np.float64)
        if dim == 2:
            arr = arr[None]
            spacing, origin = [*spacing, 999.0], [*origin, 0.0]
            d = np.eye(3)
            d[:2, :2] = direction.reshape(2, 2)
            direction = d
        elif dim != 3:
            raise FedsegError(f"{path}: {dim}D image; fedseg reads 2D and 3D images")
        affine = affine_from(np.asarray(spacing), np.asarray(origin), direction)
        sp = (float(spacing[2]), float(spacing[1]), float(spacing[0]))
        return LoadedImage(np.ascontiguousarray(arr)[None], sp, affine)

    def write_seg(self, seg: np.ndarray, reference: Path, out_path: Path) -> Path:
        import SimpleITK as sitk

        ref = sitk.ReadImage(str(reference))
        arr = seg.astype(self.seg_dtype(seg))
        if ref.GetDimension() == 2:
            arr = arr[0]
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ref)
        tmp = self.tmp_path(out_path)
        sitk.WriteImage(img, str(tmp), useCompression=True)
        tmp.replace(out_path)
        return out_path
