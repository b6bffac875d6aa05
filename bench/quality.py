"""Quality harness: pooled vs local-only vs federated (vs federated + local fine-tune), trained in
one run at the SAME training budget and scored on every site's test split.

Why a harness and not a figure: the claim fedseg exists for — a federated model as good as one
trained on the pooled data — is only a result with the budget and the command behind it. This
script trains every model through the product's own commands and scores all of them the same
way, so the table it writes is reproducible by anyone with the data:

* **pooled**: ``fedseg train`` on all sites' training cases as one site (the centralised
  nnU-Net reference), ``budget`` iterations at the plan's batch size B;
* **local-only**: ``fedseg train`` on each site alone, ``budget / S`` iterations each — the share
  of the budget a site spends in the federation;
* **federated**: ``fedseg simulate`` (real SuperLink, SuperNodes and site workers on loopback,
  secure aggregation on, the job's default settings unless ``--job-config`` says otherwise),
  ``R`` rounds × ``k`` local iterations at each of the S sites with ``R * k * S = budget``;
* **federated + fine-tune**: ``fedseg train --init-from`` the federated model on each site,
  ``--finetune`` more iterations per site (its budget is written next to it in the table).

Training cases are the same for every model: the federated sites hold out 1 in 5 of their
training cases for their per-round validation (``fedseg/data/splits.py``), so the pooled and
local models train on exactly the other 4 in 5 (folders of symbolic links under ``WORK/views``;
no image is copied). Every model is then scored on every site's ``imagesTs``/``labelsTs`` with
the functions behind ``fedseg predict`` (sliding window, Gaussian blending, mirroring) and
``fedseg evaluate`` (Dice, HD95), in this process so that each network is loaded once.

Learning curve: ``--curve P`` keeps P evenly spaced snapshots of the pooled and the federated
model (``fedseg train --snapshot-every``, the job's ``snapshot_every``) and scores each on all
test cases, at equal budgets (iterations × batch summed over the sites).

Postprocessing (``--postprocess``): each model also gets nnU-Net's largest-connected-component
postprocessing, decided by nnU-Net's rules on the validation fifth of all sites' ``imagesTr``
(``fedseg.training.postprocess_eval``; the sums a federation would add securely), and is scored
again on the test split with it.

Resumable: each finished step is recorded in ``WORK/steps.json`` and skipped on a rerun; an
interrupted ``fedseg train`` resumes from its checkpoint; an interrupted federation is started
again from scratch. Logs of every command: ``WORK/logs/``. Output: ``--json`` (everything),
``--md`` (the tables), ``--plot`` (the curve). Tables: ``bench/quality_report.py``.

Example (the BENCHMARKS.md figure, ~35 min on a 2-core box)::

    .venv/bin/python bench/quality.py --data ../shared/data/hippocampus --out runs/quality \
        --budget 3000 --rounds 30 --finetune 200 --json bench/results/quality_hippocampus.json \
        --md bench/results/quality_hippocampus.md --plot bench/results/quality_hippocampus.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_report import write_outputs  # noqa: E402

from fedseg.data.dataset import list_cases, read_dataset_json  # noqa: E402
from fedseg.data.splits import split_cases  # noqa: E402
from fedseg.errors import FedsegError  # noqa: E402
from fedseg.training.test_split import pooled_dice  # noqa: E402

FEDSEG = [sys.executable, "-m", "fedseg.cli"]


# --------------------------------------------------------------------------------------------
# bookkeeping


class Steps:
    """``WORK/steps.json``: results of finished steps, so a rerun skips them."""

    def __init__(self, work: Path) -> None:
        self.path = work / "steps.json"
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.t0 = time.monotonic()

    def run(self, name: str, fn, *args, **kwargs) -> Any:
        if name in self.done:
            print(f"[quality] {name}: done before (skipped)", flush=True)
            return self.done[name]
        print(f"[quality] {name} ...", flush=True)
        t = time.monotonic()
        result = fn(*args, **kwargs)
        secs = time.monotonic() - t
        self.done[name] = {"result": result, "seconds": round(secs, 1)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.done, indent=1) + "\n")
        os.replace(tmp, self.path)
        print(f"[quality] {name}: {secs:.0f} s (total {time.monotonic() - self.t0:.0f} s)", flush=True)
        return self.done[name]


def run_cmd(argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """A product command, its output to ``log``; a failure ends the harness with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                **(env or {})}
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=full_env)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise FedsegError(f"{' '.join(argv[2:5])} ... failed (exit {proc.returncode}); see {log}:\n"
                          + "\n".join(tail))


# --------------------------------------------------------------------------------------------
# data views


def trained_config(plan_path: Path):
    """The configuration a plan trains (3d_fullres for 3D data, 2d for 2D images)."""
    from fedseg.planning.plan import Plan

    return Plan.load(plan_path).config()


def site_dirs_of(data: list[Path]) -> list[Path]:
    if len(data) == 1 and not (data[0] / "dataset.json").is_file():
        sites = sorted(p for p in data[0].iterdir() if (p / "dataset.json").is_file())
    else:
        sites = list(data)
    if len(sites) < 2:
        raise FedsegError(f"{data}: the comparison needs at least 2 site folders with dataset.json")
    for s in sites:
        if not (s / "imagesTs").is_dir() or not (s / "labelsTs").is_dir():
            raise FedsegError(f"{s}: needs imagesTs/ and labelsTs/ (the site's test cases)")
    return [s.resolve() for s in sites]


def train_split(site: Path) -> list[Any]:
    """The cases a federated site trains on (its validation fifth held out), as CaseFiles."""
    ds = read_dataset_json(site)
    cases = list_cases(site, ds, "Tr")
    train, _ = split_cases([c.case_id for c in cases])
    keep = set(train)
    return [c for c in cases if c.case_id in keep]


def make_view(out: Path, sites: list[Path], split: bool = True) -> int:
    """A dataset folder of symbolic links to the training split of ``sites`` (one or all);
    ``split=False``: to all their training cases."""
    if out.exists():
        shutil.rmtree(out)
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    ds = json.loads((sites[0] / "dataset.json").read_text())
    n = 0
    for site in sites:
        other = json.loads((site / "dataset.json").read_text())
        for key in ("labels", "channel_names", "file_ending"):
            if other.get(key) != ds.get(key):
                raise FedsegError(f"{site / 'dataset.json'}: '{key}' differs from "
                                  f"{sites[0] / 'dataset.json'}; sites must share them")
        for case in (train_split(site) if split else
                     list_cases(site, read_dataset_json(site), "Tr")):
            for img in case.images:
                (out / "imagesTr" / img.name).symlink_to(img.resolve())
            (out / "labelsTr" / case.label.name).symlink_to(case.label.resolve())
            n += 1
    ds["numTraining"] = n
    ds["name"] = f"{ds.get('name', 'dataset')} (view: {', '.join(s.name for s in sites)})"
    (out / "dataset.json").write_text(json.dumps(ds, indent=2) + "\n")
    return n


# --------------------------------------------------------------------------------------------
# training


def train(work: Path, name: str, view: Path, plan: Path, iterations: int, args, cache: str,
          init_from: Path | None = None, lr: float | None = None,
          snapshot_every: int | None = None) -> dict:
    out = work / "models" / name
    argv = [*FEDSEG, "train", "--data", str(view), "--plan", str(plan), "--iterations",
            str(iterations), "--out", str(out), "--cache", str(work / "cache" / cache),
            "--device", args.device, "--seed", str(args.seed)]
    if init_from is not None:
        argv += ["--init-from", str(init_from)]
    if lr is not None:
        argv += ["--lr", str(lr)]
    if snapshot_every:
        argv += ["--snapshot-every", str(snapshot_every)]
    run_cmd(argv, work / "logs" / f"train-{name}.log")
    return {"model": str(out), "iterations": iterations}


def federate(work: Path, sites: list[Path], rounds: int, k: int, args, snapshot_every: int) -> dict:
    fed = work / "federated"
    if fed.exists():  # an interrupted federation starts again (simulate has no resume)
        shutil.rmtree(fed)
    links = work / "sites"
    if links.exists():
        shutil.rmtree(links)
    links.mkdir(parents=True)
    for s in sites:
        (links / s.name).symlink_to(s)
    job: dict[str, Any] = {}
    if args.job_config:
        raw = tomllib.loads(Path(args.job_config).read_text())
        job = dict(raw.get("job", raw))
    if snapshot_every:
        job.setdefault("snapshot_every", snapshot_every)
    job_file = work / "federated-job.json"
    job_file.write_text(json.dumps({"job": job}, indent=1) + "\n")
    argv = [*FEDSEG, "simulate", "--data", str(links), "--rounds", str(rounds),
            "--local-iterations", str(k), "--out", str(fed), "--preset", args.preset,
            "--device", args.device, "--seed", str(args.seed), "--eval-every",
            str(max(1, rounds // 4)), "--secure-aggregation", args.secure_aggregation,
            "--job-config", str(job_file), "--timeout", "14400"]
    run_cmd(argv, work / "logs" / "federated.log")
    run = fed / "run"
    return {"model": str(run / "model"), "run_dir": str(run), "rounds": rounds,
            "local_iterations": k, "job": json.loads((run / "job.json").read_text()),
            "plan_data_identifier": trained_config(run / "plan.json").data_identifier}


# --------------------------------------------------------------------------------------------
# scoring


def score(model: Path, sites: list[Path], work: Path, name: str, device: str,
          postprocess: Path | None = None) -> dict:
    """Every site's test split, predicted with ``model`` and evaluated (per-case JSON kept), in
    a fresh process (``fedseg.training.test_split``'s main); ``postprocess``: the decision file
    of :func:`decide_postprocessing`, applied before scoring."""
    out = work / "scores" / name
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--postprocess", str(postprocess)] if postprocess else []
    run_cmd([sys.executable, "-m", "fedseg.training.test_split", "--model", str(model), "--work",
             str(out), "--json", str(out / "scores.json"), "--device", device, *extra,
             *map(str, sites)], work / "logs" / f"score-{name}.log")
    return json.loads((out / "scores.json").read_text())


def decide_postprocessing(model: Path, sites: list[Path], work: Path, name: str,
                          device: str) -> dict:
    """nnU-Net's largest-component postprocessing for ``model``, decided on the validation
    cases of all sites (never the test split), in a fresh process
    (``fedseg.training.postprocess_eval``'s main)."""
    out = work / "postprocess" / name
    out.mkdir(parents=True, exist_ok=True)
    run_cmd([sys.executable, "-m", "fedseg.training.postprocess_eval", "--model", str(model),
             "--work", str(out), "--json", str(out / "decision.json"), "--device", device,
             *map(str, sites)], work / "logs" / f"postprocess-{name}.log")
    return {"file": str(out / "decision.json"),
            **json.loads((out / "decision.json").read_text())}


def curve_point(model: Path, sites: list[Path], work: Path, name: str, device: str) -> dict:
    """Foreground-mean Dice over ALL test cases of all sites (pooled test set)."""
    per_site = score(model, sites, work, name, device)
    return {"pooled_test_dice": pooled_dice(per_site),
            "cases": sum(s["cases"] for s in per_site.values())}


# --------------------------------------------------------------------------------------------
# the comparison


def compare(args: argparse.Namespace) -> dict:
    from fedseg.models.bundle import bundle_from_checkpoint
    from fedseg.server.rundir import snapshot_name
    from fedseg.training.single_site import snapshot_dir

    sites = site_dirs_of([Path(d) for d in args.data])
    S = len(sites)
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work)
    if args.budget % (S * args.rounds):
        raise FedsegError(f"--budget {args.budget} must be a multiple of sites x rounds "
                          f"({S} x {args.rounds}) so every model trains the same number of steps")
    k = args.budget // (S * args.rounds)
    per_site = args.budget // S
    plan = work / "plan.json"
    steps.run("plan", run_cmd, [*FEDSEG, "plan", *map(str, sites), "--out", str(plan),
                                "--preset", args.preset], work / "logs" / "plan.log")
    batch = trained_config(plan).batch_size
    views = {s.name: work / "views" / s.name for s in sites}
    counts = {}
    for s in sites:
        counts[s.name] = steps.run(f"view {s.name}", make_view, views[s.name], [s])["result"]
    counts["pooled"] = steps.run("view pooled", make_view, work / "views" / "pooled", sites)["result"]

    P = max(1, args.curve)
    want = set(args.models.split(","))
    models: dict[str, dict] = {}
    curves: dict[str, list[dict]] = {"pooled": [], "federated": []}
    if "pooled" in want:
        every = args.budget // P if P > 1 else None
        steps.run("train pooled", train, work, "pooled", work / "views" / "pooled", plan,
                  args.budget, args, "pooled", snapshot_every=every)
        models["pooled"] = {"dir": work / "models" / "pooled", "budget": args.budget * batch,
                            "kind": "pooled"}
        for i in range(1, P):
            snap = snapshot_dir(work / "models" / "pooled", i * every)
            r = steps.run(f"curve pooled {i}/{P}", curve_point, snap, sites, work,
                          f"curve-pooled-{i}", args.device)["result"]
            curves["pooled"].append({"samples": i * every * batch, **r})
    if "local" in want:
        for s in sites:
            steps.run(f"train local {s.name}", train, work, f"local-{s.name}", views[s.name],
                      plan, per_site, args, s.name)
            models[f"local {s.name}"] = {"dir": work / "models" / f"local-{s.name}",
                                         "budget": per_site * batch, "kind": "local",
                                         "site": s.name}
    fed_info = None
    if "federated" in want or "federated_ft" in want:
        snap_rounds = args.rounds // P if P > 1 else 0
        fed_info = steps.run("federated", federate, work, sites, args.rounds, k, args,
                             snap_rounds)["result"]
        models["federated"] = {"dir": Path(fed_info["model"]), "budget": args.budget * batch,
                               "kind": "federated"}
        for i in range(1, P):
            rnd = i * snap_rounds
            snap = work / "models" / f"federated-round{rnd}"
            if not (snap / "model.pt").is_file():
                bundle_from_checkpoint(fed_info["run_dir"], snapshot_name(rnd), snap)
            r = steps.run(f"curve federated {i}/{P}", curve_point, snap, sites, work,
                          f"curve-federated-{i}", args.device)["result"]
            curves["federated"].append({"samples": rnd * k * S * batch, **r})
    if "federated_ft" in want and args.finetune > 0:
        fed_model = Path(fed_info["model"])
        for s in sites:
            steps.run(f"fine-tune {s.name}", train, work, f"fedft-{s.name}", views[s.name],
                      fed_model / "plan.json", args.finetune, args, s.name,
                      init_from=fed_model, lr=args.finetune_lr)
            models[f"federated+FT {s.name}"] = {
                "dir": work / "models" / f"fedft-{s.name}", "kind": "federated_ft",
                "site": s.name, "budget": (args.budget + S * args.finetune) * batch}

    scores = {}
    for name, m in models.items():
        scored = m["dir"].parent / "test_scores.json"  # the federation scored its model already
        if name == "federated" and scored.is_file() and set(json.loads(scored.read_text())) == {
                s.name for s in sites}:
            scores[name] = json.loads(scored.read_text())
            continue
        scores[name] = steps.run(f"score {name}", score, m["dir"], sites, work,
                                 name.replace(" ", "-"), args.device)["result"]
    scores_pp: dict[str, Any] = {}
    decisions: dict[str, Any] = {}
    if args.postprocess:
        for name, m in models.items():
            decisions[name] = steps.run(f"postprocess {name}", decide_postprocessing, m["dir"],
                                        sites, work, name.replace(" ", "-"), args.device)["result"]
            scores_pp[name] = steps.run(f"score {name} +pp", score, m["dir"], sites, work,
                                        name.replace(" ", "-") + "+pp", args.device,
                                        Path(decisions[name]["file"]))["result"]
    for name in ("pooled", "federated"):
        if name in scores:
            curves[name].append({"samples": models[name]["budget"],
                                 "pooled_test_dice": pooled_dice(scores[name]),
                                 "cases": sum(s["cases"] for s in scores[name].values())})
    for s in [*scores.values(), *scores_pp.values()]:
        for site in s.values():
            site.pop("case_metrics", None)
    return {
        "data": [str(s) for s in sites],
        "settings": {
            "budget_iterations": args.budget, "batch_size": batch,
            "budget_samples": args.budget * batch, "sites": S, "rounds": args.rounds,
            "local_iterations": k, "local_only_iterations": per_site,
            "finetune_iterations": args.finetune, "finetune_lr": args.finetune_lr,
            "preset": args.preset, "device": args.device, "seed": args.seed,
            "secure_aggregation": args.secure_aggregation == "on",
            "job_config": Path(args.job_config).read_text() if args.job_config else "",
            "training_cases": counts,
            "plan_data_identifier": trained_config(plan).data_identifier,
            "federated_plan_data_identifier": fed_info["plan_data_identifier"] if fed_info else None,
        },
        "models": {n: {k2: (str(v) if isinstance(v, Path) else v) for k2, v in m.items()}
                   for n, m in models.items()},
        "scores": scores,
        "scores_postprocessed": scores_pp,
        "postprocessing": decisions,
        "curves": curves,
        "seconds": {n: d["seconds"] for n, d in steps.done.items()},
        "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True,
                   help="a folder of site folders, or the site folders themselves")
    p.add_argument("--out", required=True, help="work folder (resumes if it holds a run)")
    p.add_argument("--budget", type=int, required=True,
                   help="pooled iterations; every model's samples = its iterations x batch")
    p.add_argument("--rounds", type=int, default=30, help="federated rounds")
    p.add_argument("--finetune", type=int, default=200, help="fine-tune iterations per site")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="initial LR of the fine-tune's poly schedule (default nnU-Net's 0.01)")
    p.add_argument("--models", default="pooled,local,federated,federated_ft")
    p.add_argument("--curve", type=int, default=4, help="points of the learning curve")
    p.add_argument("--preset", default="tiny", choices=["tiny", "nnunet"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--secure-aggregation", default="on", choices=["on", "off"])
    p.add_argument("--postprocess", action="store_true",
                   help="also score every model with nnU-Net's largest-component postprocessing, "
                   "decided per model on the validation cases of all sites")
    p.add_argument("--job-config", help="TOML of federated job settings (recipe experiments)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--md", help="write the markdown tables here")
    p.add_argument("--plot", help="write the learning curve (PNG) here")
    args = p.parse_args(argv)
    try:
        res = compare(args)
    except FedsegError as err:
        print(f"quality: {err}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    write_outputs(res, args.md, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
