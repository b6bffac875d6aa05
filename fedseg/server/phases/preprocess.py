"""The sites preprocess their data with the plan (their caches are keyed by its hash).

Under secure aggregation the share-keys step of the next training round rides on this message
(its keys were advertised earlier: ``server/secure_rounds.py``), so round 1 needs no exchange of
its own to set up.
"""

from __future__ import annotations

from fedseg.planning.plan import Plan
from fedseg.privacy.keys import SecAggAbort
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, unpack
from fedseg.server.job_context import JobContext
from fedseg.server.messaging import reply_error
from fedseg.server.secure_rounds import prepare_share


def prepare(ctx: JobContext, node_ids: list[int], share_round: int | None = None) -> list[int]:
    """Preprocess with the plan; returns the nodes that did (the others are dropped and not
    asked again). ``share_round``: the training round whose share-keys step rides along."""
    ok = list(node_ids)
    for i, plan in enumerate(ctx.job_plans()):  # several: one per configuration trained
        ok = _prepare_plan(ctx, plan, ok, share_round if i == 0 else None)
    for nid in ok:
        ctx.sites[nid].prepared_for = ctx.plans_key()
    return ok


def _prepare_plan(ctx: JobContext, plan: Plan, node_ids: list[int],
                  share_round: int | None) -> list[int]:
    sec = ctx.secure
    share = None
    if sec is not None and share_round is not None:
        share = prepare_share(ctx, share_round)
    ctx.run.set_status(phase="preprocess")

    def content(nid: int):
        part = None
        if share is not None and any(a.site == ctx.name(nid) for a in share[1].advertisements):
            part = sec.part(share_keys=share[1])  # type: ignore[union-attr]
        return pack(pm.PrepareRequest(plan_json=plan.model_dump_json(), secagg=part,
                                      hide_case_counts=sec is not None))

    replies = ctx.net.send(node_ids, pm.PREPARE, content, timeout=3600)
    ok = []
    shared = []
    for nid in node_ids:
        r = replies.get(nid)
        err = reply_error(r)
        if err is not None:
            ctx.log(f"preprocess: site '{ctx.name(nid)}' failed: {err}")
            ctx.run.log({"phase": "prepare", "site": ctx.name(nid), "status": "failed",
                         "reason": err})
            ctx.sites.pop(nid, None)
            ctx.refused.add(nid)
            continue
        rep, _ = unpack(r.content, pm.PrepareReply)
        if rep.secagg is not None and rep.secagg.share_keys is not None:
            shared.append(rep.secagg.share_keys)
        ctx.run.log({"phase": "prepare", "site": rep.site, "status": "ok", "plan_hash": plan.hash(),
                     "cases": rep.num_cases, "seconds": rep.seconds})
        ok.append(nid)
    if share is not None:
        assert sec is not None
        try:
            sec.take_share_replies(share[0], shared)
        except SecAggAbort as err:  # the round sets its keys up afresh
            ctx.run.log({"phase": "secagg", "step": "share_keys", "round_id": share[0],
                         "status": "aborted", "reason": str(err)})
            sec.drop(share[0])
    return ok
