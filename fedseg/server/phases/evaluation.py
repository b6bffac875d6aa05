"""Scores of the global model: per site and pooled (case-weighted) Dice and HD95, and the final
evaluation after the last round.

Round trips dominate wall time in Flower 1.42 (~6 s each, even empty), so evaluation of the
global model rides on the next round's training message (the site evaluates the weights it
receives before training on them: ``phases/training.py``); only the final evaluation is a
message of its own. Without per-site metrics (secure aggregation, ``per_site_metrics = false``)
the pooled scores come from a secure sum instead (``server/secure_rounds.py``) and only
:func:`record_pooled_eval` is used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedseg.protocol import messages as pm
from fedseg.protocol.records import unpack
from fedseg.server.job_context import JobContext
from fedseg.server.messaging import reply_error


def case_weighted_mean(values: list[tuple[float, int]]) -> float:
    """The mean of (value, cases) pairs weighted by cases, over the finite values only (NaN
    when there are none): how per-site (or per-fold) means pool into one."""
    ok = [(v, n) for v, n in values if np.isfinite(v)]
    total = sum(n for _, n in ok)
    return float(sum(v * n for v, n in ok) / total) if total else float("nan")


def log_eval(ctx: JobContext, after_round: int, evals: list[tuple[str, pm.EvalReply]]) -> float:
    """Log per-site and pooled (case-weighted) Dice/HD95; returns pooled mean Dice."""
    tot = sum(e.num_cases for _, e in evals)
    classes = sorted({c for _, e in evals for c in e.dice_per_class})
    pooled_dice, pooled_hd = {}, {}
    for c in classes:
        vals = [(e.dice_per_class[c], e.num_cases) for _, e in evals if c in e.dice_per_class]
        pooled_dice[c] = float(sum(v * n for v, n in vals) / max(1, sum(n for _, n in vals)))
        pooled_hd[c] = case_weighted_mean([(e.hd95_per_class[c], e.num_cases) for _, e in evals
                                           if c in e.hd95_per_class])
    for name, e in evals:
        ctx.run.log({"phase": "eval", "round": after_round, "site": name,
                     "cases": e.num_cases, "dice": e.dice_per_class,
                     "hd95": e.hd95_per_class,
                     **({"hd95_missing": e.hd95_missing_per_class}
                        if e.hd95_missing_per_class else {}),
                     "mean_dice": float(np.mean(list(e.dice_per_class.values()))),
                     "seconds": e.seconds})
    extra = {}  # undefined HD95s, counted in the report: when every site counted them
    if evals and all(e.hd95_missing_per_class for _, e in evals):
        extra["hd95_missing"] = {c: sum(e.hd95_missing_per_class.get(c, 0) for _, e in evals)
                                 for c in classes}
    return record_pooled_eval(ctx, after_round, tot, pooled_dice, pooled_hd, **extra)


def record_pooled_eval(
    ctx: JobContext, after_round: int, cases: int, dice: dict[str, float],
    hd95: dict[str, float], **extra: Any,
) -> float:
    """Log the pooled evaluation, update status, keep ``best`` in step; returns mean Dice."""
    mean = float(np.mean(list(dice.values()))) if dice else float("nan")
    fold = {"fold": ctx.fold} if ctx.cfg.folds > 1 else {}
    ctx.run.log({"phase": "eval", "round": after_round, "site": "pooled", "cases": cases,
                 "dice": dice, "hd95": hd95, "mean_dice": mean, **fold, **extra})
    ctx.state.last_pooled_eval = (after_round, cases, dict(dice))
    ctx.run.set_status(latest_dice=mean, latest_eval_round=after_round)
    if after_round > 0 and mean > ctx.state.best_dice:
        ctx.state.best_dice = mean
        ctx.checkpoints.wait()
        if ctx.state.round == after_round and ctx.run.checkpoint_path("last").exists():
            ctx.run.copy_checkpoint("last", "best")
    return mean


def final_evaluation(ctx: JobContext) -> None:
    """The final model scored by every site, per site and pooled (the secure sum's version
    without per-site metrics: ``secure_rounds.final_evaluation``)."""
    ctx.run.set_status(phase="final-evaluation")
    evals = site_evaluations(ctx, ctx.state.weights, **final_eval_fields(ctx))
    if evals:
        log_eval(ctx, ctx.state.round, evals)


def final_eval_fields(ctx: JobContext) -> dict[str, Any]:
    """What the final evaluation's request says besides the secure parts: the fold it scores
    and, with cross-validation, that the sites keep their CV predictions."""
    return {"fold": ctx.fold, "folds": ctx.cfg.folds, "job_id": ctx.cfg.name,
            "keep_cv_predictions": ctx.cfg.folds > 1}


def site_evaluations(ctx: JobContext, weights: Any, phase: str = "eval",
                     **fields: Any) -> list[tuple[str, pm.EvalReply]]:
    """An EVALUATE exchange in clear: ``weights`` (None: no model) to every active site, each
    site's reply (the sites that failed are logged ``dropped``)."""
    assert ctx.plan is not None
    nodes = list(ctx.active_nodes())
    req = pm.EvalRequest(round=ctx.state.round, plan_hash=ctx.plan.hash(), **fields)
    box = ctx.outbox(weights)
    try:
        replies = ctx.net.send(nodes, pm.EVALUATE, box.content_for(lambda _: req),
                               timeout=ctx.cfg.round_timeout_s)
    finally:
        box.close()
    evals = []
    for nid in nodes:
        r = replies.get(nid)
        err = reply_error(r)
        if err is not None:
            ctx.run.log({"phase": phase, "round": ctx.state.round, "site": ctx.name(nid),
                         "status": "dropped", "reason": err})
            continue
        rep, _ = unpack(r.content, pm.EvalReply)
        evals.append((rep.site, rep))
    return evals
