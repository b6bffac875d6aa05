"""The built-in demo data: deterministic, multi-site, readable by fedseg's own loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedseg.data.dataset import list_cases, load_case, load_nifti, read_dataset_json
from fedseg.data.demo import make_demo_data
from fedseg.errors import FedsegError


def _arrays(site_dir: Path) -> list[np.ndarray]:
    files = sorted((site_dir / "imagesTr").iterdir()) + sorted((site_dir / "labelsTr").iterdir())
    return [load_nifti(p)[0] for p in files]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_demo_data(tmp_path_factory.mktemp("demo"), sites=3, cases=2, test_cases=1)


def test_layout_and_dataset_json(demo: list[Path]) -> None:
    assert [d.name for d in demo] == ["siteA", "siteB", "siteC"]
    for d in demo:
        ds = read_dataset_json(d)
        assert ds.channel_names == {"0": "MRI"}
        assert ds.labels == {"background": 0, "organ": 1, "lesion": 2}
        assert ds.numTraining == 2 and ds.file_ending == ".nii.gz"
        assert json.loads((d / "dataset.json").read_text())["name"]
        assert sorted(p.name for p in (d / "imagesTs").iterdir()) == [f"{d.name}_002_0000.nii.gz"]
        assert sorted(p.name for p in (d / "labelsTs").iterdir()) == [f"{d.name}_002.nii.gz"]


def test_cases_load_and_have_both_labels(demo: list[Path]) -> None:
    for d in demo:
        ds = read_dataset_json(d)
        cases = list_cases(d, ds)
        assert [c.case_id for c in cases] == [f"{d.name}_000", f"{d.name}_001"]
        for files in cases:
            case = load_case(files)
            assert case.image.dtype == np.float32 and case.image.shape[0] == 1
            assert case.label is not None and case.label.shape == case.image.shape
            assert set(np.unique(case.label)) == {0, 1, 2}
            assert all(20 <= n <= 64 for n in case.image.shape[1:])
            # body smaller than the field of view, exact zeros outside it
            nonzero = case.image[0] != 0
            assert 0.1 < nonzero.mean() < 0.8
            assert not nonzero[0].any() and not nonzero[-1].any()
            assert np.all(nonzero[case.label[0] > 0])
        ts = list_cases(d, ds, split="Ts")
        assert len(ts) == 1 and load_case(ts[0]).image.shape[0] == 1


def test_sites_differ(demo: list[Path]) -> None:
    spacings = [load_case(list_cases(d, read_dataset_json(d))[0]).spacing for d in demo]
    assert np.allclose(spacings[0], (1.0, 1.0, 1.0))
    assert np.allclose(spacings[1], (2.0, 0.8, 0.8))  # nnU-Net order: slice axis first
    assert np.allclose(spacings[2], (1.2, 1.2, 1.2))
    means = [
        float(load_case(list_cases(d, read_dataset_json(d))[0]).image.max()) for d in demo
    ]
    assert len({round(m, -1) for m in means}) == 3  # intensity scales differ


def test_deterministic_per_seed(tmp_path: Path, demo: list[Path]) -> None:
    again = make_demo_data(tmp_path / "a", sites=1, cases=2, test_cases=0, seed=0)
    for x, y in zip(_arrays(demo[0]), _arrays(again[0]), strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    other = make_demo_data(tmp_path / "b", sites=1, cases=2, test_cases=0, seed=1)
    assert any(
        x.shape != y.shape or x.tobytes() != y.tobytes()
        for x, y in zip(_arrays(demo[0]), _arrays(other[0]), strict=True)
    )


def test_rerun_replaces_older_files(tmp_path: Path) -> None:
    make_demo_data(tmp_path, sites=1, cases=3, test_cases=0)
    make_demo_data(tmp_path, sites=1, cases=1, test_cases=0)
    assert len(list((tmp_path / "siteA" / "imagesTr").iterdir())) == 1


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="sites=0"):
        make_demo_data(tmp_path, sites=0)
    with pytest.raises(FedsegError, match="cases=0"):
        make_demo_data(tmp_path, cases=0)


def test_site_names_go_past_z() -> None:
    """The benchmarks simulate 30 sites: after siteZ come siteAA, siteAB, ... (all distinct)."""
    from fedseg.data.demo import MAX_DEMO_SITES, site_name

    names = [site_name(i) for i in range(MAX_DEMO_SITES)]
    assert names[:2] == ["siteA", "siteB"] and names[25:28] == ["siteZ", "siteAA", "siteAB"]
    assert names[-1] == "siteZZ" and len(set(names)) == MAX_DEMO_SITES
    with pytest.raises(ValueError):
        site_name(MAX_DEMO_SITES)
    with pytest.raises(FedsegError, match=f"sites={MAX_DEMO_SITES + 1}"):
        make_demo_data(Path("/nonexistent"), sites=MAX_DEMO_SITES + 1)
