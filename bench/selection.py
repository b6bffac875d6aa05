"""Model selection benchmark (issue #14): the model a federated cross-validation selects against
the single federated 3d_fullres model, trained in one run at the same budget PER MODEL and scored
on every site's test split.

Two federations through the product's own command (``fedseg simulate``: real SuperLink,
SuperNodes and site workers on loopback, secure aggregation on, ``per_site_metrics = false``):

* **single**: one 3d_fullres model (``folds = 1``: each site holds 1 in 5 cases out), R rounds
  of k iterations at each of the S sites — what fedseg trained before cross-validation;
* **cv**: ``folds = K`` and ``configurations`` (default 3d_fullres and 2d): K fold models per
  configuration, each R rounds of k iterations at each site (so K x C times the single model's
  training, as nnU-Net's 5 folds of each configuration are), then the job's selection among the
  configurations and their pair ensemble on pooled CV Dice, and its postprocessing decision.

Then every model is scored on every site's ``imagesTs``/``labelsTs`` (``fedseg predict``'s
sliding window and mirroring, ``fedseg evaluate``'s Dice/HD95): the single model, each
configuration's fold ensemble, the pair ensemble, and the selected bundle without and with its
postprocessing. The table says which candidate the job chose on CV Dice, and what each scored
on test, so the choice can be checked against the test split it never saw.

Resumable: a federation whose run finished is not run again; logs under ``WORK/logs/``.

Example (the BENCHMARKS.md figure)::

    .venv/bin/python bench/selection.py --data ../shared/data/hippocampus --out runs/selection \\
        --rounds 20 --local-iterations 40 --folds 3 --json bench/results/selection_hippocampus.json \\
        --md bench/results/selection_hippocampus.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedseg.training.test_split import pooled_dice

FEDSEG = [sys.executable, "-m", "fedseg.cli"]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def federate(name: str, work: Path, args: argparse.Namespace, job: dict[str, Any]) -> Path:
    """One ``fedseg simulate`` (skipped when its run already finished); returns its run dir."""
    out = work / name
    run = out / "run"
    status = run / "status.json"
    if status.is_file() and json.loads(status.read_text()).get("state") == "finished" \
            and (run / "model" / "bundle.json").is_file():
        print(f"[{name}] finished earlier: {run}", flush=True)
        return run
    toml = work / f"{name}.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in job.items()))
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*FEDSEG, "simulate", "--data", str(args.data), "--out", str(out),
           "--rounds", str(args.rounds), "--local-iterations", str(args.local_iterations),
           "--eval-every", str(args.rounds), "--device", args.device, "--seed", str(args.seed),
           "--per-site-metrics", "off", "--timeout", str(args.timeout), "--job-config", str(toml)]
    print(f"[{name}] {' '.join(cmd)}  (log: {log})", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
    if res.returncode != 0:
        raise SystemExit(f"[{name}] failed (exit {res.returncode}); see {log}")
    (out / "seconds.txt").write_text(f"{time.monotonic() - t0:.1f}\n")
    return run


def score(model: Path, sites: list[Path], work: Path, device: str, pp: bool) -> dict[str, Any]:
    from fedseg.models.bundle_postprocessing import read_postprocessing
    from fedseg.training.postprocess import Postprocessing
    from fedseg.training.test_split import score_sites

    # without: the raw predictions (an empty decision), whatever the bundle decided
    decision = read_postprocessing(model) if pp else None
    scores = score_sites(model, sites, work, device,
                         postprocessing=decision if pp else Postprocessing())
    per_site = {s: v["foreground_mean"]["Dice"] for s, v in scores.items()}
    return {"per_site": per_site, "pooled": pooled_dice(scores),
            "hd95": {s: v["foreground_mean"]["HD95"] for s, v in scores.items()},
            "postprocessing": decision.model_dump() if decision is not None else None,
            "scores": scores}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of site datasets")
    ap.add_argument("--out", type=Path, required=True, help="work folder")
    ap.add_argument("--rounds", type=int, default=20, help="rounds per model")
    ap.add_argument("--local-iterations", type=int, default=40)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--configurations", default="3d_fullres,2d")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=7200.0)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, required=True)
    args = ap.parse_args(argv)
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    configs = [c.strip() for c in args.configurations.split(",") if c.strip()]
    sites = sorted(d for d in args.data.resolve().iterdir() if (d / "dataset.json").is_file())

    t0 = time.monotonic()
    single = federate("single", work, args, {"configuration": "3d_fullres"})
    cv = federate("cv", work, args, {"folds": args.folds, "configurations": configs})
    recs = [json.loads(line) for line in (cv / "metrics.jsonl").read_text().splitlines()]
    sel = next(r for r in recs if r["phase"] == "selection" and r["site"] == "pooled")
    pp_rec = next((r for r in recs if r["phase"] == "postprocessing"), None)

    from fedseg.models.ensemble import build_ensemble

    models: dict[str, Path] = {"single 3d_fullres": single / "model"}
    for c in configs:
        models[f"{c} ({args.folds} folds)"] = cv / "candidates" / c
    for name, cand in sel["candidates"].items():
        if len(cand["configurations"]) > 1:
            pair = work / f"ensemble_{name}"
            if not (pair / "bundle.json").is_file():
                build_ensemble({c: cv / "candidates" / c for c in cand["configurations"]}, pair)
            models[f"{name} ({args.folds} folds each)"] = pair
    results: dict[str, Any] = {}
    for name, model in models.items():
        print(f"scoring {name} ...", flush=True)
        results[name] = score(model, sites, work / "scores" / name.split()[0], args.device, False)
    print("scoring the selected model with its postprocessing ...", flush=True)
    results["selected + postprocessing"] = score(cv / "model", sites, work / "scores" / "sel",
                                                 args.device, True)
    settings = {"rounds_per_model": args.rounds, "local_iterations": args.local_iterations,
                "sites": [s.name for s in sites], "folds": args.folds, "configurations": configs,
                "iterations_per_model": args.rounds * args.local_iterations * len(sites),
                "seconds": {n: float((work / n / "seconds.txt").read_text())
                            for n in ("single", "cv") if (work / n / "seconds.txt").is_file()},
                "preset": json.loads((cv / "job.json").read_text()).get("plan_preset")}
    out = {"settings": settings, "selection": sel, "postprocessing": pp_rec,
           "results": {k: {kk: vv for kk, vv in v.items() if kk != "scores"}
                       for k, v in results.items()},
           "command": " ".join(["python", *sys.argv]),
           "wall_seconds": round(time.monotonic() - t0, 1)}
    args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    args.md.write_text(markdown(out) + "\n")
    print(markdown(out))
    return 0


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"]
    sel = out["selection"]
    cands = sel["candidates"]
    site_names = s["sites"]
    lines = [f"Budget per model: {s['rounds_per_model']} rounds x {s['local_iterations']} "
             f"iterations x {len(site_names)} sites = {s['iterations_per_model']} iterations "
             f"(preset {s['preset']}); cross-validation: {s['folds']} folds of "
             f"{', '.join(s['configurations'])}.", "",
             "| model | pooled CV Dice (chosen on) | " + " | ".join(site_names)
             + " | **pooled test Dice** |",
             "|---|---|" + "---|" * len(site_names) + "---|"]
    for name, r in out["results"].items():
        key = name.split(" (")[0]
        cvd = cands.get(key, {}).get("mean_dice")
        mark = " (selected)" if key == sel["chosen"] else ""
        cells = [f"{r['per_site'][n]:.4f}" for n in site_names]
        lines.append(f"| {name}{mark} | {'' if cvd is None else f'{cvd:.4f}'} | "
                     + " | ".join(cells) + f" | **{r['pooled']:.4f}** |")
    pp = out.get("postprocessing") or {}
    lines += ["", f"Selected on pooled CV Dice of {sel['cases']} validation cases (secure sum): "
              f"**{sel['chosen']}**; postprocessing decided on them: keep largest component of "
              f"{pp.get('keep_largest') or 'nothing'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
