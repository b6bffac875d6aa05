"""``fedseg``: the command line of one site's pipeline (and, later, the federation simulator).

Sub-commands map one-to-one onto the data flow: ``demo-data`` → ``check-data`` → ``plan`` →
``train`` → (``ensemble``) → (``postprocess``) → ``predict`` → ``evaluate``; ``simulate`` runs
the whole federation on loopback; ``report`` redraws a run folder's report.
Heavy imports (torch, MONAI) happen inside each command so that ``fedseg --help`` and
``check-data`` start quickly. Every :class:`FedsegError` ends as one line on stderr and exit
code 2 — a user never sees a traceback for a mistake they can fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedseg.errors import run_cli

# the plan presets (fedseg.planning.presets.Preset), spelled out so that the parser does not
# import the planner; tests/test_resenc.py checks that the two lists agree
PRESETS = ("nnunet", "tiny", "resenc_m", "resenc_l", "resenc_tiny")


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from fedseg.data.demo import make_demo_data

    sites = make_demo_data(args.out, sites=args.sites, cases=args.cases,
                           test_cases=args.test_cases, seed=args.seed)
    for s in sites:
        print(s)
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from fedseg.data.validate import check_data_main

    rc = 0
    for d in args.data:
        rc = max(rc, check_data_main(d))
    return rc


def _cmd_plan(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedseg.planning.cli_impl import plan_main

    tty = sys.stderr.isatty()  # a log file gets one line per site, not a redrawn bar
    bar = tqdm(desc="fingerprint", unit="case", leave=False, disable=not tty)

    def progress(site: str, done: int, total: int, case_id: str) -> None:
        bar.set_description(f"fingerprint {Path(site).name}")
        bar.update(1)
        if not tty and done == total:
            print(f"fingerprint {Path(site).name}: {total} cases", file=sys.stderr, flush=True)

    plan = plan_main([Path(d) for d in args.data], Path(args.out), args.gpu_memory_gb,
                     progress=progress, preset=args.preset)
    bar.close()
    cfg = plan.config()
    print(
        f"plan written to {args.out}: {plan.default_configuration} spacing {cfg.spacing}, "
        f"patch {cfg.patch_size}, "
        f"batch {cfg.batch_size}, {cfg.n_stages} stages (hash {plan.hash()})"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fedseg.training.single_site import train_local
    from fedseg.training.trainer import TrainConfig

    lr = {} if args.lr is None else {"initial_lr": args.lr}
    conf = {} if args.configuration == "auto" else {"config": args.configuration}
    cfg = TrainConfig(device=args.device, seed=args.seed, batch_size=args.batch_size or None,
                      **lr, **conf)
    res = train_local(
        data_dir=Path(args.data), plan_path=Path(args.plan), iterations=args.iterations,
        out_dir=Path(args.out), cache_root=Path(args.cache) if args.cache else None, config=cfg,
        init_from=Path(args.init_from) if args.init_from else None,
        snapshot_every=args.snapshot_every,
    )
    print(f"model bundle written to {args.out} (last loss {res.loss:.4f}, "
          f"{res.iterations_per_s:.2f} it/s)")
    return 0


def _case_line(done: int, total: int, case_id: str | None, seconds: float) -> None:
    """One stderr line per case (log-friendly: no bar redrawn in a log file)."""
    what = f"cases, {case_id}" if case_id else "cases"
    print(f"predict: {done}/{total} {what} ({seconds:.1f} s)", file=sys.stderr, flush=True)


def _cmd_predict(args: argparse.Namespace) -> int:
    import time

    from fedseg.errors import FedsegError
    from fedseg.models.bundle_files import bundle_kind, check_bundle_folder
    from fedseg.models.ensemble import resolve_models

    # the user's paths first: importing torch can take many seconds on a busy machine
    models = [Path(m) for m in args.model]
    single = len(models) == 1 and bundle_kind(models[0]) == "single"
    if single:
        check_bundle_folder(models[0])
    else:
        members = resolve_models(models)  # every member there and compatible, one line if not
    inputs = [Path(p) for p in args.input]
    for p in inputs:
        if not p.exists():
            raise FedsegError(f"{p}: no such file or folder; give image files or a folder of "
                              "CASE_0000 files (e.g. CASE_0000.nii.gz, CASE_0000.png)")
    source = inputs if len(inputs) > 1 else inputs[0]
    from fedseg.models.bundle_postprocessing import decision_for, describe

    pp, pp_line = decision_for(models)  # which decision applies (-m A -m B: none)
    if args.no_postprocess and pp is not None:
        pp_line = f"postprocessing: off (--no-postprocess; the bundle's: {describe(pp)})"
    print(pp_line, file=sys.stderr, flush=True)
    if single:
        from fedseg.training.predict import predict_files

        last = [time.perf_counter()]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            _case_line(done, total, None, now - last[0])
            last[0] = now

        written = predict_files(models[0], source, Path(args.output), device=args.device,
                                mirror_tta=not args.no_tta, progress=progress,
                                postprocess=not args.no_postprocess)
    else:
        from fedseg.training.ensemble_predict import predict_ensemble_files

        print(f"predict: ensemble of {len(members)} models "
              f"({', '.join(f'{m.name} [{m.config}]' for m in members)})",
              file=sys.stderr, flush=True)
        written = predict_ensemble_files(models, source, Path(args.output),
                                         device=args.device, mirror_tta=not args.no_tta,
                                         progress=_case_line,
                                         postprocess=not args.no_postprocess)
    print(f"{len(written)} segmentation(s) written to {args.output}")
    return 0


def _cmd_postprocess(args: argparse.Namespace) -> int:
    from fedseg.errors import FedsegError
    from fedseg.models.bundle_files import bundle_kind, check_bundle_folder
    from fedseg.models.bundle_postprocessing import describe
    from fedseg.training.postprocess import Postprocessing

    model = Path(args.model)
    if bundle_kind(model) == "single":
        check_bundle_folder(model)  # before torch loads
    for site in args.data:
        if not (Path(site) / "dataset.json").is_file():
            raise FedsegError(f"{Path(site) / 'dataset.json'}: missing; give site dataset "
                              "folder(s) (nnU-Net raw layout with imagesTr/ and labelsTr/)")
    from fedseg.training.postprocess_eval import decide_into_bundle

    work = Path(args.work) if args.work else model.parent / f".{model.name}.postprocess"
    res = decide_into_bundle(model, [Path(d) for d in args.data], work, device=args.device,
                             cases="all" if args.all_cases else "validation")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    pp = Postprocessing.model_validate(res["postprocessing"])
    fg = res["decision"]["foreground"]
    print(f"postprocessing written to {model / 'bundle.json'}: {describe(pp)} (decided on "
          f"{res['validation_cases']} case(s); foreground Dice {fg['before']:.4f} -> "
          f"{fg['after']:.4f} with the all-foreground step)")
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from fedseg.models.ensemble import build_ensemble, read_ensemble

    bundles: list[str] | dict[str, str] = list(args.bundles)
    if args.names:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != len(args.bundles):
            from fedseg.errors import FedsegError

            raise FedsegError(f"--names: {len(names)} name(s) for {len(args.bundles)} bundle(s); "
                              "give one name per bundle")
        bundles = dict(zip(names, args.bundles, strict=True))
    out = build_ensemble(bundles, Path(args.out), note=args.note)
    info, _ = read_ensemble(out)
    print(f"ensemble bundle of {len(info.members)} models written to {out}: "
          + ", ".join(f"{m.name} ({m.config})" for m in info.members))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fedseg.training.evaluate import evaluate_folders, json_safe

    res = evaluate_folders(Path(args.pred), Path(args.labels), Path(args.json))
    summary = {"mean": res["mean"], "foreground_mean": res["foreground_mean"]}
    print(json.dumps(json_safe(summary), indent=2))
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedseg.simulate import job_overrides, simulate

    extra = {"aggregation": {"kind": args.aggregation}, "eval_every": args.eval_every,
             "secure_aggregation": args.secure_aggregation == "on",
             "per_site_metrics": args.per_site_metrics == "on"}
    if args.aggregation == "fedprox":
        extra["proximal_mu"] = args.mu
    if args.configuration != "auto":
        extra["configuration"] = args.configuration
    if args.folds > 1:
        extra["folds"] = args.folds
    if args.tensorboard:
        from fedseg.server.tracking import require

        require("--tensorboard")  # before any process starts
        extra["tensorboard"] = True
    if args.job_config:
        extra.update(job_overrides(Path(args.job_config)))
    simulate(
        Path(args.out), sites=args.sites or (None if args.data else 3),
        data=Path(args.data) if args.data else None,
        rounds=args.rounds, local_iterations=args.local_iterations, preset=args.preset,
        seed=args.seed, device=args.device, timeout=args.timeout, extra=extra,
        sites_per_worker=args.sites_per_worker,
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedseg.server.report import write_reports

    md, page = write_reports(Path(args.run_dir))
    print(f"report written: {page} (one file, figure inline), {md}, {md.parent / 'plots.png'}")
    if args.tensorboard:
        from fedseg.server.tracking import require, write_all

        require("--tensorboard")
        print(f"TensorBoard event files: {write_all(Path(args.run_dir))} "
              f"(tensorboard --logdir {args.run_dir})")
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    from fedseg.privacy.provision import provision

    roster = provision(
        Path(args.out), sites=args.sites.split(","),
        server_sans=[s for s in args.server_san.split(",") if s.strip()],
        days=args.days, consortium=args.consortium, force=args.force,
    )
    out = Path(args.out)
    print(f"consortium '{roster.consortium}' provisioned in {out}: CA ca.pem (keep ca.key "
          f"offline), server.pem/.key for {', '.join(roster.server_sans)}, app-signing key "
          f"{roster.app_signing.key_id}, roster.json")
    for name in roster.sites:
        print(f"  site {name}: give it {out / 'sites' / name / 'identity.key'}, "
              f"{out / 'ca.pem'} and {out / 'roster.json'} (in one folder: client.toml's 'pki')")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedseg",
        description="fedseg: nnU-Net-style 3D segmentation, one site or a federation.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("demo-data", help="write the built-in synthetic multi-site dataset")
    s.add_argument("out", help="output folder (one nnU-Net raw dataset per site inside)")
    s.add_argument("--sites", type=int, default=3)
    s.add_argument("--cases", type=int, default=10, help="training cases per site")
    s.add_argument("--test-cases", type=int, default=4, help="held-out cases per site")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo_data)

    s = sub.add_parser("check-data", help="validate nnU-Net raw dataset folder(s)")
    s.add_argument("data", nargs="+", help="dataset folder(s) holding dataset.json")
    s.set_defaults(func=_cmd_check_data)

    s = sub.add_parser("plan", help="pool the sites' fingerprints and write the nnU-Net plan")
    s.add_argument("data", nargs="+", help="dataset folder(s), one per site")
    s.add_argument("--out", required=True, help="plan JSON to write")
    s.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GPU memory budget of the smallest site (nnU-Net default: 8; the resenc "
                   "presets have their own)")
    s.add_argument("--preset", choices=PRESETS, default="nnunet",
                   help="nnunet: nnU-Net's default plan; resenc_m / resenc_l: nnU-Net's ResEnc "
                   "M (8 GB) / L (24 GB) plans; tiny / resenc_tiny: nnunet / resenc_m with "
                   "features and patch capped for CPU demos and tests")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("train", help="train on one site's data (nnU-Net recipe)")
    s.add_argument("--data", required=True, help="dataset folder")
    s.add_argument("--plan", required=True, help="plan JSON from 'fedseg plan'")
    s.add_argument("--iterations", type=int, required=True)
    s.add_argument("--out", required=True, help="model bundle folder (resumes if present)")
    s.add_argument("--cache", help="preprocessed-data cache (default: inside the data folder)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--batch-size", type=int, default=0, help="override the plan's batch size")
    s.add_argument("--configuration", choices=["auto", "2d", "3d_fullres", "3d_lowres"],
                   default="auto", help="plan configuration to train (auto: the plan's; 2d "
                   "also on 3D data; 3d_lowres where the plan has one)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--init-from", metavar="MODEL_DIR",
                   help="start from this bundle's weights (e.g. fine-tune a federated model on "
                   "this site; --plan must be the bundle's plan.json)")
    s.add_argument("--lr", type=float, default=None,
                   help="initial learning rate of the poly schedule (default nnU-Net's 0.01)")
    s.add_argument("--snapshot-every", type=_positive_int, default=None, metavar="N",
                   help="also write a bundle every N iterations to OUT/snapshots/ (curves)")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("predict", help="segment images with a model bundle (output in the "
                                       "input's format: NIfTI, .mha/.nrrd, PNG, TIFF)")
    s.add_argument("-m", "--model", required=True, action="extend", nargs="+",
                   metavar="MODEL_DIR",
                   help="model bundle folder; an ensemble bundle ('fedseg ensemble'), or "
                   "several bundles (-m A B or -m A -m B), averages the models' probabilities")
    s.add_argument("-i", "--input", nargs="+", required=True,
                   help="a folder of CASE_XXXX<ending> files (.nii.gz, .mha, .png, ...), or "
                   "the file(s) of one case")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("--device", default="auto")
    s.add_argument("--no-tta", action="store_true", help="disable mirroring test-time aug.")
    s.add_argument("--no-postprocess", action="store_true",
                   help="do not apply the bundle's postprocessing decision ('fedseg "
                   "postprocess'); with several -m none applies anyway (decided per bundle)")
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("postprocess", help="decide nnU-Net's largest-component postprocessing "
                                           "on sites' validation cases and write it into the "
                                           "bundle (applied by 'fedseg predict')")
    s.add_argument("-m", "--model", required=True, metavar="MODEL_DIR",
                   help="model bundle or ensemble bundle folder (its bundle.json is updated)")
    s.add_argument("data", nargs="+", help="site dataset folder(s) with imagesTr/ + labelsTr/")
    s.add_argument("--all-cases", action="store_true",
                   help="decide on all of imagesTr (sites that did not train the model, e.g. "
                   "for a cross-validation ensemble), not the validation fifth")
    s.add_argument("--work", help="folder for the validation predictions (default: beside "
                   "the bundle, .NAME.postprocess)")
    s.add_argument("--json", help="also write the decision and the Dice behind it here")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_cmd_postprocess)

    s = sub.add_parser("ensemble", help="bundle several models (folds, 2d + 3d_fullres) into "
                                        "one ensemble bundle that 'fedseg predict' averages")
    s.add_argument("bundles", nargs="+", metavar="BUNDLE",
                   help="model bundle folders (an ensemble bundle adds all its members)")
    s.add_argument("--out", required=True, help="the ensemble bundle folder to write (new or "
                   "empty)")
    s.add_argument("--names", default="",
                   help="comma-separated member names, one per BUNDLE (default member_0, ...)")
    s.add_argument("--note", default="", help="free text kept in the ensemble's bundle.json")
    s.set_defaults(func=_cmd_ensemble)

    s = sub.add_parser("evaluate", help="Dice and HD95 of predictions against labels")
    s.add_argument("--pred", required=True)
    s.add_argument("--labels", required=True)
    s.add_argument("--json", required=True, help="where to write the per-case/mean metrics")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("simulate", help="run the whole federation on this machine (loopback)")
    s.add_argument("--sites", type=_positive_int, default=None,
                   help="number of sites (default: 3 demo sites, or every site folder of --data)")
    s.add_argument("--data", help="folder of site datasets (default: generate the demo data)")
    # the demo's budget (CPU, tiny preset): 18 x 50 iterations per site, ~3 min on 2 cores; a
    # consortium's job defaults (server.toml) are nnU-Net's 1000 x 250
    s.add_argument("--rounds", type=_positive_int, default=18)
    s.add_argument("--local-iterations", type=_positive_int, default=50,
                   help="k iterations per site per round")
    s.add_argument("--eval-every", type=_positive_int, default=6,
                   help="evaluate the global model every E rounds (and after the last)")
    s.add_argument("--aggregation", choices=["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"],
                   default="fedavg")
    s.add_argument("--mu", type=float, default=0.01, help="FedProx mu")
    s.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="plan preset (auto: nnunet on a GPU, tiny on CPU; see 'fedseg plan')")
    s.add_argument("--out", default="runs/simulate", help="work folder (run folder inside)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    s.add_argument("--sites-per-worker", type=_positive_int, default=1, metavar="N",
                   help="sites served by one site worker process (default 1, as at a hospital); "
                   "N > 1 loads torch/MONAI once per N sites (~0.8 GB each) to simulate many "
                   "sites on one machine; their tasks then run one at a time per worker")
    s.add_argument("--secure-aggregation", choices=["on", "off"], default="on",
                   help="sum fingerprints and updates with secure aggregation (a PKI for the "
                        "demo sites is provisioned into OUT/pki)")
    s.add_argument("--per-site-metrics", choices=["on", "off"], default="on",
                   help="off: the sites' evaluation metrics go into the secure sum too "
                        "(only pooled Dice/HD95 are logged)")
    s.add_argument("--configuration", choices=["auto", "2d", "3d_fullres", "3d_lowres"],
                   default="auto",
                   help="plan configuration to train (auto: nnU-Net's choice, 3d_fullres for "
                   "3D data, 2d for 2D images); 2d also works on 3D data (slice by slice); "
                   "3d_lowres where nnU-Net plans one (images too large for one patch)")
    s.add_argument("--folds", type=_positive_int, default=1,
                   help="cross-validation: train K fold models, one after the other (--rounds "
                   "each), and bundle their ensemble (default 1: one model)")
    s.add_argument("--job-config", metavar="TOML",
                   help="more job settings, as the [job] table of server.toml (e.g. "
                   "site_momentum, [job.aggregation]); they override the flags above")
    s.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to OUT/run/tensorboard/ (the job "
                   "setting tensorboard = true; needs pip install 'fedseg[tracking]')")
    s.set_defaults(func=_cmd_simulate)

    s = sub.add_parser("report", help="(re)draw a run's report: report.html (self-contained), "
                                      "report.md, plots.png")
    s.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (holds metrics.jsonl)")
    s.add_argument("--tensorboard", action="store_true",
                   help="also (re)write TensorBoard event files to RUN_DIR/tensorboard/")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("provision", help="create the consortium CA, server certificate, site "
                                         "identity keys, app-signing key and roster")
    s.add_argument("out", help="output folder (must not exist or be empty, unless --force)")
    s.add_argument("--sites", required=True, help="comma-separated site names, e.g. "
                                                  "hospitalA,hospitalB")
    s.add_argument("--server-san", default="127.0.0.1,localhost",
                   help="comma-separated DNS names / IP addresses the server is reached at")
    s.add_argument("--days", type=int, default=825, help="certificate validity in days")
    s.add_argument("--consortium", default="fedseg", help="consortium name (in the roster)")
    s.add_argument("--force", action="store_true", help="replace a previous provisioning")
    s.set_defaults(func=_cmd_provision)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("fedseg", lambda: args.func(args), interrupt_code=130)


if __name__ == "__main__":
    raise SystemExit(main())
