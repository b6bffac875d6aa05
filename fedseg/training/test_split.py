"""Scoring a model bundle on the held-out test cases of one or more sites, as a table.

Why its own module: ``fedseg simulate`` (whose sites are all on this machine) ends by scoring
the federated model on every site's ``imagesTs``/``labelsTs`` — cases no model has seen, unlike
the per-round validation fifth of ``imagesTr`` — and ``bench/quality.py`` scores every model it
compares the same way. Both go through the functions behind ``fedseg predict`` (sliding window,
mirroring) and ``fedseg evaluate`` (Dice, HD95 per class), with the network loaded once per
site folder.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError
from fedseg.training.postprocess import Postprocessing
from fedseg.training.postprocess_eval import apply_to_files


def has_test_split(site: Path) -> bool:
    return (site / "imagesTs").is_dir() and (site / "labelsTs").is_dir() and any(
        (site / "labelsTs").iterdir())


def score_sites(
    model_dir: Path, sites: list[Path], work: Path, device: str = "auto", keep_predictions: bool = False,
    postprocessing: Postprocessing | None = None,
) -> dict[str, dict[str, Any]]:
    """``{site: {"mean": {class: {Dice, HD95}}, "foreground_mean": {...}, "cases": n,
    "case_metrics": [{class: {Dice, HD95}}, ...]}}`` for each site with a test split; the
    per-case JSON of ``fedseg evaluate`` goes to ``work/SITE.json``. ``postprocessing`` (decided
    beforehand, on validation cases: :mod:`fedseg.training.postprocess_eval`) is applied to
    the predictions before they are scored, INSTEAD of the decision the bundle records; None:
    the bundle's own decision, if any, as ``fedseg predict`` applies it (``Postprocessing()``
    scores the raw predictions)."""
    from fedseg.models.bundle_files import bundle_kind
    from fedseg.training.ensemble_predict import predict_ensemble_files
    from fedseg.training.evaluate import evaluate_folders, json_safe
    from fedseg.training.predict import predict_files

    ensemble = bundle_kind(model_dir) == "ensemble"  # e.g. a cross-validation's folds

    out: dict[str, dict[str, Any]] = {}
    for site in sites:
        if not has_test_split(site):
            continue
        pred = work / "predictions" / site.name
        own = postprocessing is None  # the bundle's decision, else the given one instead
        written = (predict_ensemble_files([model_dir], site / "imagesTs", pred, device=device,
                                          postprocess=own)
                   if ensemble else
                   predict_files(model_dir, site / "imagesTs", pred, device=device,
                                 mirror_tta=True, postprocess=own))
        if postprocessing is not None:
            apply_to_files(written, postprocessing)
        res = evaluate_folders(pred, site / "labelsTs", work / f"{site.name}.json")
        out[site.name] = json_safe({
            "mean": res["mean"], "foreground_mean": res["foreground_mean"],
            "cases": len(res["metric_per_case"]),
            "case_metrics": [{k: {"Dice": v["Dice"], "HD95": v["HD95"]}
                              for k, v in c["metrics"].items()} for c in res["metric_per_case"]],
        })
        if not keep_predictions:
            shutil.rmtree(pred)
    if not out:
        raise FedsegError(f"no site among {', '.join(s.name for s in sites)} has imagesTs/ and "
                          "labelsTs/ to score")
    return out


def pooled_dice(scores: dict[str, dict[str, Any]]) -> float | None:
    """Foreground-mean Dice over ALL test cases of all sites (cases with a NaN class skipped)."""
    vals = []
    for site in scores.values():
        for case in site["case_metrics"]:
            dice = [m["Dice"] for m in case.values()]
            if dice and all(d is not None for d in dice):
                vals.append(sum(dice) / len(dice))
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None, digits: int) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _missing(site: dict[str, Any]) -> str:
    return str(int(site["foreground_mean"].get("HD95_missing") or 0))


def format_table(scores: dict[str, dict[str, Any]], class_names: dict[str, str] | None = None) -> str:
    """A plain-text table: one row per site (and the mean), Dice per class, foreground mean
    Dice and HD95 (mm), and how many (case, class) pairs have no HD95 (a structure missed or
    hallucinated: its Dice is 0, its distance undefined); readable in a terminal and in a log
    file alike."""
    keys = list(next(iter(scores.values()))["mean"])
    names = [(class_names or {}).get(k, f"class {k}") for k in keys]
    head = ["site", "cases", *[f"Dice {n}" for n in names], "Dice mean", "HD95 mean (mm)",
            "HD95 missing"]
    rows = []
    for site, s in scores.items():
        rows.append([site, str(s["cases"]), *[_fmt(s["mean"][k]["Dice"], 3) for k in keys],
                     _fmt(s["foreground_mean"]["Dice"], 3), _fmt(s["foreground_mean"]["HD95"], 2),
                     _missing(s)])
    if len(scores) > 1:
        def mean(vals: list[float | None]) -> float | None:
            v = [x for x in vals if x is not None]
            return sum(v) / len(v) if v else None

        rows.append(["mean of sites", str(sum(s["cases"] for s in scores.values())),
                     *[_fmt(mean([s["mean"][k]["Dice"] for s in scores.values()]), 3) for k in keys],
                     _fmt(mean([s["foreground_mean"]["Dice"] for s in scores.values()]), 3),
                     _fmt(mean([s["foreground_mean"]["HD95"] for s in scores.values()]), 2),
                     str(sum(int(s["foreground_mean"].get("HD95_missing") or 0)
                             for s in scores.values()))])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedseg.training.test_split --model M --work W --json OUT SITE [SITE ...]``:
    :func:`score_sites` in a process of its own: the quality harness scores each model so,
    which keeps torch out of its long-lived driver process."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="score a bundle on sites' imagesTs/labelsTs")
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--postprocess", help="JSON from fedseg.training.postprocess_eval: apply its "
                   "postprocessing before scoring")
    p.add_argument("sites", nargs="+")
    a = p.parse_args(argv)
    pp = None
    if a.postprocess:
        pp = Postprocessing.model_validate(
            json.loads(Path(a.postprocess).read_text())["postprocessing"])
    scores = score_sites(Path(a.model), [Path(s) for s in a.sites], Path(a.work), a.device,
                         postprocessing=pp)
    Path(a.json).write_text(json.dumps(scores, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from fedseg.errors import run_cli

    raise SystemExit(run_cli("fedseg-score", main))
