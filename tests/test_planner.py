"""fedseg's federated fingerprint + planner against nnU-Net v2's own plans (goldens).

Why: the plan is the contract of the whole federation, and the claim is that it is the plan
nnU-Net v2 would make on the POOLED data although the server only ever sees the SUM of the
sites' fingerprints. ``tests/goldens/*.json`` hold nnU-Net's real plans for the pooled data
(``tools/make_nnunet_goldens.py``, nnunetv2 2.8.1); here fedseg fingerprints every site
separately, adds the fingerprints and plans.

Tolerances: topology, patch and batch sizes, normalisation and transpose must be EQUAL. Target
spacings must agree to 1e-4 relative — the worst case of the spacing grid, whose bins are 1e-4
wide (relative) and whose per-bin value sums make the reconstruction exact whenever a bin holds
one distinct spacing (every case here, so they agree to float precision). Intensity statistics:
nnU-Net computes them on a random sample of 1e8 foreground voxels, fedseg exactly on the
distribution that sample is drawn from, so they differ by nnU-Net's sampling noise plus the
intensity bin width: CT percentiles within 1 HU (the bin width; integer HU values are exact),
other channels within 0.1 % (log-grid bin width), means within 1e-3 std, std within 1e-3.

Configurations: 3d_fullres, 2d and, where nnU-Net makes them, 3d_lowres and 3d_cascade_fullres
(``large_ct``: four ~320^3 CT cases given as fingerprint lists; 34 of the random plans). The
cascade is compared with nnU-Net's stub (``inherits_from``, ``previous_stage``) and, where the
golden has it, with its resolved configuration; goldens written before resampling settings and
``next_stage`` were recorded are checked on the fields they hold, plus nnU-Net's rule that the
cascade and ``next_stage`` exist exactly when 3d_lowres does.

Runtime: a few seconds in all (the ~160^3 dataset is fingerprinted from memory, without NIfTI).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import synthetic_datasets as sd

from fedseg.data.dataset import Case, DatasetJson, read_dataset_json
from fedseg.data.demo import make_demo_data
from fedseg.errors import FedsegError
from fedseg.planning.cli_impl import plan_main
from fedseg.planning.federated import plan_from_fingerprint_sum
from fedseg.planning.fingerprint import (
    CT_GRID,
    INTENSITY_GRID,
    Fingerprint,
    compute_fingerprint,
    fingerprint_cases,
    fingerprint_from_summaries,
    nonzero_bbox,
)
from fedseg.planning.plan import CASCADE, Plan
from fedseg.planning.planner import make_plan, plan_configurations

GOLDENS = Path(__file__).parent / "goldens"
STALE = "golden out of date with the data generator: rerun tools/make_nnunet_goldens.py"


def _golden(name: str) -> dict:
    return json.loads((GOLDENS / f"{name}.json").read_text())


def _synthetic_json(name: str) -> DatasetJson:
    return DatasetJson(channel_names=sd.DATASETS[name].channel_names, labels=sd.LABELS)


# ---- per-site fingerprints of every golden dataset (module-scoped: built once) -------------


@pytest.fixture(scope="module")
def demo_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_demo_data(tmp_path_factory.mktemp("demo"), sites=3, cases=10, test_cases=0, seed=0)


@pytest.fixture(scope="module")
def aniso_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return sd.write_sites("aniso_ct", tmp_path_factory.mktemp("aniso"))


@pytest.fixture(scope="module")
def site_fingerprints(
    demo_sites: list[Path], aniso_sites: list[Path]
) -> dict[str, tuple[list[Fingerprint], DatasetJson]]:
    out = {
        "demo": ([compute_fingerprint(d) for d in demo_sites], read_dataset_json(demo_sites[0])),
        "aniso_ct": (
            [compute_fingerprint(d) for d in aniso_sites], read_dataset_json(aniso_sites[0])
        ),
    }
    big = sd.DATASETS["big_mri"]
    fps = []
    for site in big.sites:
        cases = (Case(c.case_id, *sd.nnunet_order(c), np.eye(4)) for c in big.cases(site))
        fps.append(fingerprint_cases(cases, big.channel_names))
    out["big_mri"] = (fps, _synthetic_json("big_mri"))
    return out


# ---- the plans ------------------------------------------------------------------------------


def _check_fingerprint_matches_golden(fp: Fingerprint, g: dict) -> None:
    """The per-case values behind the histograms are nnU-Net's (detects a stale golden)."""
    assert fp.num_cases == len(g["fingerprint"]["spacings"]), STALE
    for ax in range(3):
        vals, w = fp.spacing[ax].sorted_values()
        ours = np.repeat(vals, w.astype(int))
        theirs = np.sort([s[ax] for s in g["fingerprint"]["spacings"]])
        assert np.allclose(ours, theirs, rtol=1e-12, atol=0), STALE
        vals, w = fp.shape_after_crop[ax].sorted_values()
        theirs = np.sort([s[ax] for s in g["fingerprint"]["shapes_after_crop"]])
        assert np.array_equal(np.repeat(vals, w.astype(int)), theirs), STALE


@pytest.mark.parametrize("name", ["demo", "aniso_ct", "big_mri"])
def test_plan_of_summed_site_fingerprints_equals_nnunet(name: str, site_fingerprints) -> None:
    fps, ds = site_fingerprints[name]
    assert len(fps) > 1  # every golden dataset is multi-site: the sum is what is tested
    fp = sum(fps)
    g = _golden(name)
    _check_fingerprint_matches_golden(fp, g)
    assert len(g["plans"]) >= 2
    for gb, gp in g["plans"].items():
        ours = plan_configurations(fp, ds, gpu_memory_gb=float(gb))
        _compare_plans(ours, gp, f"{name} @ {gb} GB")
        _compare_plans(_plan_dict(make_plan(fp, ds, gpu_memory_gb=float(gb))), gp,
                       f"{name} @ {gb} GB (Plan)")


def _plan_dict(plan: Plan) -> dict:
    """A :class:`Plan` in the form of :func:`plan_configurations`' result (what is compared)."""
    return {
        "transpose_forward": plan.transpose_forward,
        "transpose_backward": plan.transpose_backward,
        "original_median_spacing_after_transp": plan.original_median_spacing_after_transp,
        "original_median_shape_after_transp": plan.original_median_shape_after_transp,
        "configurations": {k: c.model_dump() for k, c in plan.configurations.items()},
    }


CONFIG_KEYS = (
    "patch_size", "batch_size", "strides", "kernel_sizes", "features_per_stage", "n_stages",
    "n_conv_per_stage", "n_conv_per_stage_decoder", "median_image_size_in_voxels",
    "normalization_schemes", "use_mask_for_norm", "batch_dice",
)
# recorded by make_nnunet_goldens.py since the cascade was planned; absent from older goldens
RECORDED_LATER = (
    "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
    "resampling_fn_seg_kwargs", "resampling_fn_probabilities",
    "resampling_fn_probabilities_kwargs",
)


def _compare_config(oc: dict, gc: dict, w: str) -> None:
    assert np.allclose(oc["spacing"], gc["spacing"], rtol=1e-4, atol=0), w
    for key in CONFIG_KEYS:  # .get: a ResidualEncoderUNet has no n_conv_per_stage
        assert oc.get(key) == gc.get(key), f"{w} {key}: fedseg {oc.get(key)} != nnU-Net " \
            f"{gc.get(key)}"
    if "resampling_fn_data" in gc:  # a golden that records them: all of them, next_stage too
        for key in (*RECORDED_LATER, "next_stage"):
            assert oc.get(key) == gc.get(key), f"{w} {key}: fedseg {oc.get(key)} != nnU-Net " \
                f"{gc.get(key)}"


def _compare_plans(ours: dict, gp: dict, where: str) -> None:
    assert ours["transpose_forward"] == gp["transpose_forward"], where
    assert ours["transpose_backward"] == gp["transpose_backward"], where
    assert ours["original_median_shape_after_transp"] == gp[
        "original_median_shape_after_transp"
    ], where
    assert np.allclose(
        ours["original_median_spacing_after_transp"],
        gp["original_median_spacing_after_transp"], rtol=1e-4, atol=0,
    ), where
    oconf, gconf = ours["configurations"], gp["configurations"]
    # nnU-Net writes the cascade exactly when it writes 3d_lowres (and 3d_fullres)
    assert set(oconf) - {CASCADE} == set(gconf) - {CASCADE}, where
    assert (CASCADE in oconf) == ("3d_lowres" in gconf), where
    for cname, gc in gconf.items():
        if cname != CASCADE:
            _compare_config(oconf[cname], gc, f"{where} {cname}")
    if "3d_lowres" in gconf:
        assert oconf["3d_lowres"]["next_stage"] == CASCADE, where
        casc = oconf[CASCADE]
        stub = gconf.get(CASCADE, {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"})
        assert (casc["inherits_from"], casc["previous_stage"]) == (
            stub["inherits_from"], stub["previous_stage"]), where
        # resolved: the parent's fields, then the stub's (nnU-Net's PlansManager)
        _compare_config(casc, stub.get("resolved", gconf[stub["inherits_from"]]),
                        f"{where} {CASCADE}")
        parent = {k: v for k, v in oconf["3d_fullres"].items()
                  if k not in ("inherits_from", "previous_stage")}
        assert {k: v for k, v in casc.items() if k in parent} == parent, where
    else:
        assert all(c.get("next_stage") is None for c in oconf.values()), where


def test_plans_of_random_fingerprints_equal_nnunet() -> None:
    """80 random datasets (no images): nnU-Net's planner fed per-case lists, fedseg the same
    cases through its histograms — covers anisotropy, ties, reductions, lowres, batch caps."""
    g = _golden("random_fingerprints")
    kinds: set[str] = set()
    lowres_plans = 0
    for d in g["datasets"]:
        # a few foreground values per case, so that make_plan has intensities to report
        fg = [{c: np.array([1.0, 2.0, 3.0]) for c in d["channel_names"]}] * len(d["spacings"])
        fp = fingerprint_from_summaries(
            d["channel_names"], d["spacings"], d["shapes_after_crop"], d["relative_sizes"], fg
        )
        ds = DatasetJson(channel_names=d["channel_names"], labels=d["labels"])
        for gb, gp in d["plans"].items():
            where = f"random dataset {d['id']} ({d['pattern']}) @ {gb} GB"
            ours = plan_configurations(fp, ds, gpu_memory_gb=float(gb))
            _compare_plans(ours, gp, where)
            plan = make_plan(fp, ds, gpu_memory_gb=float(gb))
            _compare_plans(_plan_dict(plan), gp, where + " (Plan)")
            kinds.update(gp["configurations"])
            lowres_plans += "3d_lowres" in plan.configurations
            if gp["transpose_forward"] != [0, 1, 2]:
                kinds.add("transposed")
    assert {"3d_lowres", "transposed"} <= kinds
    assert lowres_plans == 34  # every lowres nnU-Net made there is in fedseg's Plan too


def _large_ct_fingerprint(site: str | None) -> Fingerprint:
    """fedseg's fingerprint of the large CT cases of one site (None: all four, one site)."""
    sp, sh, rel, ids = sd.large_ct_lists(site)
    fg = []
    for cid in ids:  # intensities are not what is compared here: a small HU sample per case
        rng = np.random.default_rng([sd.SEED, int(cid[-3:]), ord(cid[4])])
        fg.append({"0": rng.integers(-100, 300, 500).astype(np.float64)})
    return fingerprint_from_summaries(sd.LARGE_CT_CHANNELS, sp, sh, rel, fg)


@pytest.mark.parametrize("federated", [False, True], ids=["single_site", "fingerprint_sum"])
def test_large_ct_lowres_and_cascade_equal_nnunet(federated: bool) -> None:
    """Four ~320^3 CT cases (nnU-Net's fingerprint lists, no images): 3d_fullres, 3d_lowres and
    3d_cascade_fullres equal nnU-Net's on every field at 8 and 4 GB; at 24 GB nnU-Net's lowres
    search ends in a drop (lowres median not 2x smaller) and neither plan has the cascade. The
    plan is made from one site holding every case, and — as the server does — from the SUM of
    the two sites' secure-aggregation vectors."""
    g = _golden("large_ct")
    ds = DatasetJson(channel_names=sd.LARGE_CT_CHANNELS, labels=sd.LABELS)
    assert list(g["sites"]) == list(sd.LARGE_CT), STALE
    if federated:
        total = sum(_large_ct_fingerprint(s).to_vector() for s in sd.LARGE_CT)
        fp = Fingerprint.from_vector(total, Fingerprint.empty(ds.channel_names))
    else:
        fp = _large_ct_fingerprint(None)
    _check_fingerprint_matches_golden(fp, g)
    seen = {}
    for gb, gp in g["plans"].items():
        if federated:
            plan = plan_from_fingerprint_sum(total, ds, float(gb), "large_ct")
        else:
            plan = make_plan(fp, ds, gpu_memory_gb=float(gb), dataset_name="large_ct")
        _compare_plans(_plan_dict(plan), gp, f"large_ct @ {gb} GB")
        seen[gb] = set(plan.configurations)
    full = {"2d", "3d_fullres", "3d_lowres", CASCADE}
    assert seen == {"8": full, "4": full, "24": {"2d", "3d_fullres"}}


def test_goldens_cover_the_rules_that_matter() -> None:
    """The goldens exercise what they are meant to (guards against a silently easy golden)."""
    ct = _golden("aniso_ct")["plans"]
    assert ct["8"]["transpose_forward"] != [0, 1, 2]  # anisotropic axis moved first
    assert ct["8"]["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    assert "3d_lowres" in ct["0.1"]["configurations"]  # lowres exists -> batch_dice True
    assert ct["0.1"]["configurations"]["3d_fullres"]["batch_dice"] is True
    big = _golden("big_mri")["plans"]["8"]["configurations"]["3d_fullres"]
    assert np.prod(big["patch_size"]) < np.prod(big["median_image_size_in_voxels"])  # reduced
    assert big["use_mask_for_norm"] == [False, False]
    demo = _golden("demo")["plans"]["8"]["configurations"]["3d_fullres"]
    assert demo["use_mask_for_norm"] == [True]
    large = _golden("large_ct")["plans"]
    for gb in ("8", "4"):  # nnU-Net's cascade, as nnU-Net writes it, and its resolution
        conf = large[gb]["configurations"]
        assert conf["3d_lowres"]["next_stage"] == CASCADE
        assert {k: conf[CASCADE][k] for k in ("inherits_from", "previous_stage")} == {
            "inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
        assert conf[CASCADE]["resolved"]["patch_size"] == conf["3d_fullres"]["patch_size"]
        assert conf["3d_fullres"]["batch_dice"] and not conf["3d_lowres"]["batch_dice"]
        lo, fu = conf["3d_lowres"], conf["3d_fullres"]
        assert np.prod(lo["median_image_size_in_voxels"]) * 2 <= np.prod(
            fu["median_image_size_in_voxels"])
        assert fu["resampling_fn_data_kwargs"]["order"] == 3
        assert fu["resampling_fn_seg_kwargs"] == {"is_seg": True, "order": 1, "order_z": 0,
                                                  "force_separate_z": None}
    assert set(large["24"]["configurations"]) == {"2d", "3d_fullres"}
    assert large["24"]["configurations"]["3d_fullres"]["batch_dice"] is False


@pytest.mark.parametrize("name", ["demo", "aniso_ct", "big_mri"])
def test_intensity_properties_match_nnunet(name: str, site_fingerprints) -> None:
    fps, ds = site_fingerprints[name]
    plan = make_plan(sum(fps), ds)
    golden = _golden(name)["foreground_intensity_properties_per_channel"]
    for c, theirs in golden.items():
        ours = plan.foreground_intensity_properties_per_channel[c].model_dump()
        is_ct = ds.channel_names[c].casefold() == "ct"
        std = theirs["std"]
        assert math.isclose(ours["std"], std, rel_tol=1e-3), (name, c, "std")
        assert abs(ours["mean"] - theirs["mean"]) <= 1e-3 * std, (name, c, "mean")
        for key in ("median", "percentile_00_5", "percentile_99_5"):
            width = 1.0 if is_ct else abs(theirs[key]) * (math.exp(1e-3) - 1)
            assert abs(ours[key] - theirs[key]) <= width + 1e-3 * std, (name, c, key)
        for key in ("min", "max"):
            assert math.isclose(ours[key], theirs[key], rel_tol=1e-6), (name, c, key)
        if is_ct:  # integer HU: the percentiles are nnU-Net's up to float rounding
            for key in ("median", "percentile_00_5", "percentile_99_5"):
                assert abs(ours[key] - theirs[key]) <= 1e-9 * abs(theirs[key]), (name, c, key)


# ---- additivity and the secure-aggregation vector ------------------------------------------


def test_sum_of_sites_equals_fingerprint_of_pooled_folder(aniso_sites, tmp_path) -> None:
    pooled = tmp_path / "pooled"
    for site in aniso_sites:
        for sub in ("imagesTr", "labelsTr"):
            (pooled / sub).mkdir(parents=True, exist_ok=True)
            for f in (site / sub).iterdir():
                shutil.copy(f, pooled / sub / f.name)
    shutil.copy(aniso_sites[0] / "dataset.json", pooled / "dataset.json")
    calls: list[tuple[int, int, str]] = []
    whole = compute_fingerprint(pooled, progress=lambda i, n, cid: calls.append((i, n, cid)))
    assert [c[0] for c in calls] == list(range(1, 13)) and calls[-1][1] == 12
    a, b = (compute_fingerprint(d) for d in aniso_sites)
    summed = a + b
    # integer parts (case counts, shapes, ...) exactly; float sums up to summation order
    assert summed.num_cases == whole.num_cases == 12
    for h1, h2 in zip(summed._histograms(), whole._histograms(), strict=True):
        assert h1.bins == h2.bins
        assert np.allclose(h1.weights, h2.weights, rtol=1e-12, atol=0)
        assert np.allclose(h1.sums, h2.sums, rtol=1e-12, atol=0)
    for h1, h2 in zip(summed.spacing + summed.shape_after_crop, whole.spacing +
                      whole.shape_after_crop, strict=True):
        assert h1.weights == h2.weights
    assert np.allclose(summed.to_vector(), whole.to_vector(), rtol=1e-12, atol=0)
    assert summed.intensities["0"].min == whole.intensities["0"].min
    assert summed.intensities["0"].max == whole.intensities["0"].max
    ds = read_dataset_json(pooled)
    p1, p2 = make_plan(summed, ds), make_plan(whole, ds)
    assert p1.configurations == p2.configurations
    i1 = p1.foreground_intensity_properties_per_channel["0"].model_dump()
    i2 = p2.foreground_intensity_properties_per_channel["0"].model_dump()
    assert all(math.isclose(i1[k], i2[k], rel_tol=1e-12) for k in i1)


def test_vector_is_additive_and_round_trips(site_fingerprints) -> None:
    fps, ds = site_fingerprints["aniso_ct"]
    total = fps[0] + fps[1]
    vec = fps[0].to_vector() + fps[1].to_vector()
    assert np.allclose(vec, total.to_vector(), rtol=1e-15, atol=0)
    back = Fingerprint.from_vector(vec, template=fps[0])
    # CT: integer HU -> even min/max (derived from the histogram) are exact
    assert back.intensities["0"].min == total.intensities["0"].min
    assert back.intensities["0"].max == total.intensities["0"].max
    assert np.allclose(back.to_vector(), total.to_vector(), rtol=1e-15, atol=0)
    assert make_plan(back, ds) == make_plan(total, ds)
    # MRI (log grid): everything but min/max exact, min/max to the bin width
    fps, ds = site_fingerprints["demo"]
    total = sum(fps)
    back = Fingerprint.from_vector(sum(f.to_vector() for f in fps), template=fps[2])
    assert np.allclose(back.to_vector(), total.to_vector(), rtol=1e-12, atol=0)
    for key in ("min", "max"):
        exact = getattr(total.intensities["0"], key)
        assert abs(getattr(back.intensities["0"], key) - exact) <= abs(exact) * 1e-3
    with pytest.raises(FedsegError, match="entries"):
        Fingerprint.from_vector(vec[:-1], template=fps[0])


def test_save_load_and_incompatible_sum(site_fingerprints, tmp_path) -> None:
    fps, _ = site_fingerprints["demo"]
    fps[0].save(tmp_path / "fp.json")
    assert Fingerprint.load(tmp_path / "fp.json") == fps[0]
    ct_fps, _ = site_fingerprints["aniso_ct"]
    with pytest.raises(FedsegError, match="channel_names"):
        fps[0] + ct_fps[0]
    (tmp_path / "bad.json").write_text('{"version": 1}')
    with pytest.raises(FedsegError, match="bad.json"):
        Fingerprint.load(tmp_path / "bad.json")


# ---- pieces ---------------------------------------------------------------------------------


def test_grids_and_crop() -> None:
    ints = np.arange(-1200, 3100, dtype=np.float64)
    idx = CT_GRID.index(ints)
    assert np.array_equal(CT_GRID.start + (idx + 0.5) * CT_GRID.step, ints)  # centred on integers
    x = np.array([-5e3, -1.0, -1e-7, 0.0, 1e-7, 1e-3, 1.0, 1.0005, 7e8])
    assert np.all(np.diff(INTENSITY_GRID.index(x)) >= 0)  # monotone, signed
    assert INTENSITY_GRID.index(np.array([1.0]))[0] != INTENSITY_GRID.index(np.array([1.0011]))[0]
    img = np.zeros((2, 5, 6, 7), dtype=np.float32)
    assert nonzero_bbox(img) == (slice(0, 5), slice(0, 6), slice(0, 7))  # empty: no crop
    img[1, 1:3, 2, 4:6] = 3.0
    img[0, 2, 5, 1] = -1.0
    assert nonzero_bbox(img) == (slice(1, 3), slice(2, 6), slice(1, 6))


def test_make_plan_gives_a_valid_plan(site_fingerprints, tmp_path) -> None:
    fps, ds = site_fingerprints["big_mri"]
    plan = make_plan(sum(fps), ds, gpu_memory_gb=8.0, dataset_name="big")
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert set(plan.configurations) == {"3d_fullres", "2d"}
    assert plan.num_training_cases == 5 and plan.gpu_memory_gb == 8.0
    with pytest.raises(FedsegError, match="gpu_memory_gb"):
        make_plan(sum(fps), ds, gpu_memory_gb=0)


def test_plan_main(aniso_sites, tmp_path) -> None:
    seen: list[str] = []
    plan = plan_main(aniso_sites, tmp_path / "out" / "plan.json", 8.0,
                     progress=lambda site, i, n, cid: seen.append(cid))
    assert len(seen) == 12
    assert Plan.load(tmp_path / "out" / "plan.json") == plan
    golden = _golden("aniso_ct")["plans"]["8"]["configurations"]["3d_fullres"]
    assert plan.config().patch_size == golden["patch_size"]
    # a site declaring other channels is named
    other = tmp_path / "siteX"
    shutil.copytree(aniso_sites[1], other)
    meta = json.loads((other / "dataset.json").read_text())
    meta["channel_names"] = {"0": "MRI"}
    (other / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(FedsegError, match="siteX.*channel_names"):
        plan_main([aniso_sites[0], other], tmp_path / "p2.json", 8.0)
    meta["channel_names"] = {"0": "CT"}
    meta["labels"] = {"background": 0, "organ": 1}
    (other / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(FedsegError, match="siteX.*labels"):
        plan_main([aniso_sites[0], other], tmp_path / "p2.json", 8.0)


def test_bad_cases_are_named() -> None:
    img = np.ones((1, 4, 5, 6), dtype=np.float32)
    lab = np.zeros((1, 4, 5, 6), dtype=np.int16)
    img[0, 1, 1, 1] = np.nan
    with pytest.raises(FedsegError, match="case c1: image contains NaN"):
        fingerprint_cases([Case("c1", img, lab, (1.0, 1.0, 1.0), np.eye(4))], {"0": "CT"})
    with pytest.raises(FedsegError, match="case c2: label shape"):
        fingerprint_cases([Case("c2", img[:, :3], lab, (1.0, 1.0, 1.0), np.eye(4))], {"0": "CT"})
    empty = fingerprint_cases(
        [Case("c3", np.ones_like(img), lab, (1.0, 1.0, 1.0), np.eye(4))], {"0": "CT"}
    )
    with pytest.raises(FedsegError, match="no foreground"):
        make_plan(empty, DatasetJson(channel_names={"0": "CT"}, labels=sd.LABELS))


FUNDUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fundus"


@pytest.mark.skipif(not FUNDUS.is_dir(), reason=f"{FUNDUS}: real fundus data absent")
def test_plan_of_real_2d_fundus_sites_equals_nnunet() -> None:
    """Real 2D RGB PNG sites (regions): nnU-Net's natural-image reader (spacing 999, 1, 1) and
    its 2D rules — no 3d_fullres, the 2d configuration — from the sum of the two sites'
    fingerprints, at 8 GB and at 2 GB (a smaller batch)."""
    sites = sorted(p for p in FUNDUS.iterdir() if (p / "dataset.json").is_file())
    fp = sum(compute_fingerprint(s) for s in sites)
    g = _golden("fundus")
    _check_fingerprint_matches_golden(fp, g)
    ds = read_dataset_json(sites[0])
    for gb, gp in g["plans"].items():
        ours = plan_configurations(fp, ds, gpu_memory_gb=float(gb))
        assert set(ours["configurations"]) == {"2d"}
        _compare_plans(ours, gp, f"fundus @ {gb} GB")
