"""The plan's 3d_lowres / 3d_cascade_fullres configurations and resampling settings, as fedseg
uses them (the geometry itself is compared with nnU-Net in ``test_planner.py``).

Why: run checkpoints, preprocessed caches and model bundles are keyed by the plan's hash, so the
hash of a plan without lowres must be what it was before these fields existed; 3d_lowres must be
selectable and train-ready, the cascade's second stage (not implemented) must be refused with
one clear line before any work, and preprocessing must follow the resampling orders the plan
records. Data: the anisotropic CT sites of ``synthetic_datasets`` (nnU-Net makes a 3d_lowres
for them at 0.1 GB, ``tests/goldens/aniso_ct.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import synthetic_datasets as sd

from fedseg.data.dataset import read_dataset_json
from fedseg.errors import FedsegError
from fedseg.planning.fingerprint import compute_fingerprint
from fedseg.planning.plan import CASCADE, Plan, with_configuration
from fedseg.planning.planner import make_plan
from fedseg.planning.presets import apply_preset
from fedseg.training.preprocess import PreprocessedDataset, preprocess_case, preprocess_dataset

# Plan.hash() of the aniso_ct plan at 8 GB as fedseg computed it before the plan had
# resampling settings or lowres/cascade configurations (commit 58c840b)
ANISO_CT_8GB_HASH = "bd1f548feabfdb48"
ADDED_FIELDS = ("resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                "resampling_fn_seg_kwargs", "resampling_fn_probabilities",
                "resampling_fn_probabilities_kwargs", "next_stage", "previous_stage",
                "inherits_from")


@pytest.fixture(scope="module")
def aniso(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict[str, Plan]]:
    sites = sd.write_sites("aniso_ct", tmp_path_factory.mktemp("aniso"))
    fp = sum(compute_fingerprint(s) for s in sites)
    ds = read_dataset_json(sites[0])
    return sites, {gb: make_plan(fp, ds, gpu_memory_gb=float(gb)) for gb in ("8", "0.1")}


def test_hash_of_a_plan_without_lowres_is_unchanged(aniso, tmp_path) -> None:
    _, plans = aniso
    plan = plans["8"]
    assert set(plan.configurations) == {"3d_fullres", "2d"}
    assert plan.hash() == ANISO_CT_8GB_HASH
    assert "resampling_fn" not in plan.canonical_json()
    # a plan.json written before the fields existed loads to the same plan and hash
    old = json.loads(json.dumps(plan.model_dump(mode="json")))
    for cfg in old["configurations"].values():
        for key in ADDED_FIELDS:
            cfg.pop(key)
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = Plan.load(tmp_path / "old.json")
    assert loaded == plan and loaded.hash() == ANISO_CT_8GB_HASH
    # ...while a plan that resamples otherwise is another plan (another cache)
    other = plan.model_copy(deep=True)
    cfg = other.configurations["3d_fullres"]
    cfg.resampling_fn_data_kwargs = cfg.resampling_fn_data_kwargs.model_copy(update={"order": 1})
    assert other.hash() != plan.hash()


def test_lowres_and_cascade_in_the_plan(aniso, tmp_path) -> None:
    _, plans = aniso
    plan = plans["0.1"]
    assert list(plan.configurations) == ["3d_fullres", "3d_lowres", "2d", CASCADE]
    lo, full, casc = (plan.configurations[k] for k in ("3d_lowres", "3d_fullres", CASCADE))
    assert lo.next_stage == CASCADE and full.next_stage is None
    assert (casc.inherits_from, casc.previous_stage) == ("3d_fullres", "3d_lowres")
    links = {"inherits_from", "previous_stage"}
    assert casc.model_dump(exclude=links) == full.model_dump(exclude=links)
    # anisotropic: the fine axes grow first, the coarse one stays while they are 2x finer
    grew = [a / b for a, b in zip(lo.spacing, full.spacing, strict=True)]
    assert min(grew) >= 1 and max(grew) > 1.5
    assert full.batch_dice and not lo.batch_dice
    assert plan.hash() != plans["8"].hash()
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan

    low = with_configuration(plan, "3d_lowres")
    assert low.default_configuration == "3d_lowres" and low.trainable_config() == lo
    assert low.hash() != plan.hash()  # the choice travels with the plan
    assert plan.config(CASCADE) == casc  # readable ...
    with pytest.raises(FedsegError, match="3d_cascade_fullres.*not supported yet"):
        with_configuration(plan, CASCADE)  # ... but not trainable
    with pytest.raises(FedsegError, match="not supported yet"):
        plan.trainable_config(CASCADE)
    with pytest.raises(FedsegError, match="no configuration '3d_lowres'"):
        with_configuration(plans["8"], "3d_lowres")

    # a plan file that asks for the cascade is refused when read, naming file and field
    data = json.loads((tmp_path / "plan.json").read_text())
    data["configuration"] = CASCADE
    (tmp_path / "cascade.json").write_text(json.dumps(data))
    with pytest.raises(FedsegError, match=r"cascade\.json: field 'configuration'.*not supported"):
        Plan.load(tmp_path / "cascade.json")

    # the tiny preset shrinks the cascade exactly as 3d_fullres
    tiny = apply_preset(plan, "tiny")
    t_full, t_casc = tiny.configurations["3d_fullres"], tiny.configurations[CASCADE]
    assert t_casc.model_dump(exclude=links) == t_full.model_dump(exclude=links)


def test_lowres_preprocesses_and_cascade_is_refused_first(aniso, tmp_path) -> None:
    sites, plans = aniso
    plan = with_configuration(plans["0.1"], "3d_lowres")
    site = sites[1]
    with pytest.raises(FedsegError, match="not supported yet"):
        preprocess_dataset(site, plan, tmp_path / "cache", CASCADE)
    assert not (tmp_path / "cache").exists()  # refused before any work
    folder = preprocess_dataset(site, plan, tmp_path / "cache")
    assert folder.name == "3d_lowres"
    ds = PreprocessedDataset(folder)
    lo = plan.configurations["3d_lowres"]
    for cid in ds.case_ids:
        props = ds.properties(cid)
        assert props.target_spacing == lo.spacing
        full = plan.configurations["3d_fullres"].spacing
        # coarser grid than fullres: fewer voxels along every axis it grew on
        assert all(n <= round(s * c / f) for n, s, c, f in zip(
            props.shape_after_resampling, props.shape_after_cropping_and_before_resampling,
            props.spacing_transposed, full, strict=True))
    # a cache written by an older fedseg (no format marker) is redone, once
    marker = folder.parent / "3d_lowres.format"
    assert marker.read_text().strip() == "2"
    marker.unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    preprocess_dataset(site, plan, tmp_path / "cache")
    assert all(p.stat().st_mtime_ns != mtimes[p.name] for p in folder.glob("*.npy"))
    assert marker.is_file()
    again = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    preprocess_dataset(site, plan, tmp_path / "cache")
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")} == again


def test_preprocessing_follows_the_recorded_image_order(aniso) -> None:
    """Order 3 (nnU-Net's default) and order 1 give different images; both stay within the
    normalised input's range (skimage's clip, which nnU-Net relies on)."""
    from fedseg.data.dataset import list_cases, load_case

    sites, plans = aniso
    plan = plans["8"]
    files = list_cases(sites[0], read_dataset_json(sites[0]), "Tr")[0]
    case = load_case(files, with_label=True, num_channels=1)
    cubic = preprocess_case(case, plan).data
    linear_plan = plan.model_copy(deep=True)
    cfg = linear_plan.configurations["3d_fullres"]
    cfg.resampling_fn_data_kwargs = cfg.resampling_fn_data_kwargs.model_copy(update={"order": 1})
    linear = preprocess_case(case, linear_plan).data
    assert cubic.shape == linear.shape
    assert np.abs(cubic - linear).max() > 0.05
    # CT: clipped to the percentiles before resampling; the spline's overshoot clipped after
    ct = plan.foreground_intensity_properties_per_channel["0"]
    lo, hi = ((v - ct.mean) / ct.std for v in (ct.percentile_00_5, ct.percentile_99_5))
    for img in (cubic, linear):
        assert lo - 1e-5 <= img.min() and img.max() <= hi + 1e-5


def test_lowres_trains_and_predicts_on_the_original_grid(aniso, tmp_path) -> None:
    """3d_lowres through a site's whole path: preprocessing at the lowres spacing, a 2-step
    training, a bundle, and a prediction written on the input image's grid."""
    import nibabel as nib

    from fedseg.models.bundle import BundleInfo, save_bundle
    from fedseg.training.predict import predict_files
    from fedseg.training.trainer import LocalTrainer, TrainConfig

    sites, plans = aniso
    site = sites[1]
    plan = with_configuration(apply_preset(plans["0.1"], "tiny"), "3d_lowres")
    folder = preprocess_dataset(site, plan, tmp_path / "cache")
    tr = LocalTrainer(plan, folder, tmp_path / "state",
                      TrainConfig(device="cpu", total_iterations=2, num_workers=0))
    assert tr.patch_size == plan.configurations["3d_lowres"].patch_size
    res = tr.run(2, 0, 2)
    save_bundle(tmp_path / "model", plan, read_dataset_json(site), res.weights,
                BundleInfo(trained_iterations=2))
    image = sorted((site / "imagesTr").iterdir())[0]
    out = predict_files(tmp_path / "model", [image], tmp_path / "pred", device="cpu",
                        mirror_tta=False)
    assert nib.load(str(out[0])).shape == nib.load(str(image)).shape
