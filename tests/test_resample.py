"""fedseg's resampling against nnU-Net 2.8.1's ``resample_data_or_seg_to_shape`` (golden).

Why: the plan records nnU-Net's resampling settings (images order 3, segmentations order 1,
order_z 0 on the coarse axis of anisotropic data) and preprocessing must do what they say.
``tests/goldens/resampling.json`` holds nnU-Net's outputs for tiny integer-valued arrays
(``tools/make_nnunet_goldens.py --only resampling``): isotropic and anisotropic (coarse axis
first and last), up- and downsampling per axis, images and label maps with -1/0/1/2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.planning.plan import DATA_RESAMPLING, SEG_RESAMPLING, ResamplingKwargs
from fedseg.training.resample import resample_data, resample_seg, separate_z_axis

GOLDEN = json.loads((Path(__file__).parent / "goldens" / "resampling.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_resampling_equals_nnunet(name: str) -> None:
    c = CASES[name]
    x = np.asarray(c["input"])[None]
    ref = np.asarray(c["output"])
    kw = ResamplingKwargs(**c["kwargs"])
    args = (c["new_shape"], c["current_spacing"], c["new_spacing"], kw)
    if kw.is_seg:
        out = resample_seg(x.astype(np.int16), *args)[0]
        assert out.dtype == np.int16
        assert np.array_equal(out, ref), f"{np.sum(out != ref)} voxels differ"
    else:
        out = resample_data(x.astype(np.float32), *args)[0]
        assert out.dtype == np.float32
        # order 3: scipy's spline as nnU-Net calls it (float64, then float32); order 1: torch's
        # float32 linear interpolation (inputs are integers in [-200, 200))
        tol = 1e-4 if kw.order != 1 else 2e-4
        assert np.abs(out - ref).max() <= tol


def test_golden_covers_the_cases_that_matter() -> None:
    assert GOLDEN["nnunetv2_version"] == "2.8.1"
    assert DATA_RESAMPLING.model_dump() == CASES["image_iso_order3"]["kwargs"]
    assert SEG_RESAMPLING.model_dump() == CASES["seg_iso"]["kwargs"]
    seps = {n: separate_z_axis(c["current_spacing"], c["new_spacing"]) for n, c in CASES.items()}
    assert seps["image_aniso_axis0"] == 0 and seps["image_aniso_axis2"] == 2
    assert seps["image_iso_order3"] is None
    for c in CASES.values():  # every case resamples every axis (up or down)
        assert all(a != b for a, b in zip(np.shape(c["input"]), c["new_shape"], strict=True))
    seg = np.asarray(CASES["seg_aniso_axis0"]["input"])
    assert set(np.unique(seg)) == {-1, 0, 1, 2}


def test_order_and_separate_axis_follow_the_settings() -> None:
    """The kwargs are not decoration: order 1 differs from order 3 (and equals nnU-Net's
    order 1 only up to float32), force_separate_z False resamples the coarse axis with the
    in-plane order, and a segmentation order_z fedseg does not implement is one clear line."""
    c = CASES["image_aniso_axis0"]
    x = np.asarray(c["input"], dtype=np.float32)[None]
    shape, cur, new = c["new_shape"], c["current_spacing"], c["new_spacing"]
    cubic = resample_data(x, shape, cur, new, DATA_RESAMPLING)
    linear = resample_data(x, shape, cur, new, DATA_RESAMPLING.model_copy(update={"order": 1}))
    joint = resample_data(x, shape, cur, new,
                          DATA_RESAMPLING.model_copy(update={"force_separate_z": False}))
    assert np.abs(cubic - linear).max() > 1.0 and np.abs(cubic - joint).max() > 1.0
    # nearest neighbour along the coarse axis: every output slice lies between input values
    assert cubic.min() >= x.min() and cubic.max() <= x.max()
    with pytest.raises(FedsegError, match="resampling_fn_seg_kwargs order_z 1"):
        resample_seg(x.astype(np.int16), shape, cur, new,
                     SEG_RESAMPLING.model_copy(update={"order_z": 1}))
