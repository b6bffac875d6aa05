"""The end of a secure training round: from the unmasked sums to the global step — or to a
refusal that leaves the model as it was.

Why a module of its own: ``secure_rounds`` runs the protocol; this decides what the sums MEAN
and whether they are plausible (``server/plausibility.py``), and keeps the round history the
checks need:

- **Weights** (issue #13, count privacy). The mean is s·Σ v_i / N with N the case count of the
  secure fingerprint (a sum, released once), not the survivors' Σ n_i: that sum, over two rounds
  with different survivors, gave a site's count away by differencing (9 with A, B, C and 6 with
  A, C: B = 3). The per-round vector therefore carries no case count at all
  (``aggregates.train_int_fields``), and the pooled ``loss``/``cases`` are reported only for
  rounds in which every fingerprinted site survived (there Σ n_i = N, already known). N is the
  sites' training cases, summed securely ONCE with the fingerprint (``train_cases``) and kept
  in ``RUN_DIR/secure_cases.json`` for a resume; a cross-validation sums one N per fold (the
  fold models train on different shares of the cases). A job without a fingerprint (``plan_file``, or
  a run folder from before) still sums and divides by Σ n_i, and says so in its pooled records
  (``counts_per_round``).
- **Refusal**. Implausible sums are not applied: the pooled record says ``refused`` with every
  failed check, the digest and norm of the (unchanged) global model, and the secure-aggregation
  facts; ``job.py`` retries the round (``robust.refused_retries``).
- **A retry must not difference a refused sum.** The refused sum was unmasked; honest sites
  retrain the round from the same model and produce (on CPU, bit for bit) the same update. A
  retry unmasked over other survivors would give the server the difference — one site's update.
  So a retry is unmasked only over exactly the refused attempt's survivors; otherwise it is
  refused before anything is unmasked (:func:`retry_guard`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fedseg.data.labels import label_groups
from fedseg.privacy import aggregates as agg
from fedseg.privacy.secagg import AggregateResult, SecAggServer
from fedseg.protocol import messages as pm
from fedseg.server import plausibility as pl
from fedseg.server.job_context import JobContext
from fedseg.server.phases.evaluation import record_pooled_eval
from fedseg.server.rundir import memory_mb
from fedseg.server.secure_steps import event, secure

CENSUS_FILE = "secure_cases.json"  # in the run folder: N and its sites, for a resume


def history(ctx: JobContext) -> dict[str, Any]:
    """The job's round history for the checks (kept on its ``SecureAggregation``); N and its
    sites are read back from the run folder after a resume."""
    sec = secure(ctx)
    if sec.robust_state is None:
        state: dict[str, Any] = {"norms": [], "refused": {}, "census": None, "cases": None}
        path = ctx.run.root / CENSUS_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            n = saved["train_cases"]
            state.update(census=list(saved["sites"]),
                         cases=[int(x) for x in n] if isinstance(n, list) else int(n))
        sec.robust_state = state
    return sec.robust_state


def new_model(ctx: JobContext) -> None:
    """A new model (cross-validation: the next fold or configuration) starts its own history
    of accepted step norms: its first steps are far larger than the previous model's last, and
    the growth check would refuse them against those."""
    history(ctx)["norms"] = []


def counts_per_round(ctx: JobContext) -> bool:
    """True when N is unknown: the job had no secure fingerprint (``plan_file``) or its run
    folder predates the count in it (or, with cross-validation, holds no count per fold);
    then each round still sums and divides by Σ n_i."""
    if ctx.secure is None:
        return True
    cases = history(ctx)["cases"]
    if ctx.cfg.folds > 1:
        return not (isinstance(cases, list) and len(cases) == ctx.cfg.folds)
    return cases is None


def fixed_cases(ctx: JobContext, rnd: int) -> int:
    """N of round ``rnd``: the fingerprint's training-case sum, of the round's fold with
    cross-validation (each site summed its training count in every fold: the folds train on
    different shares of the cases)."""
    cases = history(ctx)["cases"]
    if isinstance(cases, list):
        return int(cases[ctx.cfg.fold_of(rnd)[0]]) if ctx.cfg.folds > 1 else 0
    return int(cases or 0)


def set_census(ctx: JobContext, sites: list[str], train_cases: int | list[int]) -> None:
    """N (the training cases of the fingerprint's sites, one secure sum; with cross-validation
    one N per fold) and those sites."""
    state = history(ctx)
    n = [int(x) for x in train_cases] if isinstance(train_cases, list) else int(train_cases)
    state.update(census=sorted(sites), cases=n)
    path = ctx.run.root / CENSUS_FILE
    path.write_text(json.dumps({"train_cases": n, "sites": sorted(sites)}) + "\n")


def retry_guard(ctx: JobContext, rnd: int, server: SecAggServer) -> str | None:
    """Why this attempt must not be unmasked (module docstring), or None."""
    prior = history(ctx)["refused"].get(rnd)
    now = sorted(server._peers)
    if prior is not None and now != prior:
        return (f"retry of a refused round with other survivors ({now}, refused: {prior}): "
                "unmasking it would reveal the difference of the two sums; not unmasked")
    return None


def refuse(ctx: JobContext, rnd: int, pooled: dict[str, Any], problems: list[str],
           t0: float, secagg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log the refusal (metrics.jsonl and the job log); the global model is not touched."""
    reason = "; ".join(problems)
    pooled.update(status="refused", reason=reason, checks=problems,
                  model_digest=pl.model_digest(ctx.state.weights),
                  weight_norm=pl.l2_norm(ctx.state.weights),
                  seconds=round(time.monotonic() - t0, 3), **({"secagg": secagg} if secagg else {}))
    ctx.log(f"round {rnd}: sums REFUSED, global model unchanged: {reason}")
    event(ctx, step="plausibility", site="pooled", round=rnd, status="refused", reason=reason,
           round_id=(secagg or {}).get("round_id"))
    ctx.run.log(pooled)
    return pooled


def finish_round(ctx: JobContext, rnd: int, res: AggregateResult, layout: tuple[int, dict],
                 pooled: dict[str, Any], scale: float, dp: pm.DPParams | None,
                 classes: list[str], t0: float, exchanges: int) -> dict[str, Any]:
    """Check the unmasked sums; apply the step and log the pooled record, or refuse."""
    rc = pl.robust_config(ctx.cfg)
    hist = history(ctx)
    m = len(res.survivors)
    length = layout[0]
    counts = "num_samples" in layout[1]
    n_fixed = fixed_cases(ctx, rnd)
    secagg = {"round_id": res.round_id, "survivors": res.survivors, "dropped": res.dropped,
              "recovered": bool(res.dropped), "excluded": res.excluded,
              "num_clipped": res.num_clipped, "exchanges": exchanges}
    problems = (pl.check_sums(res.ints, res.num_clipped, m, length, rc, dp=dp is not None)
                if rc.checks else [])
    loss_sum = (int(res.ints["loss"][0]) - int(res.ints["loss"][1])) / agg.LOSS_SCALE
    n_total = res.num_samples if counts else n_fixed
    if counts and n_total <= 0:
        problems.append("case count: the summed case count is 0")
    if not counts and rc.checks:
        problems += pl.check_loss(loss_sum, n_fixed, m)
    step_norm = weight_norm = float("nan")
    mean_delta = None
    if not (counts and n_total <= 0):  # the would-be step, checked (and logged) even when
        # the sums already failed: the refusal then says what the round would have done
        # DP: unweighted mean of the clipped, noised deltas (why: fedseg/privacy/dp.py)
        factor = (1.0 / m) if dp is not None else scale / max(1, n_total)
        sh = shapes(ctx)  # straight from the ring sum into float32 tensors
        mean_delta = res.mean_parts(factor, [(k, sh[k]) for k in sorted(sh)])
        step_norm, weight_norm = pl.l2_norm(mean_delta), pl.l2_norm(ctx.state.weights)
        bound = None
        if dp is not None:
            noise_sum = dp.noise_multiplier * dp.clip_norm * (m / dp.n_sites) ** 0.5
            bound = pl.dp_step_bound(dp.clip_norm, noise_sum, m, length)
        if rc.checks:
            problems += pl.check_step(step_norm, weight_norm, hist["norms"], rc,
                                     ctx.cfg.max_update_norm, bound)
    res.release()
    if problems:
        hist["refused"][rnd] = sorted(res.survivors)
        pooled.update(sites_ok=m, update_norm=step_norm)
        return refuse(ctx, rnd, pooled, problems, t0, secagg)
    assert mean_delta is not None
    hist["refused"].pop(rnd, None)
    hist["norms"] = (hist["norms"] + [step_norm])[-max(rc.history, 1):]
    ctx.state.weights = ctx.opt.step(ctx.state.weights, mean_delta)
    if "eval_cases" in layout[1]:
        pe = agg.pooled_eval(res.ints, classes)
        if pe is not None:
            log_pooled_eval(ctx, rnd - 1, pe)
    census = set(hist["census"] or [ctx.name(n) for n in ctx.sites])
    full = census <= set(res.survivors)
    if counts or full:  # a partial round reports neither (absent, not null: consumers
        # format the pooled loss as a number)
        pooled.update(loss=agg.pooled_loss(res.ints, n_total) if counts else loss_sum / n_fixed,
                      cases=n_total)
    pooled.update(status="ok", sites_ok=m,
                  update_norm=step_norm, weight_norm=pl.l2_norm(ctx.state.weights),
                  seconds=round(time.monotonic() - t0, 3), secagg=secagg, **memory_mb())
    if counts:
        pooled["counts_per_round"] = True
    elif not full:
        pooled["partial"] = "not every fingerprinted site survived: loss and cases not reported"
    ctx.run.log(pooled)
    return pooled


def shapes(ctx: JobContext) -> dict[str, tuple[int, ...]]:
    """The global model's tensor shapes: the layout of the summed vector."""
    return {k: tuple(v.shape) for k, v in ctx.state.weights.items()}


def eval_classes(ctx: JobContext) -> list[str]:
    """The classes (label / region keys) a secure evaluation sum carries."""
    assert ctx.plan is not None
    return sorted(label_groups(ctx.plan.labels))


def log_pooled_eval(ctx: JobContext, after_round: int, pe: dict) -> float:
    """Pooled-only evaluation record (``per_site_metrics = false``)."""
    return record_pooled_eval(ctx, after_round, pe["cases"], pe["dice"], pe["hd95"],
                              secure_aggregation=True)
