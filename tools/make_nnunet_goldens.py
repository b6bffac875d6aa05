"""Write nnU-Net v2's own plans for fedseg's test datasets to ``tests/goldens/<name>.json``.

Why: fedseg's planner (``fedseg/planning/planner.py``) claims to make the plan nnU-Net v2 would
make on the POOLED data of all sites. The only convincing check is nnU-Net itself: this script
builds each dataset deterministically, pools all sites' ``imagesTr``/``labelsTr`` into one
nnU-Net raw dataset, runs nnU-Net's real fingerprint extraction and default
``ExperimentPlanner``, and stores the fields fedseg must reproduce. ``tests/test_planner.py``
then computes per-site fedseg fingerprints, ADDS them, plans, and compares.

nnunetv2 is NOT a fedseg dependency; run this in a separate environment::

    python3 -m venv /tmp/nnvenv && /tmp/nnvenv/bin/pip install torch==2.13.0 nnunetv2
    /tmp/nnvenv/bin/python tools/make_nnunet_goldens.py            # all datasets
    /tmp/nnvenv/bin/python tools/make_nnunet_goldens.py --only demo

Datasets (see ``tests/synthetic_datasets.py``): ``demo`` = ``fedseg.data.demo.make_demo_data(
sites=3, cases=10, test_cases=4, seed=0)`` (1 MRI channel, 3 scanners, small volumes);
``aniso_ct`` = anisotropic CT, 2 sites (10th-percentile spacing, transpose, CTNormalization);
``big_mri`` = 2-channel MRI at ~160^3, 2 sites (patch-size reduction under 8 GB). Each is
planned at nnU-Net's default 8 GB target and at smaller targets (more reductions; 0.1 GB makes
nnU-Net add a 3d_lowres configuration, which flips 3d_fullres' batch_dice); the plans are keyed
by the target in GB. ``fundus`` = the two real 2D sites of ``../shared/data/fundus`` (RGB
PNG, regions; the test skips when that folder is absent). ``random``
(``random_fingerprints.json``): nnU-Net's planner on 80 random fingerprints (per-case
spacings and cropped shapes written straight into nnU-Net's ``dataset_fingerprint.json``, no
images) at 8 GB and a random target — the rules on many more
shapes, anisotropies, ties and budgets than image datasets could cover cheaply. ``large_ct``:
four ~320^3 CT cases at ~0.8 mm on two sites (``synthetic_datasets.LARGE_CT``), also written
as fingerprint lists without images; nnU-Net makes ``3d_lowres`` and ``3d_cascade_fullres``
for it at 8 and 4 GB and drops its lowres at 24 GB. ``resampling``: nnU-Net's
``resample_data_or_seg_to_shape`` (the plan's default orders) on tiny arrays, isotropic and
anisotropic, images and label maps. ``resenc`` (``resenc.json``): nnU-Net's
``nnUNetPlannerResEncM`` and ``nnUNetPlannerResEncL`` on the SAME fingerprints the goldens
above hold (demo, aniso_ct, big_mri and large_ct from their golden files, so run it after them;
the RESENC_RANDOM random datasets), each at its own target (M 8 GB, L 24 GB) and a
smaller one; configurations also keep ``network_class_name``, ``n_blocks_per_stage`` and
``data_identifier``.

Each configuration keeps the geometry fields, the resampling settings and the cascade links
(``next_stage``; ``3d_cascade_fullres`` as nnU-Net writes it, ``inherits_from`` and
``previous_stage``, and ``resolved`` = what nnU-Net's ``PlansManager.get_configuration``
returns for it). Goldens written before the resampling/cascade fields were recorded lack them;
``tests/test_planner.py`` compares what a golden holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import synthetic_datasets as sd  # noqa: E402

GPU_TARGETS = {"demo": [8.0, 0.1], "aniso_ct": [8.0, 0.5, 0.1], "big_mri": [8.0, 4.0],
               "fundus": [8.0, 2.0]}
DATASET_IDS = {"demo": 1, "aniso_ct": 2, "big_mri": 3, "fundus": 4}
LARGE_CT_ID = 5
FUNDUS = REPO.parent / "shared" / "data" / "fundus"  # real 2D data (not in the repository)
CONFIG_FIELDS = (
    "spacing",
    "patch_size",
    "batch_size",
    "median_image_size_in_voxels",
    "normalization_schemes",
    "use_mask_for_norm",
    "batch_dice",
)
OPTIONAL_FIELDS = (  # absent from some configurations (next_stage) or from older nnU-Nets
    "next_stage",
    "resampling_fn_data",
    "resampling_fn_data_kwargs",
    "resampling_fn_seg",
    "resampling_fn_seg_kwargs",
    "resampling_fn_probabilities",
    "resampling_fn_probabilities_kwargs",
)
ARCH_FIELDS = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
               "n_blocks_per_stage", "n_conv_per_stage_decoder")  # of those each class has


def build_sites(name: str, root: Path) -> list[Path]:
    """The per-site raw datasets of ``name`` under ``root``."""
    if name == "demo":
        from fedseg.data.demo import make_demo_data

        return make_demo_data(root, sites=3, cases=10, test_cases=4, seed=0)
    if name == "fundus":  # the real 2D RGB sites: nnU-Net's 2D rules and natural-image reader
        return sorted(p for p in FUNDUS.iterdir() if (p / "dataset.json").is_file())
    return sd.write_sites(name, root)


def pool(sites: list[Path], raw_root: Path, dataset_id: int, name: str) -> Path:
    """Copy every site's training cases into ``raw_root/DatasetXXX_name`` (nnU-Net layout)."""
    out = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir(parents=True)
    meta = json.loads((sites[0] / "dataset.json").read_text())
    n = 0
    for s in sites:
        for f in sorted((s / "imagesTr").iterdir()):
            shutil.copy(f, out / "imagesTr" / f.name)
        for f in sorted((s / "labelsTr").iterdir()):
            shutil.copy(f, out / "labelsTr" / f.name)
            n += 1
    ds = {
        "name": name,
        "channel_names": meta["channel_names"],
        "labels": meta["labels"],
        "numTraining": n,
        "file_ending": meta.get("file_ending", ".nii.gz"),
        **({"regions_class_order": meta["regions_class_order"]}
           if "regions_class_order" in meta else {}),
    }
    (out / "dataset.json").write_text(json.dumps(ds, indent=2))
    return out


def run_nnunet(dataset_id: int, targets: list[float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """nnU-Net's fingerprint and, per GPU target, its plans (environment already set)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    fingerprint = DatasetFingerprintExtractor(dataset_id, num_processes=2).run(
        overwrite_existing=True
    )
    plans = {}
    for gb in targets:
        planner = ExperimentPlanner(
            dataset_id, gpu_memory_target_in_gb=gb, plans_name=f"nnUNetPlans_{gb:g}GB"
        )
        plans[f"{gb:g}"] = planner.plan_experiment()
    return fingerprint, plans


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def _config_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    arch = cfg["architecture"]["arch_kwargs"]
    c = {k: cfg[k] for k in CONFIG_FIELDS}
    c.update({k: cfg[k] for k in OPTIONAL_FIELDS if k in cfg})
    c.update({k: arch[k] for k in ARCH_FIELDS if k in arch})
    if "n_blocks_per_stage" in arch:  # ResEnc: the class and the identifier matter too
        c["network_class_name"] = cfg["architecture"]["network_class_name"].rsplit(".", 1)[-1]
        c["data_identifier"] = cfg["data_identifier"]
    return c


def golden(name: str, sites: list[Path] | dict[str, list[str]], fingerprint: dict,
           plans: dict) -> dict[str, Any]:
    import nnunetv2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    out_plans = {}
    for gb, p in plans.items():
        configs = {}
        for cname, cfg in p["configurations"].items():
            if "architecture" not in cfg:  # 3d_cascade_fullres: a stub that inherits
                resolved = PlansManager(p).get_configuration(cname).configuration
                configs[cname] = {**{k: cfg[k] for k in cfg},
                                  "resolved": _config_fields(resolved)}
                continue
            configs[cname] = _config_fields(cfg)
        out_plans[gb] = {
            "transpose_forward": p["transpose_forward"],
            "transpose_backward": p["transpose_backward"],
            "original_median_spacing_after_transp": p["original_median_spacing_after_transp"],
            "original_median_shape_after_transp": p["original_median_shape_after_transp"],
            "configurations": configs,
        }
    return _jsonable({
        "name": name,
        "generated_by": "tools/make_nnunet_goldens.py",
        "nnunetv2_version": getattr(nnunetv2, "__version__", None) or _dist_version("nnunetv2"),
        "sites": sites if isinstance(sites, dict) else {
            s.name: sorted(f.name for f in (s / "labelsTr").iterdir()) for s in sites},
        "fingerprint": {
            "spacings": fingerprint["spacings"],
            "shapes_after_crop": fingerprint["shapes_after_crop"],
            "median_relative_size_after_cropping": fingerprint[
                "median_relative_size_after_cropping"
            ],
        },
        "foreground_intensity_properties_per_channel": fingerprint[
            "foreground_intensity_properties_per_channel"
        ],
        "plans": out_plans,
    })


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:
        return None


# ---- random fingerprints: the planner rules on many datasets, without images --------------

RANDOM_DATASETS = 80
RANDOM_CHANNELS = ["CT", "T1", "T2", "ADC", "FLAIR", "noNorm", "zscore", "rescale_to_0_1"]


def random_dataset(rng: Any, i: int) -> dict[str, Any]:
    """Per-case spacings / cropped shapes / relative sizes of a random dataset.

    Patterns: isotropic, one anisotropic axis (thick slices, few of them), mixed, tiny and huge
    volumes; spacings are float32 values (as read from NIfTI headers), often repeated across
    cases (scanners share protocols), so medians and the 10th percentile hit ties and
    interpolations alike.
    """
    import numpy as np

    n = int(rng.integers(1, 41))
    pattern = str(rng.choice(["iso", "aniso", "aniso", "mixed", "tiny", "huge"]))
    axis = int(rng.integers(0, 3))
    if pattern == "iso":
        base_sp = np.full(3, rng.uniform(0.4, 1.5))
        base_sh = rng.uniform(40, 300, 3)
    elif pattern == "aniso":
        base_sp = rng.uniform(0.4, 1.2, 3)
        base_sp[1:] = base_sp[1]  # in-plane isotropic...
        base_sp = np.roll(base_sp, axis)
        base_sp[axis] = rng.uniform(2.5, 8.0)  # ...and one thick axis
        base_sh = rng.uniform(120, 520, 3)
        base_sh[axis] = rng.uniform(10, 80)
    elif pattern == "mixed":
        base_sp = rng.uniform(0.3, 3.0, 3)
        base_sh = rng.uniform(20, 400, 3)
    elif pattern == "tiny":
        base_sp = rng.uniform(0.5, 2.0, 3)
        base_sh = rng.uniform(8, 40, 3)
    else:
        base_sp = rng.uniform(0.6, 1.0, 3)
        base_sh = rng.uniform(300, 700, 3)
    protocols = [base_sp * rng.uniform(0.75, 1.3, 3) for _ in range(int(rng.integers(1, 5)))]
    spacings, shapes, rel = [], [], []
    for _ in range(n):
        if rng.random() < 0.6:
            sp = protocols[int(rng.integers(0, len(protocols)))]
        else:
            sp = base_sp * rng.uniform(0.7, 1.4, 3)
        sp = [float(np.float32(v)) for v in sp]
        sh = [max(8, int(v)) for v in base_sh * rng.uniform(0.7, 1.4, 3)]
        spacings.append(sp)
        shapes.append(sh)
        rel.append(float(rng.choice([1.0, rng.uniform(0.3, 1.0)])))
    n_ch = int(rng.integers(1, 4))
    channels = {str(c): str(rng.choice(RANDOM_CHANNELS)) for c in range(n_ch)}
    labels = {"background": 0, **{f"l{k}": k for k in range(1, int(rng.integers(2, 6)))}}
    gbs = sorted({float(rng.choice([2, 4, 6, 8, 11, 24, 40, 80])), 8.0})
    return {"id": i, "pattern": pattern, "channel_names": channels, "labels": labels,
            "spacings": spacings, "shapes_after_crop": shapes, "relative_sizes": rel,
            "gpu_memory_gb": gbs}


def plans_from_lists(work: Path, did: int, raw_name: str, channel_names: dict[str, str],
                     labels: dict[str, int], spacings: list, shapes: list,
                     median_relative_size: float, gbs: list[float],
                     planners: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """nnU-Net's ExperimentPlanner on a fingerprint written from per-case lists (no images),
    per GPU target in GB; with ``planners`` ({planner class name: targets}), those planners'
    plans per class name and target instead."""
    import nibabel as nib
    import numpy as np
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    raw = work / "raw" / f"Dataset{did:03d}_{raw_name}"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    for c in channel_names:  # one dummy case: nnU-Net looks up the reader from it
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)),
                 str(raw / "imagesTr" / f"dummy_{int(c):04d}.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)),
             str(raw / "labelsTr" / "dummy.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": channel_names, "labels": labels,
        "numTraining": len(spacings), "file_ending": ".nii.gz",
    }))
    pre = work / "preprocessed" / raw.name
    pre.mkdir(parents=True)
    dummy_props = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": 0.0, "max": 1.0,
                   "percentile_99_5": 1.0, "percentile_00_5": 0.0}
    (pre / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "median_relative_size_after_cropping": median_relative_size,
        "foreground_intensity_properties_per_channel": {c: dummy_props for c in channel_names},
    }))
    if planners is not None:
        from nnunetv2.experiment_planning.experiment_planners.residual_unets import (
            residual_encoder_unet_planners as resenc,
        )

        return {name: {f"{gb:g}": getattr(resenc, name)(did, gpu_memory_target_in_gb=gb)
                       .plan_experiment() for gb in targets}
                for name, targets in planners.items()}
    return {f"{gb:g}": ExperimentPlanner(did, gpu_memory_target_in_gb=gb,
                                         plans_name=f"nnUNetPlans_{gb:g}GB").plan_experiment()
            for gb in gbs}


def random_goldens(work: Path) -> dict[str, Any]:
    """nnU-Net's ExperimentPlanner on RANDOM_DATASETS random fingerprints."""
    import numpy as np

    rng = np.random.default_rng(sd.SEED)
    entries = []
    for i in range(RANDOM_DATASETS):
        d = random_dataset(rng, i)
        plans = plans_from_lists(work, 100 + i, f"random{i}", d["channel_names"], d["labels"],
                                 d["spacings"], d["shapes_after_crop"],
                                 float(np.median(d["relative_sizes"])), d["gpu_memory_gb"])
        d["plans"] = golden("random", {}, {"spacings": [], "shapes_after_crop": [],
                            "median_relative_size_after_cropping": None,
                            "foreground_intensity_properties_per_channel": {}}, plans)["plans"]
        entries.append(d)
        print(f"random dataset {i}: {d['pattern']}, {len(d['spacings'])} cases", flush=True)
    return {"name": "random_fingerprints", "generated_by": "tools/make_nnunet_goldens.py",
            "nnunetv2_version": _dist_version("nnunetv2"), "datasets": entries}


def large_ct_golden(work: Path) -> dict[str, Any]:
    """nnU-Net's plans for ``synthetic_datasets.LARGE_CT`` (fingerprint lists, no images)."""
    import numpy as np

    spacings, shapes, rel, _ = sd.large_ct_lists()
    median_rel = float(np.median(rel))
    plans = plans_from_lists(work, LARGE_CT_ID, "large_ct", sd.LARGE_CT_CHANNELS, sd.LABELS,
                             spacings, shapes, median_rel, sd.LARGE_CT_GPU_TARGETS)
    sites = {s: sd.large_ct_lists(s)[3] for s in sd.LARGE_CT}
    return golden("large_ct", sites, {
        "spacings": spacings, "shapes_after_crop": shapes,
        "median_relative_size_after_cropping": median_rel,
        "foreground_intensity_properties_per_channel": {},  # not planned from images
    }, plans)


# ---- ResEnc M/L: nnU-Net's residual-encoder planners on the goldens' fingerprints ----------

RESENC_PLANNERS = {"nnUNetPlannerResEncM": [8.0, 4.0], "nnUNetPlannerResEncL": [24.0, 11.0]}
# 14 of the random datasets (every pattern but "huge", whose lowres searches instantiate
# ResEnc networks by the hundred: 25 min on two cores for the first 23): 5 with a 3d_lowres
RESENC_RANDOM = (1, 2, 3, 4, 5, 7, 9, 10, 12, 14, 16, 17, 19, 21)
RESENC_ID = 300


def _resenc_sources(out: Path) -> list[dict[str, Any]]:
    """The fingerprints (per-case lists) of the image goldens, large_ct and the
    RESENC_RANDOM random datasets, with their channel names and labels."""
    from fedseg.data.demo import LABELS as DEMO_LABELS

    channels = {"demo": {"0": "MRI"}, **{n: d.channel_names for n, d in sd.DATASETS.items()},
                "large_ct": sd.LARGE_CT_CHANNELS}
    sources = []
    for name in ("demo", "aniso_ct", "big_mri", "large_ct"):
        fp = json.loads((out / f"{name}.json").read_text())["fingerprint"]
        n = len(fp["spacings"])
        sources.append({
            "source": name, "channel_names": channels[name],
            "labels": dict(DEMO_LABELS) if name == "demo" else dict(sd.LABELS),
            "spacings": fp["spacings"], "shapes_after_crop": fp["shapes_after_crop"],
            "relative_sizes": [fp["median_relative_size_after_cropping"]] * n,
        })
    rnd = json.loads((out / "random_fingerprints.json").read_text())["datasets"]
    for d in (d for d in rnd if d["id"] in RESENC_RANDOM):
        sources.append({"source": f"random{d['id']}", **{k: d[k] for k in (
            "channel_names", "labels", "spacings", "shapes_after_crop", "relative_sizes")}})
    return sources


def resenc_golden(work: Path, out: Path) -> dict[str, Any]:
    """nnU-Net's ResEnc M and L plans (RESENC_PLANNERS) for :func:`_resenc_sources`."""
    import numpy as np

    entries = []
    for i, src in enumerate(_resenc_sources(out)):
        plans = plans_from_lists(work, RESENC_ID + i, f"resenc{i}", src["channel_names"],
                                 src["labels"], src["spacings"], src["shapes_after_crop"],
                                 float(np.median(src["relative_sizes"])), [],
                                 planners=RESENC_PLANNERS)
        empty = {"spacings": [], "shapes_after_crop": [],
                 "median_relative_size_after_cropping": None,
                 "foreground_intensity_properties_per_channel": {}}
        src["plans"] = {name: golden("resenc", {}, empty, p)["plans"]
                        for name, p in plans.items()}
        entries.append(src)
        print(f"resenc {src['source']}: {len(src['spacings'])} cases", flush=True)
    return {"name": "resenc", "generated_by": "tools/make_nnunet_goldens.py",
            "nnunetv2_version": _dist_version("nnunetv2"), "datasets": entries}


# ---- resampling: nnU-Net's resample_data_or_seg_to_shape on tiny arrays --------------------

RESAMPLING_CASES = [
    # name, input shape, current spacing, new spacing, is_seg, order (order_z 0, force None)
    ("image_iso_order3", (6, 7, 5), (1.0, 1.0, 1.0), (0.7, 1.4, 0.8), False, 3),
    ("image_iso_order1", (6, 7, 5), (1.0, 1.0, 1.0), (0.7, 1.4, 0.8), False, 1),
    ("image_aniso_axis0", (4, 9, 8), (4.0, 1.0, 1.0), (2.5, 0.8, 1.3), False, 3),
    ("image_aniso_axis2", (9, 8, 4), (1.0, 1.0, 4.0), (1.2, 0.7, 3.0), False, 3),
    ("seg_iso", (7, 6, 8), (1.0, 1.0, 1.0), (0.6, 1.3, 0.9), True, 1),
    ("seg_aniso_axis0", (4, 9, 8), (4.0, 1.0, 1.0), (2.5, 0.8, 1.3), True, 1),
]


def resampling_golden() -> dict[str, Any]:
    """Inputs and nnU-Net's outputs (the plan's default kwargs; integer-valued inputs keep the
    file small): the reference for ``fedseg.training.resample``."""
    import numpy as np
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )

    rng = np.random.default_rng(sd.SEED)
    cases = []
    for name, shape, cur, new, is_seg, order in RESAMPLING_CASES:
        if is_seg:  # labels -1 (outside the body), 0, 1, 2 in blobs
            smooth = np.cumsum(np.cumsum(rng.normal(size=shape), 0), 1)
            data = np.digitize(smooth, np.quantile(smooth, [0.15, 0.5, 0.8])) - 1
            data = data.astype(np.int16)[None]
        else:
            data = rng.integers(-200, 200, shape).astype(np.float32)[None]
        new_shape = compute_new_shape(shape, cur, new)
        kwargs = {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}
        out = resample_data_or_seg_to_shape(data, new_shape, cur, new, **kwargs)
        cases.append({"name": name, "current_spacing": list(cur), "new_spacing": list(new),
                      "new_shape": [int(i) for i in new_shape], "kwargs": kwargs,
                      "input": data[0].tolist(), "output": out[0].tolist()})
    return {"name": "resampling", "generated_by": "tools/make_nnunet_goldens.py",
            "nnunetv2_version": _dist_version("nnunetv2"), "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "goldens")
    names = [*DATASET_IDS, "random", "large_ct", "resampling", "resenc"]
    ap.add_argument("--only", nargs="*", choices=names, default=names)
    ap.add_argument("--keep", action="store_true", help="keep the temporary nnU-Net folders")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedseg-goldens-"))
    for sub in ("raw", "preprocessed", "results"):
        (work / sub).mkdir()
    # nnunetv2.paths reads these at import time: set them before importing nnunetv2
    os.environ["nnUNet_raw"] = str(work / "raw")
    os.environ["nnUNet_preprocessed"] = str(work / "preprocessed")
    os.environ["nnUNet_results"] = str(work / "results")
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.only:
            if name == "resenc":
                path = args.out / "resenc.json"
                path.write_text(json.dumps(_jsonable(resenc_golden(work, args.out)),
                                           indent=None) + "\n")
                print(f"wrote {path}")
                continue
            if name == "random":
                path = args.out / "random_fingerprints.json"
                path.write_text(json.dumps(_jsonable(random_goldens(work)), indent=None) + "\n")
                print(f"wrote {path}")
                continue
            if name in ("large_ct", "resampling"):
                path = args.out / f"{name}.json"
                g = large_ct_golden(work) if name == "large_ct" else resampling_golden()
                path.write_text(json.dumps(_jsonable(g), indent=None if name == "resampling"
                                           else 1) + "\n")
                print(f"wrote {path}")
                continue
            sites = build_sites(name, work / "sites" / name)
            pool(sites, work / "raw", DATASET_IDS[name], name)
            fingerprint, plans = run_nnunet(DATASET_IDS[name], GPU_TARGETS[name])
            g = golden(name, sites, fingerprint, plans)
            path = args.out / f"{name}.json"
            path.write_text(json.dumps(g, indent=1) + "\n")
            print(f"wrote {path}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
