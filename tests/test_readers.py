"""Issue #12: every image reader on real files written by its library — values and geometry
survive the round trip read → predict-style write → read — and bad 2D input is refused with one
line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from fedseg.data.io import NaturalImageIO, NiftiIO, SimpleITKIO, Tiff3DIO, io_for, read_image
from fedseg.data.validate import validate_dataset
from fedseg.errors import FedsegError


def _seg(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=shape).astype(np.uint8)


def test_nifti_round_trip(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).normal(size=(7, 5, 3)).astype(np.float32)  # (i, j, k)
    aff = np.array([[0.8, 0, 0, -10], [0, 1.2, 0, 5], [0, 0, 3.0, 2], [0, 0, 0, 1]])
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    img = read_image(path)
    assert isinstance(io_for(path), NiftiIO)
    assert img.data.shape == (1, 3, 5, 7)  # nnU-Net order (k, j, i)
    np.testing.assert_array_equal(img.data[0], arr.transpose(2, 1, 0))
    assert img.spacing == pytest.approx((3.0, 1.2, 0.8))
    seg = _seg((3, 5, 7))
    out = io_for(path).write_seg(seg, path, tmp_path / "pred.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, aff)
    np.testing.assert_array_equal(np.asarray(back.dataobj).transpose(2, 1, 0), seg)


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_simpleitk_round_trip(tmp_path: Path, ending: str) -> None:
    arr = np.random.default_rng(2).normal(size=(4, 6, 9)).astype(np.float32)  # (k, j, i)
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing((0.7, 0.9, 2.5))
    im.SetOrigin((1.0, -2.0, 30.0))
    c, s = np.cos(0.3), np.sin(0.3)
    im.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    path = tmp_path / f"img{ending}"
    sitk.WriteImage(im, str(path))
    img = read_image(path)
    assert isinstance(io_for(path), SimpleITKIO)
    np.testing.assert_array_equal(img.data[0], arr)
    assert img.spacing == pytest.approx((2.5, 0.9, 0.7))
    # affine: voxel (i, j, k) -> world, as ITK's index-to-physical
    p = im.TransformIndexToPhysicalPoint((2, 3, 1))
    np.testing.assert_allclose(img.affine @ [2, 3, 1, 1], [*p, 1], atol=1e-6)
    seg = _seg((4, 6, 9))
    out = io_for(path).write_seg(seg, path, tmp_path / f"pred{ending}")
    back = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), seg)
    assert back.GetSpacing() == pytest.approx(im.GetSpacing())
    assert back.GetOrigin() == pytest.approx(im.GetOrigin())
    assert back.GetDirection() == pytest.approx(im.GetDirection())


def test_png_rgb_and_label_round_trip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, size=(10, 12, 3)).astype(np.uint8)
    path = tmp_path / "case_0000.png"
    Image.fromarray(rgb).save(path)
    img = read_image(path)
    assert isinstance(io_for(path), NaturalImageIO)
    assert img.data.shape == (3, 1, 10, 12)  # every channel from one file, one slice
    np.testing.assert_array_equal(img.data[:, 0].transpose(1, 2, 0), rgb)
    assert img.spacing == (999.0, 1.0, 1.0)
    seg = _seg((1, 10, 12))
    out = io_for(path).write_seg(seg, path, tmp_path / "case.png")
    with Image.open(out) as back:
        assert back.size == (12, 10) and back.mode == "L"
        np.testing.assert_array_equal(np.asarray(back), seg[0])


def test_tiff3d_with_spacing_json(tmp_path: Path) -> None:
    arr = np.random.default_rng(4).integers(0, 1000, size=(5, 8, 6)).astype(np.uint16)
    path = tmp_path / "case_0000.tif"
    tifffile.imwrite(path, arr)
    (tmp_path / "case.json").write_text(json.dumps({"spacing": [3.0, 0.5, 0.5]}))
    img = read_image(path)
    assert isinstance(io_for(path), Tiff3DIO)
    np.testing.assert_array_equal(img.data[0], arr)
    assert img.spacing == (3.0, 0.5, 0.5)
    seg = _seg((5, 8, 6))
    out = io_for(path).write_seg(seg, path, tmp_path / "out" / "case.tif")
    np.testing.assert_array_equal(tifffile.imread(out), seg)
    assert json.loads((tmp_path / "out" / "case.json").read_text())["spacing"] == [3.0, 0.5, 0.5]
    # without the spacing file a .tif is a natural 2D image
    tifffile.imwrite(tmp_path / "flat.tif", arr[0])
    assert isinstance(io_for(tmp_path / "flat.tif"), NaturalImageIO)


def test_oversized_header_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4096 4096 1024\n"
                    "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    with pytest.raises(FedsegError, match="huge.mha: header claims 64.0 GiB"):
        read_image(path)


# --------------------------------------------------------------------------------------------
# bad 2D / SimpleITK input: one line naming the file


def _png_site(root: Path, channels: int = 3, n: int = 2, labels: dict | None = None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(5)
    names = {"1": {"0": "gray"}, "3": {"0": "R", "1": "G", "2": "B"}}[str(channels)]
    for i in range(n):
        img = rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
        Image.fromarray(img).save(root / "imagesTr" / f"c{i}_0000.png")
        lab = np.zeros((16, 16), np.uint8)
        lab[4:12, 4:12] = 1
        lab[6:10, 6:10] = 2
        Image.fromarray(lab).save(root / "labelsTr" / f"c{i}.png")
    ds = {"channel_names": names, "file_ending": ".png", "numTraining": n,
          "labels": labels or {"background": 0, "disc": [1, 2], "cup": 2},
          "regions_class_order": [1, 2]}
    (root / "dataset.json").write_text(json.dumps(ds))
    return root


def test_png_site_is_valid(tmp_path: Path) -> None:
    assert validate_dataset(_png_site(tmp_path / "ds")) == []


def test_rgb_image_where_dataset_declares_one_channel(tmp_path: Path) -> None:
    root = _png_site(tmp_path / "ds", channels=1)
    problems = validate_dataset(root)
    assert any("c0_0000.png: case 'c0' holds 3 channel(s) but dataset.json declares 1" in p
               for p in problems), problems


def test_png_mask_size_differs(tmp_path: Path) -> None:
    root = _png_site(tmp_path / "ds")
    Image.fromarray(np.zeros((16, 15), np.uint8)).save(root / "labelsTr" / "c1.png")
    problems = validate_dataset(root)
    assert any(p.startswith(str(root / "labelsTr" / "c1.png")) and "differs from image" in p
               for p in problems), problems


@pytest.mark.parametrize("mode", ["P", "I;16"])
def test_palette_or_16bit_mask_with_undeclared_values(tmp_path: Path, mode: str) -> None:
    root = _png_site(tmp_path / "ds")
    lab = np.zeros((16, 16), np.uint8 if mode == "P" else np.uint16)
    lab[2:5, 2:5] = 7 if mode == "P" else 300
    if mode == "P":  # a palette PNG: the stored indices are the label values
        im = Image.new("P", (16, 16))
        im.putdata(lab.ravel().tolist())
        im.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    else:
        im = Image.fromarray(lab)
    im.save(root / "labelsTr" / "c0.png")
    with Image.open(root / "labelsTr" / "c0.png") as check:
        assert check.mode == ("P" if mode == "P" else "I;16")
    want = "{7}" if mode == "P" else "{300}"
    problems = validate_dataset(root)
    assert any(p.startswith(str(root / "labelsTr" / "c0.png")) and want in p
               and "not declared" in p for p in problems), problems


def test_rgb_label_refused(tmp_path: Path) -> None:
    root = _png_site(tmp_path / "ds")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "labelsTr" / "c0.png")
    problems = validate_dataset(root)
    assert any("c0.png: label has 3 channels" in p for p in problems), problems


def test_mha_label_direction_differs(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(2):
        img = sitk.GetImageFromArray(np.ones((4, 8, 8), np.float32))
        lab = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.uint8))
        if i == 1:
            lab.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, 1))
        sitk.WriteImage(img, str(root / "imagesTr" / f"c{i}_0000.mha"))
        sitk.WriteImage(lab, str(root / "labelsTr" / f"c{i}.mha"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".mha", "numTraining": 2}))
    problems = validate_dataset(root)
    assert len(problems) == 1, problems
    assert problems[0].startswith(str(root / "labelsTr" / "c1.mha"))
    assert "direction differs" in problems[0]


def test_symlink_loop_named(tmp_path: Path) -> None:
    root = _png_site(tmp_path / "ds")
    img = root / "imagesTr" / "c1_0000.png"
    img.unlink()
    img.symlink_to(img)  # a loop
    problems = validate_dataset(root)
    assert any(p.startswith(str(img)) and "symbolic link" in p for p in problems), problems


FUNDUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fundus"


@pytest.mark.skipif(not FUNDUS.is_dir(), reason=f"{FUNDUS}: real fundus data absent")
@pytest.mark.parametrize("site", ["refuge", "drishti"])
def test_real_fundus_sites_pass_check_data(site: str) -> None:
    """The real 2D sources as released (RGB PNG, palette-free uint8 masks, regions)."""
    assert validate_dataset(FUNDUS / site) == []
