"""Federated K-fold cross-validation (job setting ``folds`` = K >= 2), as nnU-Net's 5 folds.

Every site splits its own training cases into the same K folds (``fedseg/data/splits.py``
``fold_split``: deterministic, nothing stored or sent). The job trains the K fold models ONE
AFTER THE OTHER, each for ``rounds`` rounds with its own poly schedule, fresh initial weights
(seed + fold) and a fresh server optimiser; the job's rounds are numbered on across the folds
(fold k's are ``k*rounds+1 .. (k+1)*rounds``), so checkpoints, resume, secure-aggregation
round ids and the report work as for one model. After each fold the fold model is scored on
every site's fold-k validation cases by the final evaluation (through the secure sum when
``per_site_metrics = false``: the server sees only pooled sums) and written as the bundle
``RUN_DIR/folds/fold_k``; after the last fold ``RUN_DIR/model`` is the ensemble of the K
bundles, which ``fedseg predict`` averages. The cross-validation Dice (``phase: "cv"`` in
metrics.jsonl) is the case-weighted mean over the folds' pooled validation Dice: every case
of every site validated once, by the model that did not train on it.

Why sequential rather than interleaved (every round training all K models): measured
(BENCHMARKS.md, "Model selection"): a round's fixed cost was 1.2 s of 16.8 s on CPU (7 %), and a
GPU round of 250 iterations is ~15 s per model, so interleaving would save little time but
multiply every message, upload and secure sum by K, and the memory each site holds by K.
Sequential fold jobs also finish fold 0 early: a usable model while the others train.

Several configurations (``configurations``, nnU-Net's best-configuration search): the K fold
models of each configuration in turn (model m is fold m % K of configuration m // K), each
configuration's plan being the job's plan set to it; then ``phases/selection.py`` chooses among
the configurations and their ensembles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedseg.planning.plan import Plan, with_configuration
from fedseg.server import secure_apply
from fedseg.server.job_context import JobContext
from fedseg.server.phases.evaluation import case_weighted_mean
from fedseg.server.phases.finish import save_model
from fedseg.server.phases.initial_model import initial_weights

FOLDS_DIR = "folds"
CANDIDATES_DIR = "candidates"


def configuration_of(ctx: JobContext, model: int | None = None) -> str | None:
    """The configuration model ``model`` (default: the current one) trains; None: the plan's."""
    m = ctx.state.model if model is None else model
    return ctx.cfg.configurations[m // ctx.cfg.folds] if ctx.cfg.configurations else None


def use_plan(ctx: JobContext, plan: Plan) -> None:
    """The job's plan; with several configurations one plan per configuration, and the
    current model's as ``ctx.plan``."""
    if ctx.cfg.configurations:
        ctx.plans = {c: with_configuration(plan, c) for c in ctx.cfg.configurations}
        ctx.plan = ctx.plans[configuration_of(ctx)]  # type: ignore[index]
    else:
        ctx.plan = plan


def fold_dir(ctx: JobContext, fold: int, config: str | None = None) -> Path:
    root = Path(ctx.cfg.run_dir) / FOLDS_DIR
    return (root / config if config else root) / f"fold_{fold}"


def finish_fold(ctx: JobContext) -> None:
    """After the model's last round and its final evaluation: its bundle and its score.
    Idempotent (a resumed job may finish a model twice)."""
    f, conf = ctx.fold, configuration_of(ctx)
    where = fold_dir(ctx, f, conf)
    save_model(ctx, where, f"federated job {ctx.cfg.job_id}, {conf + ' ' if conf else ''}fold "
                           f"{f} of {ctx.cfg.folds}, {ctx.cfg.rounds} rounds")
    ev = ctx.state.last_pooled_eval
    rec: dict = {"phase": "fold", "fold": f, "folds": ctx.cfg.folds, "round": ctx.state.round,
                 "bundle": str(where), **({"configuration": conf} if conf else {})}
    if ev is not None and ev[0] == ctx.state.round:
        rec.update(cases=ev[1], dice=ev[2], mean_dice=float(np.mean(list(ev[2].values()))))
    ctx.run.log(rec)
    ctx.log(f"{conf + ' ' if conf else ''}fold {f + 1}/{ctx.cfg.folds} done: validation Dice "
            f"{rec.get('mean_dice', float('nan')):.4f} on {rec.get('cases', 0)} case(s)")


def start_next_model(ctx: JobContext) -> None:
    """Fresh weights, optimiser, best-so-far and update-growth history (the secure sums'
    plausibility check, ``server/plausibility.py``) for the next model."""
    ctx.state.model += 1
    conf = configuration_of(ctx)
    if conf is not None:
        ctx.plan = ctx.plans[conf]
    assert ctx.plan is not None
    ctx.state.weights = initial_weights(ctx.plan, ctx.cfg.seed + ctx.state.model)
    ctx.opt.load_state_dict({})
    ctx.state.best_dice = -1.0
    ctx.state.last_pooled_eval = None
    if ctx.secure is not None:
        secure_apply.new_model(ctx)


def cv_summary(ctx: JobContext, config: str | None = None) -> dict:
    """The cross-validation Dice of ``config``'s folds from their records: case-weighted."""
    folds: dict[int, dict] = {}
    for r in ctx.run.read_metrics():
        if r.get("phase") == "fold" and "dice" in r and r.get("configuration") == config:
            folds[int(r["fold"])] = r  # the latest record of each fold (resume)
    tot = sum(int(r["cases"]) for r in folds.values())
    classes = sorted({c for r in folds.values() for c in r["dice"]})
    dice = {c: case_weighted_mean([(float(r["dice"][c]), int(r["cases"]))
                                   for r in folds.values() if c in r["dice"]]) for c in classes}
    return {"phase": "cv", "folds": ctx.cfg.folds, "folds_scored": sorted(folds),
            **({"configuration": config} if config else {}),
            "cases": tot, "dice": dice,
            "mean_dice": float(np.mean(list(dice.values()))) if dice else float("nan"),
            "fold_mean_dice": {str(k): r["mean_dice"] for k, r in sorted(folds.items())}}


def fold_ensemble(ctx: JobContext, out: Path, config: str | None, cv: dict) -> Path:
    """The ensemble bundle of ``config``'s fold bundles at ``out`` (rebuilt on resume)."""
    import shutil

    from fedseg.models.ensemble import build_ensemble

    shutil.rmtree(out, ignore_errors=True)
    return build_ensemble(
        {f"fold_{k}": fold_dir(ctx, k, config) for k in range(ctx.cfg.folds)}, out,
        note=f"federated job {ctx.cfg.job_id}: {config + ' ' if config else ''}"
             f"{ctx.cfg.folds}-fold cross-validation ensemble, CV Dice {cv['mean_dice']:.4f}")
