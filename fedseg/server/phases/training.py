"""One training round without secure aggregation: the global model out, each site's DELTA in,
checked (:func:`check_update`: NaN, shape, norm) and folded into a case-weighted running mean as
it arrives, then one step of the server optimiser.

Bounded in time: replies are awaited at most ``round_timeout_s``; a site that died comes back
as Flower's NODE_UNAVAILABLE error within about a minute (two missed heartbeats). Missing,
failed and rejected sites are logged per site ("dropped", "rejected" with the reason); the
round counts if at least ``min_sites`` updates are good (else the driver's ``on_too_few_sites``
decides). The secure version is ``server/secure_rounds.py``; both share
:func:`train_exchange`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flwr.app import Message

from fedseg.protocol import messages as pm
from fedseg.protocol.records import payload_bytes
from fedseg.server.aggregate import RunningMean, UpdateRejected, check_update
from fedseg.server.config import train_request_fields
from fedseg.server.job_context import JobContext
from fedseg.server.messaging import reply_error
from fedseg.server.outbox import Outbox, strip_prefix
from fedseg.server.phases.evaluation import log_eval
from fedseg.server.rundir import memory_mb


def train_round(ctx: JobContext, rnd: int, evaluate_first: bool,
                nodes: list[int]) -> dict[str, Any]:
    """One round with ``nodes``; returns the pooled record (also logged)."""
    assert ctx.plan is not None
    cfg, privacy = ctx.cfg, ctx.privacy
    t0 = time.monotonic()
    if len(nodes) < cfg.min_sites:
        pooled = {"phase": "train", "round": rnd, "site": "pooled", "sites_ok": 0,
                  "sites_asked": 0, "status": "too_few_sites",
                  "reason": f"only {len(nodes)} prepared site(s) connected"}
        ctx.run.log(pooled)
        return pooled
    req = pm.TrainRequest(
        **train_request_fields(cfg, ctx.plan.hash(), rnd, evaluate_first),
        dp=pm.DPParams.for_round(privacy.config, len(nodes)) if privacy else None,
    )
    box = ctx.outbox(ctx.state.weights, upload=True)
    acc = RunningMean()
    losses: list[tuple[float, int]] = []
    evals: list[tuple[str, pm.EvalReply]] = []

    def take(nid: int, r: Message | None) -> None:
        """Check one reply and fold its update into the running mean (then it is dropped)."""
        name = ctx.name(nid)
        err = reply_error(r)
        rec: dict[str, Any] = {"phase": "train", "round": rnd, "site": name,
                               "bytes_sent": ctx.net.sent_bytes.get(nid, 0)}
        if err is None:
            try:
                rep, arrays = box.unpack(nid, r, pm.TrainReply)
                delta = strip_prefix(arrays, "d/")  # spooled uploads: read tensor by tensor
                bound = None if privacy else cfg.max_update_norm  # DP: the noise adds norm
                norm = check_update(delta, ctx.state.weights, bound)
            except (pm.ProtocolError, UpdateRejected) as rej:
                rec.update(status="rejected", reason=str(rej),
                           bytes_received=payload_bytes(r.content))
                ctx.log(f"round {rnd}: update from '{name}' rejected: {rej}")
                ctx.run.log(rec)
                box.done(nid)
                return
            rec.update(status="ok", loss=rep.loss, cases=rep.num_cases,
                       iterations=rep.iterations, seconds=rep.seconds,
                       it_per_s=rep.iterations_per_s, update_norm=norm,
                       bytes_received=payload_bytes(r.content))
            acc.add(delta, 1.0 if privacy else float(rep.num_cases))  # DP: unweighted
            box.done(nid)
            losses.append((rep.loss, rep.num_cases))
            if rep.evaluation is not None:
                evals.append((name, rep.evaluation))
        else:
            rec.update(status="dropped", reason=err)
            ctx.log(f"round {rnd}: site '{name}' dropped: {err}")
        ctx.run.log(rec)

    train_exchange(ctx, rnd, nodes, box, box.content_for(lambda _: req), take, evals)
    pooled: dict[str, Any] = {"phase": "train", "round": rnd, "site": "pooled",
                              "sites_ok": acc.count, "sites_asked": len(nodes)}
    if acc.count < cfg.min_sites:
        pooled.update(status="too_few_sites", seconds=round(time.monotonic() - t0, 3),
                      reason=f"{acc.count} good update(s), min_sites={cfg.min_sites}")
        ctx.run.log(pooled)
        return pooled
    ctx.state.weights = ctx.opt.step(ctx.state.weights, acc.mean())
    pooled.update(
        status="ok",
        loss=float(sum(lo * n for lo, n in losses) / max(1, sum(n for _, n in losses))),
        cases=int(sum(n for _, n in losses)), seconds=round(time.monotonic() - t0, 3),
        **(privacy.release(len(nodes), acc.count) if privacy else {}),
        **memory_mb(),
    )
    ctx.run.log(pooled)
    return pooled


def train_exchange(ctx: JobContext, rnd: int, nodes: list[int], box: Outbox,
                   content_for: Callable[[int], Any],
                   take: Callable[[int, Message | None], None],
                   evals: list[tuple[str, pm.EvalReply]]) -> None:
    """A round's TRAIN exchange (plain or secure): each reply to ``take`` as it arrives, then
    ``take(nid, None)`` for each site that did not reply in time; the model's offer is
    withdrawn; the evaluations of the previous round's model that rode on it are logged."""
    try:
        replied = ctx.net.exchange(nodes, pm.TRAIN, content_for, ctx.cfg.round_timeout_s,
                                   take, after_push=box.pushed)
    finally:
        box.close()
    for nid in nodes:
        if nid not in replied:
            take(nid, None)
    if evals:
        log_eval(ctx, rnd - 1, sorted(evals, key=lambda e: e[0]))
