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
(BENCHMARKS.md, "Cross-validation"), a round's fixed cost in Flower 1.42 is seconds while a
GPU round of 250 iterations is ~15 s per model, so interleaving would save little time but
multiply every message, upload and secure sum by K, and the memory each site holds by K.
Sequential fold jobs also finish fold 0 early: a usable model while the others train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedseg.server.job_context import JobContext
from fedseg.server.phases.finish import save_model
from fedseg.server.phases.initial_model import initial_weights
from fedseg.server.report import write_report

FOLDS_DIR = "folds"


def fold_dir(ctx: JobContext, fold: int) -> Path:
    return Path(ctx.cfg.run_dir) / FOLDS_DIR / f"fold_{fold}"


def finish_fold(ctx: JobContext) -> None:
    """After the fold's last round and its final evaluation: its bundle and its score.
    Idempotent (a resumed job may finish a fold twice)."""
    f = ctx.state.fold
    save_model(ctx, fold_dir(ctx, f),
               f"federated job {ctx.cfg.job_id}, fold {f} of {ctx.cfg.folds}, "
               f"{ctx.cfg.rounds} rounds")
    ev = ctx.state.last_pooled_eval
    rec: dict = {"phase": "fold", "fold": f, "folds": ctx.cfg.folds, "round": ctx.state.round,
                 "bundle": str(fold_dir(ctx, f))}
    if ev is not None and ev[0] == ctx.state.round:
        rec.update(cases=ev[1], dice=ev[2], mean_dice=float(np.mean(list(ev[2].values()))))
    ctx.run.log(rec)
    ctx.log(f"fold {f + 1}/{ctx.cfg.folds} done: validation Dice "
            f"{rec.get('mean_dice', float('nan')):.4f} on {rec.get('cases', 0)} case(s)")


def start_next_fold(ctx: JobContext) -> None:
    """Fresh weights, optimiser and best-so-far for the next fold's model."""
    ctx.state.fold += 1
    assert ctx.plan is not None
    ctx.state.weights = initial_weights(ctx.plan, ctx.cfg.seed + ctx.state.fold)
    ctx.opt.load_state_dict({})
    ctx.state.best_dice = -1.0
    ctx.state.last_pooled_eval = None


def cv_summary(ctx: JobContext) -> dict:
    """The cross-validation Dice from the fold records: case-weighted over the folds."""
    folds: dict[int, dict] = {}
    for r in ctx.run.read_metrics():
        if r.get("phase") == "fold" and "dice" in r:
            folds[int(r["fold"])] = r  # the latest record of each fold (resume)
    tot = sum(int(r["cases"]) for r in folds.values())
    classes = sorted({c for r in folds.values() for c in r["dice"]})
    dice = {}
    for c in classes:
        vals = [(float(r["dice"][c]), int(r["cases"])) for r in folds.values()
                if c in r["dice"] and np.isfinite(float(r["dice"][c]))]
        n = sum(k for _, k in vals)
        dice[c] = float(sum(v * k for v, k in vals) / n) if n else float("nan")
    rec = {"phase": "cv", "folds": ctx.cfg.folds, "folds_scored": sorted(folds),
           "cases": tot, "dice": dice,
           "mean_dice": float(np.mean(list(dice.values()))) if dice else float("nan"),
           "fold_mean_dice": {str(k): r["mean_dice"] for k, r in sorted(folds.items())}}
    return rec


def finish(ctx: JobContext) -> None:
    """All folds done: the CV record, the ensemble bundle at ``RUN_DIR/model``, the report."""
    import shutil

    from fedseg.models.ensemble import build_ensemble

    rec = cv_summary(ctx)
    ctx.run.log(rec)
    ctx.log(f"cross-validation ({ctx.cfg.folds} folds, {rec['cases']} validation cases): "
            f"Dice {rec['mean_dice']:.4f} {rec['dice']}")
    out = ctx.run.model_dir
    shutil.rmtree(out, ignore_errors=True)  # a resumed job rebuilds it
    build_ensemble({f"fold_{k}": fold_dir(ctx, k) for k in range(ctx.cfg.folds)}, out,
                   note=f"federated job {ctx.cfg.job_id}: {ctx.cfg.folds}-fold cross-validation "
                        f"ensemble, CV Dice {rec['mean_dice']:.4f}")
    write_report(ctx.run)
