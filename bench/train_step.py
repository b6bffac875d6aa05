"""Training speed: is fedseg's loader + augmentation ever the bottleneck, and how does it compare
to nnU-Net v2 on the same data?

Why three numbers, measured in one run on one device and one plan:

(a) pure compute: a fixed batch already on the device, forward + Dice/CE + backward + SGD step
    (the ceiling; anchors.md has H100 figures for the nnU-Net-sized network);
(b) fedseg end to end: ``LocalTrainer.run`` (memory-mapped patch sampling in loader workers,
    host->device copy on a side stream, nnU-Net's augmentations on the device, the step);
(c) nnU-Net v2's own ``nnUNetTrainer`` (CPU augmentation in its worker processes, fp16 autocast,
    its compile default driven by ``--compile``) on the same cases written in its format —
    only if ``nnunetv2`` is importable, else recorded as "not installed".

Targets on a GPU: b >= 0.9 a (data never starves the GPU) and b >= 1.5 c.

Real data (``--data SITE [SITE ...]``): (a) and (b) on the pooled training split of real site
folders (e.g. ``../shared/data/hippocampus/site*``: 158 cases), planned with ``fedseg plan
--preset`` and preprocessed by fedseg's own cache: (b) then pays for what a synthetic set hides
(all their training cases, of different shapes, real class locations, the memory-mapped cache). Target on any
device: b >= 0.8 a. (c) is skipped there (nnU-Net would need its own preprocessing of the same
cases; the synthetic mode compares trainers on identical arrays).
Rates are steady state: the first ``--warmup`` iterations (compilation, cuDNN autotuning,
worker start-up) are excluded; (b) is also reported including start-up.

    python bench/train_step.py --device cuda --amp --compile --json bench.json
    python bench/train_step.py --device cpu --tiny --json bench_cpu.json      # ~1 minute
    python bench/train_step.py --device cpu --data ../shared/data/hippocampus/site* --preset tiny
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedseg.models.network import num_parameters  # noqa: E402
from fedseg.planning.plan import ConfigurationPlan, IntensityProperties, Plan  # noqa: E402
from fedseg.training.preprocess import (  # noqa: E402
    CaseProperties,
    PreprocessedCase,
    foreground_label_groups,
    sample_class_locations,
    save_preprocessed,
)
from fedseg.training.trainer import LocalTrainer, TrainConfig, poly_lr  # noqa: E402

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def bench_plan(tiny: bool) -> Plan:
    """nnU-Net's default 3d_fullres topology for a 128^3 patch (anchors.md), or a CPU-sized one."""
    if tiny:
        feats, patch, batch = [8, 16, 32, 64], [32, 32, 32], 2
    else:
        feats, patch, batch = [32, 64, 128, 256, 320, 320], [128, 128, 128], 2
    n = len(feats)
    cfg = ConfigurationPlan(
        data_identifier="nnUNetPlans_3d_fullres",
        spacing=[1.0, 1.0, 1.0],
        median_image_size_in_voxels=[float(p) * 1.3 for p in patch],
        patch_size=patch,
        batch_size=batch,
        normalization_schemes=["ZScoreNormalization"],
        use_mask_for_norm=[False],
        n_stages=n,
        features_per_stage=feats,
        kernel_sizes=[[3, 3, 3]] * n,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        n_conv_per_stage=[2] * n,
        n_conv_per_stage_decoder=[2] * (n - 1),
        batch_dice=False,
    )
    props = IntensityProperties(
        mean=0.0, std=1.0, median=0.0, min=-4.0, max=4.0, percentile_00_5=-3.0,
        percentile_99_5=3.0,
    )
    return Plan(
        dataset_name="Dataset999_FedsegBench",
        channel_names={"0": "MR"},
        labels=dict(LABELS),
        num_training_cases=8,
        gpu_memory_gb=8.0,
        transpose_forward=[0, 1, 2],
        transpose_backward=[0, 1, 2],
        original_median_spacing_after_transp=[1.0, 1.0, 1.0],
        original_median_shape_after_transp=cfg.median_image_size_in_voxels,
        foreground_intensity_properties_per_channel={"0": props},
        configurations={"3d_fullres": cfg},
    )


def synth_case(shape: tuple[int, int, int], rng: np.random.Generator):
    """An organ (ellipsoid) holding a lesion (ball), intensity + noise, z-scored."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    c = [rng.uniform(0.35, 0.65) * s for s in shape]
    r = [rng.uniform(0.2, 0.3) * s for s in shape]
    organ = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r, strict=True)) <= 1
    lc = [ci + rng.uniform(-0.4, 0.4) * ri for ci, ri in zip(c, r, strict=True)]
    lr = 0.3 * min(r)
    lesion = sum((g - ci) ** 2 for g, ci in zip(grids, lc, strict=True)) <= lr**2
    seg = np.zeros((1, *shape), np.int8)
    seg[0][organ] = 1
    seg[0][lesion & organ] = 2
    img = (seg.astype(np.float32) + rng.standard_normal((1, *shape), dtype=np.float32) * 0.5)
    img = (img - img.mean()) / img.std()
    return img.astype(np.float32), seg


def write_cases(root: Path, plan: Plan, n: int, tiny: bool, seed: int = 0) -> tuple[Path, Path]:
    """The same synthetic cases in fedseg's cache format and in nnU-Net v2's preprocessed one."""
    rng = np.random.default_rng(seed)
    ours = root / "fedseg" / plan.hash() / "3d_fullres"
    nn_base = root / "nnUNet_preprocessed" / plan.dataset_name
    nn_dir = nn_base / "nnUNetPlans_3d_fullres"
    ours.mkdir(parents=True)
    nn_dir.mkdir(parents=True)
    lo, hi = ((40, 56) if tiny else (150, 230))
    for i in range(n):
        shape = tuple(int(rng.integers(lo, hi)) for _ in range(3))
        img, seg = synth_case(shape, rng)
        locs = sample_class_locations(seg, foreground_label_groups(plan))
        props = CaseProperties(
            case_id=f"case_{i:03d}", plan_hash=plan.hash(), config="3d_fullres",
            original_shape=list(shape), original_spacing=[1.0] * 3, affine=np.eye(4).tolist(),
            spacing_transposed=[1.0] * 3, shape_before_cropping=list(shape),
            bbox_used_for_cropping=[[0, s] for s in shape],
            shape_after_cropping_and_before_resampling=list(shape), target_spacing=[1.0] * 3,
            shape_after_resampling=list(shape), class_locations=locs,
        )
        save_preprocessed(ours, PreprocessedCase(img, seg, props))
        # nnU-Net v2: .npz (+ unpacked .npy) and a .pkl with class_locations (channel first)
        cid = f"case_{i:03d}"
        np.savez(nn_dir / f"{cid}.npz", data=img, seg=seg)
        np.save(nn_dir / f"{cid}.npy", img)
        np.save(nn_dir / f"{cid}_seg.npy", seg)
        nn_locs = {
            int(k): np.concatenate([np.zeros((len(v), 1), int), np.asarray(v, int).reshape(-1, 3)], 1)
            for k, v in locs.items()
        }
        nn_props = {
            "class_locations": nn_locs, "spacing": [1.0] * 3, "shape_before_cropping": shape,
            "bbox_used_for_cropping": [[0, s] for s in shape],
            "shape_after_cropping_and_before_resampling": shape,
        }
        with open(nn_dir / f"{cid}.pkl", "wb") as f:
            pickle.dump(nn_props, f)
    return ours, nn_base


def nnunet_plans(plan: Plan) -> dict:
    cfg = plan.config()
    n = cfg.n_stages
    return {
        "dataset_name": plan.dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": plan.original_median_spacing_after_transp,
        "original_median_shape_after_transp": plan.original_median_shape_after_transp,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": plan.transpose_forward,
        "transpose_backward": plan.transpose_backward,
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": cfg.batch_size,
                "patch_size": cfg.patch_size,
                "median_image_size_in_voxels": cfg.median_image_size_in_voxels,
                "spacing": cfg.spacing,
                "normalization_schemes": cfg.normalization_schemes,
                "use_mask_for_norm": cfg.use_mask_for_norm,
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                              "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                             "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name":
                        "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": n,
                        "features_per_stage": cfg.features_per_stage,
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": cfg.kernel_sizes,
                        "strides": cfg.strides,
                        "n_conv_per_stage": cfg.n_conv_per_stage,
                        "n_conv_per_stage_decoder": cfg.n_conv_per_stage_decoder,
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": cfg.batch_dice,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            k: v.model_dump() for k, v in plan.foreground_intensity_properties_per_channel.items()
        },
    }


def real_cases(sites: list[Path], preset: str, root: Path) -> tuple[Plan, Path, int]:
    """Plan (``fedseg plan --preset``) and preprocess the pooled training split of real sites."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import make_view

    from fedseg.training.preprocess import preprocess_dataset

    view = root / "pooled"
    n = make_view(view, sites, split=False)
    plan = plan_sites(sites, preset, root / "plan.json")
    return plan, preprocess_dataset(view, plan, root / "cache", "3d_fullres"), n


def plan_sites(sites: list[Path], preset: str, plan_path: Path) -> Plan:
    """The plan ``fedseg plan --preset`` makes for ``sites`` (the product's own planner)."""
    subprocess.run([sys.executable, "-m", "fedseg.cli", "plan", *map(str, sites), "--out",
                    str(plan_path), "--preset", preset], check=True, stdout=subprocess.DEVNULL)
    return Plan.load(plan_path)


def device_name(dev: torch.device) -> str:
    return (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")


def emit(out: dict, json_path: Path | None) -> dict:
    """Print the result and write it to ``json_path`` (if given)."""
    text = json.dumps(out, indent=2)
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_compute(tr: LocalTrainer, iters: int, warmup: int) -> float:
    """(a) fixed batch on the device, the trainer's own step."""
    c = len(tr.plan.channel_names)
    g = torch.Generator(device="cpu").manual_seed(0)
    image = torch.randn((tr.batch_size, c, *tr.patch_size), generator=g).to(tr.device)
    seg = torch.randint(0, tr.plan.num_classes, (tr.batch_size, 1, *tr.patch_size), generator=g)
    seg = seg.to(tr.device)
    for _ in range(warmup):
        tr.train_step(image, seg, 1e-3)
    _sync(tr.device)
    t0 = time.perf_counter()
    for i in range(iters):
        tr.train_step(image, seg, poly_lr(1e-3, i, iters))
    _sync(tr.device)
    return iters / (time.perf_counter() - t0)


def bench_fedseg(tr: LocalTrainer, iters: int, warmup: int) -> tuple[float, float]:
    """(b) LocalTrainer.run: loader + device augmentation + step. (steady, incl. start-up)"""
    marks: dict[str, float] = {}

    def on_step(done: int, _loss: float | None) -> None:
        if done == warmup:
            _sync(tr.device)
            marks["t0"] = time.perf_counter()
        if done == warmup + iters:
            _sync(tr.device)
            marks["t1"] = time.perf_counter()

    t_start = time.perf_counter()
    tr.run(warmup + iters, 0, warmup + iters, progress=on_step, report_every=None)
    t_all = marks["t1"] - t_start  # excludes the final state save
    return iters / (marks["t1"] - marks["t0"]), (warmup + iters) / t_all


def bench_nnunet(plan: Plan, nn_base: Path, root: Path, device: torch.device, iters: int,
                 warmup: int, compile_: bool) -> float | str:
    """(c) nnU-Net v2's trainer on the same cases; a string says why there is no number."""
    if importlib.util.find_spec("nnunetv2") is None:
        return "not installed"
    os.environ["nnUNet_raw"] = str(root / "nnUNet_raw")
    os.environ["nnUNet_preprocessed"] = str(root / "nnUNet_preprocessed")
    os.environ["nnUNet_results"] = str(root / "nnUNet_results")
    os.environ["nnUNet_compile"] = "true" if compile_ else "false"
    os.environ.setdefault("nnUNet_n_proc_DA", str(min(12, os.cpu_count() or 2)))
    for d in ("nnUNet_raw", "nnUNet_results"):
        (root / d).mkdir(exist_ok=True)
    plans = nnunet_plans(plan)
    ds_json = {"channel_names": plan.channel_names, "labels": plan.labels,
               "numTraining": plan.num_training_cases, "file_ending": ".nii.gz"}
    (nn_base / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
    (nn_base / "dataset.json").write_text(json.dumps(ds_json, indent=2))
    (nn_base / "dataset_fingerprint.json").write_text("{}")
    try:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        # nnU-Net >= 2.7 pops "continue_training" from the plans; older ones ignore it
        trainer = nnUNetTrainer(plans=dict(plans, continue_training=False),
                                configuration="3d_fullres", fold="all", dataset_json=ds_json,
                                device=device)
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        try:
            for _ in range(warmup):
                trainer.train_step(next(trainer.dataloader_train))
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                trainer.train_step(next(trainer.dataloader_train))  # syncs: returns loss on CPU
            _sync(device)
            return iters / (time.perf_counter() - t0)
        finally:
            for dl in (trainer.dataloader_train, trainer.dataloader_val):
                if hasattr(dl, "_finish"):
                    dl._finish()
    except Exception as err:  # noqa: BLE001 - report, don't crash the benchmark
        return f"error: {type(err).__name__}: {str(err)[:300]}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="small plan + cases for CPU (~1 min)")
    ap.add_argument("--iterations", type=int, default=None, help="measured steps per mode")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--compile", action="store_true", help="torch.compile (CUDA)")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="fedseg loader workers (auto)")
    ap.add_argument("--skip-nnunet", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--data", type=Path, nargs="+", default=None,
                    help="real site folders: measure (a) and (b) on their pooled training split")
    ap.add_argument("--preset", default="tiny", help="plan preset for --data (tiny | nnunet)")
    args = ap.parse_args(argv)

    real = args.data is not None
    if real:
        missing = [str(d) for d in args.data if not (d / "dataset.json").is_file()]
        if missing:
            ap.error(f"not a dataset folder (no dataset.json): {', '.join(missing)}")
    small = args.tiny or (real and args.preset == "tiny")
    iters = args.iterations or (15 if small else 100)
    warmup = args.warmup if args.warmup is not None else (3 if small else
                                                           (30 if args.compile else 15))
    with tempfile.TemporaryDirectory(prefix="fedseg-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        if real:
            plan, ours, n_cases = real_cases(args.data, args.preset, root)
            nn_base = None
        else:
            plan = bench_plan(args.tiny)
            ours, nn_base = write_cases(root, plan, args.cases, args.tiny)
            n_cases = args.cases
        data_s = time.perf_counter() - t
        cfg = TrainConfig(device=args.device, amp=args.amp, compile=args.compile,
                          num_workers=args.workers, seed=0)
        tr = LocalTrainer(plan, ours, root / "state", cfg)
        dev = tr.device
        a = bench_compute(tr, iters, warmup)
        b, b_all = bench_fedseg(tr, iters, warmup)
        c = "skipped" if args.skip_nnunet or nn_base is None else bench_nnunet(
            plan, nn_base, root, dev, iters, warmup, args.compile)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None

    cplan = plan.config()
    out = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "data": [str(d) for d in args.data] if real else "synthetic",
        "preset": args.preset if real else ("tiny" if args.tiny else "nnunet_3d_fullres_128"),
        "patch_size": cplan.patch_size,
        "batch_size": cplan.batch_size,
        "features_per_stage": cplan.features_per_stage,
        "parameters": num_parameters(tr.net),
        "amp_bf16": tr.amp,
        "compile": tr._compiled,
        "loader_workers": tr.num_workers,
        "iterations": iters,
        "warmup": warmup,
        "cases": n_cases,
        "data_generation_s": round(data_s, 1),
        "a_compute_it_s": round(a, 3),
        "b_fedseg_it_s": round(b, 3),
        "b_fedseg_incl_startup_it_s": round(b_all, 3),
        "c_nnunet_it_s": round(c, 3) if isinstance(c, float) else c,
        "ratio_b_over_a": round(b / a, 3),
        "ratio_b_over_c": round(b / c, 3) if isinstance(c, float) else None,
        "targets": ({"b_over_a": 0.8, "note": "real data, any device"} if real else
                    {"b_over_a": 0.9, "b_over_c": 1.5, "note": "GPU targets"}),
        "peak_gpu_memory_gib": round(peak, 2) if peak is not None else None,
        "nnunet_note": "nnU-Net trains with fp16 autocast + GradScaler and its own compile default",
    }
    return emit(out, args.json)


if __name__ == "__main__":
    main()
