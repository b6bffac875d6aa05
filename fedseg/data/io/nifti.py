"""NIfTI (``.nii.gz``, ``.nii``) through nibabel.

nibabel rather than SimpleITK for NIfTI because it reads the header without decoding the voxels
(the size check runs first) and maps compressed files lazily; arrays are transposed to
nnU-Net's (k, j, i) order, which is what SimpleITK — nnU-Net's NIfTI reader — returns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedseg.data.header_check import check_nifti_image
from fedseg.data.io.base import (
    ImageIO,
    LoadedImage,
    check_size,
    open_check,
    unreadable,
)
from fedseg.errors import FedsegError


class NiftiIO(ImageIO):
    endings = (".nii.gz", ".nii")
    kind = "NIfTI"

    def read(self, path: Path) -> LoadedImage:
        import nibabel as nib

        open_check(path)
        try:
            img = nib.load(str(path))
            check_size(path, img.shape, np.dtype(img.get_data_dtype()).itemsize)
            check_nifti_image(path, img)  # a claim the file cannot hold: before any voxel
            data = np.asarray(img.dataobj)
        except FedsegError:
            raise
        except Exception as err:  # nibabel raises many types for corrupt/truncated files
            raise unreadable(path, self.kind, err) from None
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim == 2:  # a 2D NIfTI: one slice
            data = data[:, :, None]
        if data.ndim != 3:
            raise FedsegError(
                f"{path}: is {data.ndim}D (shape {data.shape}); store one 3D file per channel "
                "(CASE_0000, CASE_0001, ...) and declare the channels in dataset.json"
            )
        zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * 3
        spacing = (zooms[2], zooms[1], zooms[0])
        arr = np.ascontiguousarray(data.transpose(2, 1, 0))[None]
        return LoadedImage(arr, spacing, np.asarray(img.affine, dtype=np.float64))

    def write_seg(self, seg: np.ndarray, reference: Path, out_path: Path) -> Path:
        import nibabel as nib

        ref = nib.load(str(reference))
        arr = np.ascontiguousarray(seg.transpose(2, 1, 0))
        dtype = self.seg_dtype(arr)
        arr = arr.astype(dtype).reshape(ref.shape)
        img = type(ref)(arr, ref.affine, header=ref.header.copy())
        img.set_data_dtype(dtype)
        img.header.set_slope_inter(1.0, 0.0)
        tmp = self.tmp_path(out_path)
        nib.save(img, str(tmp))
        tmp.replace(out_path)
        return out_path
