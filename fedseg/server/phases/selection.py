"""nnU-Net's model selection after a federated cross-validation: the best configuration (or
ensemble of two) by pooled CV Dice, and the largest-component postprocessing decided on it.

What nnU-Net does (``nnUNetv2_find_best_configuration``): every trained configuration's CV
predictions (each case predicted by the fold model that did not train on it) are scored, every
pair of configurations is ensembled by averaging those predictions' probabilities and scored
the same way, the candidate with the best foreground-mean Dice wins, and
``determine_postprocessing`` then decides on the winner's CV predictions which
keep-largest-component steps help (for all foreground together, then per class).

Federated, the CV predictions stay at the sites (``fedseg/training/cv_predictions.py``: each
fold model's final evaluation keeps them). The server sends one EVALUATE request naming the
candidates (configurations, as plan hashes) and no model; every site scores each candidate on
all of its cases and returns mean Dice per candidate and class — through the secure sum unless
``per_site_metrics``, so the server learns only the pooled case-weighted means, exactly the
numbers nnU-Net's rules need. A second request scores the postprocessing candidates on the
winner; ``fedseg.training.postprocess.decide`` applies nnU-Net's rules to those pooled means.

The result: ``RUN_DIR/candidates/CONFIG`` (each configuration's fold ensemble),
``RUN_DIR/model`` = the winner (one configuration's folds, or the two configurations' fold
ensembles averaged, each weighing as one model, as nnU-Net's ensemble of two configurations)
with the postprocessing decision written into its bundle, and the ``selection`` and
``postprocessing`` records of metrics.jsonl with every pooled figure that decided.
"""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.protocol import messages as pm
from fedseg.server.job_context import JobContext
from fedseg.server.phases.crossval import CANDIDATES_DIR, cv_summary, fold_ensemble
from fedseg.server.phases.evaluation import case_weighted_mean, site_evaluations
from fedseg.server.report import write_report
from fedseg.server.secure_apply import eval_classes

PP = pm.CV_POSTPROCESS_PREFIX  # the key prefix of the postprocessing candidates' Dice


def finish(ctx: JobContext) -> None:
    """All models of a cross-validation done: the CV record(s) and ``RUN_DIR/model`` (the
    folds' ensemble, or with several configurations the chosen candidate), its postprocessing
    decision, then the report."""
    configs: list[str | None] = list(ctx.cfg.configurations) or [None]
    cvs = {}
    for conf in configs:
        rec = cvs[conf] = cv_summary(ctx, conf)
        ctx.run.log(rec)
        ctx.log(f"cross-validation{' of ' + conf if conf else ''} ({ctx.cfg.folds} folds, "
                f"{rec['cases']} validation cases): Dice {rec['mean_dice']:.4f} {rec['dice']}")
    if configs == [None]:
        fold_ensemble(ctx, ctx.run.model_dir, None, cvs[None])
        assert ctx.plan is not None
        name = ctx.plan.default_configuration
        decide_postprocessing(ctx, {name: [name]}, name)
    else:
        select(ctx, {c: cvs[c] for c in configs if c})  # type: ignore[misc]
    write_report(ctx.run)


def candidates(configs: list[str]) -> dict[str, list[str]]:
    """nnU-Net's candidates: each configuration, and each pair of them as an ensemble."""
    out = {c: [c] for c in configs}
    for a, b in itertools.combinations(configs, 2):
        out[f"{a}+{b}"] = [a, b]
    return out


def pooled_scores(ctx: JobContext, cands: dict[str, list[str]], classes: list[str],
                  postprocess: str | None = None, pp_names: list[str] = ()) -> tuple[dict, int]:
    """(pooled mean Dice per key, validation cases) of the candidates, scored at the sites on
    their kept CV predictions: secure sum when per-site metrics are off, else in clear (and
    logged per site)."""
    from fedseg.server.secure_rounds import secure_evaluation

    keys = [f"{n}/{k}" for n in cands for k in classes]
    keys += [f"{PP}/{v}/{k}" for v in pp_names for k in classes]
    fields: dict[str, Any] = {
        "job_id": ctx.cfg.name,
        "cv_candidates": {n: [ctx.plans[c].hash() if ctx.plans else ctx.plan.hash()  # type: ignore[union-attr]
                              for c in cs] for n, cs in cands.items()},
        "cv_postprocess": postprocess,
    }
    if ctx.secure is not None and not ctx.cfg.per_site_metrics:
        pe = secure_evaluation(ctx, keys, None, what="model selection", step="selection",
                               phase="selection", **fields)
        return (pe["dice"], pe["cases"]) if pe is not None else ({}, 0)
    evals = site_evaluations(ctx, None, phase="selection", **fields)
    tot = sum(e.num_cases for _, e in evals)
    pooled = {k: case_weighted_mean([(e.dice_per_class.get(k, math.nan), e.num_cases)
                                     for _, e in evals]) for k in keys}
    for name, e in evals:
        ctx.run.log({"phase": "selection", "site": name, "cases": e.num_cases,
                     "dice": e.dice_per_class})
    return pooled, tot


def _fg_mean(pooled: dict, prefix: str, classes: list[str]) -> float:
    vals = [pooled.get(f"{prefix}/{k}", math.nan) for k in classes]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def select(ctx: JobContext, cvs: dict[str, dict]) -> None:
    """Choose among the configurations and their pairs; write ``RUN_DIR/model``."""
    from fedseg.models.ensemble import build_ensemble

    configs = list(cvs)
    ctx.run.set_status(phase="selection")
    classes = eval_classes(ctx)
    run = Path(ctx.cfg.run_dir)
    for c in configs:
        fold_ensemble(ctx, run / CANDIDATES_DIR / c, c, cvs[c])
    cands = candidates(configs)
    pooled, cases = pooled_scores(ctx, cands, classes)
    scores = {n: _fg_mean(pooled, n, classes) for n in cands}
    finite = {n: v for n, v in scores.items() if math.isfinite(v)}
    # no pooled scores (every site failed): the best single configuration by its CV record
    chosen = (max(finite, key=lambda n: finite[n]) if finite
              else max(configs, key=lambda c: cvs[c]["mean_dice"]))
    ctx.run.log({"phase": "selection", "site": "pooled", "cases": cases,
                 "candidates": {n: {"configurations": cands[n], "mean_dice": scores[n],
                                    "dice": {k: pooled.get(f"{n}/{k}", math.nan)
                                             for k in classes}} for n in cands},
                 "chosen": chosen, "secure_aggregation": ctx.secure is not None
                 and not ctx.cfg.per_site_metrics})
    ctx.log("model selection (pooled CV Dice on " + str(cases) + " cases): " + ", ".join(
        f"{n} {scores[n]:.4f}" for n in cands) + f"; chosen: {chosen}")
    out = ctx.run.model_dir
    shutil.rmtree(out, ignore_errors=True)
    members = cands[chosen]
    if len(members) == 1:
        shutil.copytree(run / CANDIDATES_DIR / members[0], out)
    else:
        build_ensemble({c: run / CANDIDATES_DIR / c for c in members}, out,
                       note=f"federated job {ctx.cfg.job_id}: ensemble {chosen}, chosen on "
                            f"pooled CV Dice {scores[chosen]:.4f}")
    decide_postprocessing(ctx, {chosen: members}, chosen)


def decide_postprocessing(ctx: JobContext, cand: dict[str, list[str]], name: str) -> None:
    """nnU-Net's keep-largest-component rules on the pooled CV Dice of ``name``; the decision
    is logged and written into ``RUN_DIR/model``'s bundle."""
    from fedseg.data.labels import label_groups
    from fedseg.training.postprocess import DiceSums, candidates, decide

    assert ctx.plan is not None
    groups = label_groups(ctx.plan.labels)
    classes = eval_classes(ctx)
    variants = list(candidates(groups))
    pooled, cases = pooled_scores(ctx, cand, classes, postprocess=name, pp_names=variants)
    if not cases:
        ctx.log("postprocessing: no pooled CV scores; none applied")
        return
    keys = list(groups)
    # pooled means as sums over the cases (every candidate over the same cases, as nnU-Net)
    vec = [pooled.get(f"{PP}/{v}/{k}", math.nan) * cases for v in variants for k in keys]
    cnt = [0.0 if math.isnan(pooled.get(f"{PP}/{v}/{k}", math.nan)) else float(cases)
           for v in variants for k in keys]
    sums = DiceSums.from_vector(groups, np.nan_to_num(np.asarray(vec + cnt, dtype=np.float64)))
    pp, report = decide(sums, groups)
    ctx.run.log({"phase": "postprocessing", "candidate": name, "cases": cases,
                 "keep_largest": pp.keep_largest, "report": report})
    ctx.log(f"postprocessing decided on {cases} CV cases: keep largest component of "
            f"{pp.keep_largest or 'nothing'}")
    _write_decision(ctx.run.model_dir, pp)


def _write_decision(model_dir: Path, pp: Any) -> None:
    """Into the bundle's bundle.json, where ``fedseg predict`` applies it."""
    from fedseg.models.bundle_postprocessing import write_postprocessing

    write_postprocessing(model_dir, pp)
