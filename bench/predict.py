"""Prediction speed: ``fedseg predict`` vs nnU-Net v2's ``nnUNetPredictor``, s/case on the same
cases with a network of the same size, measured in one run on one device.

Why this comparison: a hospital segments new scans one folder at a time; the time per case of
the product's own path (read NIfTI, preprocess, sliding window with Gaussian blending and all 8
mirrorings, back to the original grid, write NIfTI) is what it waits for, and nnU-Net v2's
predictor doing the same work is the reference it would otherwise run.

Both sides get identical work: the same input files, the plan's patch size, tile step 0.5,
Gaussian weighting, mirroring on all axes, one model (nnU-Net's ``fold_all``). The networks have
the same topology (the plan's PlainConvUNet / MONAI DynUNet with the same stages and features;
parameter counts are in the JSON) with their own random initialisation, unless ``--model`` gives
a trained fedseg bundle: speed does not depend on the weights. nnU-Net runs in both of its modes
— ``predict_from_files`` (worker processes for preprocessing and export) and
``predict_from_files_sequential`` — and the FASTER one is the reference. One warm-up case per
side is excluded (first-call allocations, thread pools).

nnU-Net is installed in a side folder so that it stays out of fedseg's environment::

    pip install --target /tmp/nnunet_site nnunetv2==2.8.1
    PYTHONPATH=/tmp/nnunet_site .venv/bin/python bench/predict.py --device cpu \\
        --data ../shared/data/hippocampus/site* --preset tiny --json bench/results/predict_cpu.json

Target: fedseg s/case <= 1.0 x nnU-Net's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import device_name, emit, nnunet_plans, plan_sites  # noqa: E402

from fedseg.data.dataset import list_cases, read_dataset_json  # noqa: E402
from fedseg.models.bundle import BundleInfo, load_bundle, save_bundle  # noqa: E402
from fedseg.models.network import build_network, num_parameters, weights_of  # noqa: E402
from fedseg.planning.plan import Plan  # noqa: E402
from fedseg.training.predict import predict_files, resolve_device  # noqa: E402


def gather_inputs(sites: list[Path], folder: Path, max_cases: int | None) -> tuple[int, dict]:
    """Symbolic links to every site's test images (``imagesTs``) in one flat input folder."""
    folder.mkdir(parents=True)
    ds = read_dataset_json(sites[0])
    n = 0
    for site in sites:
        for case in list_cases(site, read_dataset_json(site), "Ts"):
            if max_cases is not None and n >= max_cases:
                break
            for img in case.images:
                (folder / img.name).symlink_to(img.resolve())
            n += 1
    if n < 2:
        raise SystemExit(f"need at least 2 test cases (one is the warm-up), found {n}")
    return n, ds.model_dump(mode="json", exclude_none=True)


def fedseg_model(args, root: Path, sites: list[Path]) -> Path:
    """The bundle to time: ``--model``, or the planned network with a random initialisation."""
    if args.model is not None:
        return args.model
    plan = plan_sites(sites, args.preset, root / "plan.json")
    torch.manual_seed(0)
    net = build_network(plan, "3d_fullres", deep_supervision=False)
    out = root / "fedseg_model"
    save_bundle(out, plan, read_dataset_json(sites[0]), weights_of(net),
                BundleInfo(config="3d_fullres", trained_iterations=0,
                           note="bench/predict.py: random initialisation"))
    return out


def time_fedseg(model: Path, inputs: Path, out: Path, device: str) -> dict:
    files = sorted(inputs.iterdir())
    t0 = time.perf_counter()
    predict_files(model, [files[0]], out / "warmup", device=device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = predict_files(model, files[1:], out / "pred", device=device)
    dt = time.perf_counter() - t0
    return {"s_per_case": dt / len(written), "cases": len(written), "warmup_case_s": warm}


def nnunet_model(plan: Plan, ds: dict, root: Path, device: torch.device) -> tuple[Path, int]:
    """An nnU-Net v2 results folder (plans.json, dataset.json, fold_all) for the same topology."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = root / "nnunet_model"
    (folder / "fold_all").mkdir(parents=True)
    plans = nnunet_plans(plan)
    nn_ds = {"channel_names": ds["channel_names"], "labels": ds["labels"],
             "numTraining": ds.get("numTraining", 1), "file_ending": ds["file_ending"]}
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(nn_ds, indent=2))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    n_in = determine_num_input_channels(pm, cm, nn_ds)
    n_out = pm.get_label_manager(nn_ds).num_segmentation_heads
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, cm, n_in, n_out,
                                                   enable_deep_supervision=False)
    torch.save({
        "network_weights": net.state_dict(),
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": "all",
                      "dataset_json": nn_ds, "device": device},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }, folder / "fold_all" / "checkpoint_final.pth")
    return folder, sum(p.numel() for p in net.parameters())


def time_nnunet(plan: Plan, ds: dict, inputs: Path, root: Path, device: torch.device,
                processes: int) -> dict:
    if importlib.util.find_spec("nnunetv2") is None:
        return {"error": "not installed (pip install --target DIR nnunetv2==2.8.1; "
                         "PYTHONPATH=DIR)"}
    for d in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(d, str(root / d))
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder, params = nnunet_model(plan, ds, root, device)
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
        perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
        verbose_preprocessing=False, allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=("all",))
    files = sorted(inputs.iterdir())
    lists = [[str(f)] for f in files]
    res: dict = {"parameters": params, "version": _version("nnunetv2")}
    for d in ("nn_warm", "nn_seq", "nn_mp"):
        (root / d).mkdir()
    predictor.predict_from_files_sequential(lists[:1], str(root / "nn_warm"), overwrite=True)
    t0 = time.perf_counter()
    predictor.predict_from_files_sequential(lists[1:], str(root / "nn_seq"), overwrite=True)
    res["sequential_s_per_case"] = (time.perf_counter() - t0) / (len(lists) - 1)
    t0 = time.perf_counter()
    predictor.predict_from_files(lists[1:], str(root / "nn_mp"), overwrite=True,
                                 num_processes_preprocessing=processes,
                                 num_processes_segmentation_export=processes)
    res["workers_s_per_case"] = (time.perf_counter() - t0) / (len(lists) - 1)
    res["worker_processes"] = processes
    res["s_per_case"] = min(res["sequential_s_per_case"], res["workers_s_per_case"])
    return res


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, nargs="+", required=True,
                    help="site folders whose imagesTs are predicted")
    ap.add_argument("--preset", default="tiny", help="plan preset when no --model (tiny | nnunet)")
    ap.add_argument("--model", type=Path, default=None, help="a trained fedseg bundle to time")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--nnunet-processes", type=int, default=min(3, os.cpu_count() or 1),
                    help="nnU-Net's preprocessing / export workers (its CLI's default is 3)")
    ap.add_argument("--skip-nnunet", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    missing = [str(d) for d in args.data if not (d / "dataset.json").is_file()]
    if missing:
        ap.error(f"not a dataset folder (no dataset.json): {', '.join(missing)}")

    dev = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="fedseg-bench-predict-") as tmp:
        root = Path(tmp)
        n, ds = gather_inputs(args.data, root / "in", args.max_cases)
        model = fedseg_model(args, root, args.data)
        plan = load_bundle(model)[0]
        net = build_network(plan, "3d_fullres", deep_supervision=False)
        ours = time_fedseg(model, root / "in", root / "fedseg", str(dev))
        print(f"fedseg: {ours['s_per_case']:.3f} s/case", file=sys.stderr, flush=True)
        ref = ({"error": "skipped"} if args.skip_nnunet
               else time_nnunet(plan, ds, root / "in", root, dev, args.nnunet_processes))
        shutil.rmtree(root / "in")
    cfg = plan.config()
    out = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "data": [str(d) for d in args.data],
        "cases": n,
        "measured_cases": n - 1,
        "model": str(args.model) if args.model else f"random init, preset {args.preset}",
        "patch_size": cfg.patch_size,
        "features_per_stage": cfg.features_per_stage,
        "fedseg_parameters": num_parameters(net),
        "fedseg": {k: round(v, 4) if isinstance(v, float) else v for k, v in ours.items()},
        "nnunet": {k: round(v, 4) if isinstance(v, float) else v for k, v in ref.items()},
        "ratio_fedseg_over_nnunet": (round(ours["s_per_case"] / ref["s_per_case"], 3)
                                     if "s_per_case" in ref else None),
        "target": "fedseg s/case <= 1.0 x nnU-Net's",
    }
    return emit(out, args.json)


if __name__ == "__main__":
    main()
