"""The secure-aggregation steps that carry no values of their own: the set-up (advertise,
share keys) and the unmask step, as the server sends them (``server/secure_rounds.py`` has the
message flow they fit into).

UNMASK goes through each site's bulk rendezvous (``fedseg/protocol/bulk.py``: BulkRendezvous)
when the job moves arrays over HTTP and the site said in its TRAIN reply that it listens (its
ClientApp runs in fedseg's long-lived site worker): the server posts the request, the site's
listener thread answers it, no Flower exchange. A site that does not listen, or does not answer
within ``FAST_STEP_WAIT_S``, gets UNMASK as a Flower message — the same request, which a site
answers identically however often it comes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import Message

from fedseg.privacy.keys import SecAggAbort
from fedseg.privacy.secagg import AggregateResult, ShareKeysRequest
from fedseg.protocol import messages as pm
from fedseg.protocol.bulk import BulkRendezvous
from fedseg.protocol.records import pack, unpack
from fedseg.server.job_context import JobContext
from fedseg.server.messaging import reply_error
from fedseg.server.outbox import Outbox
from fedseg.server.secure_state import SecureAggregation

SETUP_TIMEOUT_S = 600.0
FAST_STEP_WAIT_S = 20.0  # rendezvous answers are awaited this long, then sent by Flower instead


@dataclass
class SetupResult:
    nodes: list[int]  # the nodes with a mask request for the aggregation
    failed: dict[int, str]  # node -> why it is not in the aggregation
    exchanges: int  # Flower exchanges the set-up took (1 or 2)


def secure(ctx: JobContext) -> SecureAggregation:
    """The job's secure aggregation (these steps run only when it is on)."""
    assert ctx.secure is not None
    return ctx.secure


def event(ctx: JobContext, **rec: Any) -> None:
    ctx.run.log({"phase": "secagg", **rec})


def reply_part(nid: int, r: Message | None, model: type,
               box: Outbox | None = None) -> tuple[Any, Any, str | None]:
    """(reply, arrays, None) or (None, {}, why it is no answer)."""
    err = reply_error(r)
    if err is not None:
        return None, {}, err
    try:
        rep, arrays = (box.unpack(nid, r, model) if box is not None  # type: ignore[arg-type]
                       else unpack(r.content, model))  # type: ignore[union-attr]
    except pm.ProtocolError as perr:
        return None, {}, str(perr)
    return rep, arrays, None


def setup(ctx: JobContext, rid: str, nodes: list[int], layout: tuple[int, dict[str, int]],
          what: str) -> SetupResult:
    """Advertise (for nodes without an advertisement) and share keys. Raises SecAggAbort with
    fewer than t sites."""
    sec = secure(ctx)
    a = sec.aggs[rid]
    failed: dict[int, str] = {}
    missing = [n for n in nodes if ctx.name(n) not in a.adverts]
    if missing:
        req = pm.SecAggStepRequest(secagg=sec.part(advertise=[rid]))
        replies = ctx.net.send(missing, pm.SHARE_KEYS, lambda _: pack(req),
                               timeout=SETUP_TIMEOUT_S)
        for nid in missing:
            rep, _, err = reply_part(nid, replies.get(nid), pm.SecAggStepReply)
            if err is not None:
                event(ctx, step="advertise", round_id=rid, what=what, site=ctx.name(nid),
                      status="dropped", reason=err)
                failed[nid] = err
                continue
            sec.take_adverts(rid, ctx.name(nid), rep.secagg)
    share_req = sec.share_request(rid, layout)
    listed = {adv.site for adv in share_req.advertisements}
    asked = [n for n in nodes if ctx.name(n) in listed]
    req = pm.SecAggStepRequest(secagg=sec.part(share_keys=share_req))
    replies = ctx.net.send(asked, pm.SHARE_KEYS, lambda _: pack(req), timeout=SETUP_TIMEOUT_S)
    got = []
    for nid in asked:
        rep, _, err = reply_part(nid, replies.get(nid), pm.SecAggStepReply)
        if err is not None or rep.secagg.share_keys is None:
            event(ctx, step="share_keys", round_id=rid, what=what, site=ctx.name(nid),
                  status="dropped", reason=err or "no share-keys reply")
            failed[nid] = err or "no share-keys reply"
            continue
        got.append(rep.secagg.share_keys)
    mask_reqs = sec.take_share_replies(rid, got)
    a = sec.aggs[rid]
    exchanges = 2 if missing else 1
    event(ctx, step="setup", round_id=rid, what=what, sites=sorted(mask_reqs),
          excluded=dict(a.server.excluded) if a.server else {}, exchanges=exchanges)
    return SetupResult([n for n in nodes if ctx.name(n) in mask_reqs], failed, exchanges)


def unmask(ctx: JobContext, rid: str, nodes: list[int],
           next_share: tuple[str, ShareKeysRequest] | None = None,
           steps: dict[int, BulkRendezvous] | None = None) -> tuple[AggregateResult, int]:
    """The UNMASK step (carrying the next aggregation's share keys); returns the sums and the
    Flower exchanges it needed (0 or 1).

    ``steps``: the sites that listen on a bulk rendezvous for it (their TRAIN reply said so):
    they get the request there and answer within ``FAST_STEP_WAIT_S`` (no Flower exchange). The
    others, and a listener that did not answer in time (its worker restarted, say), get it as a
    Flower message."""
    sec = secure(ctx)
    a = sec.aggs[rid]
    assert a.server is not None
    ureq = a.server.unmask_request()
    survivors = set(ureq.survivors)
    sharers = {x.site for x in next_share[1].advertisements} if next_share else set()
    targets = [n for n in nodes if ctx.name(n) in survivors or ctx.name(n) in sharers]

    def request(nid: int) -> pm.SecAggStepRequest:
        name = ctx.name(nid)
        return pm.SecAggStepRequest(secagg=sec.part(
            unmask=ureq if name in survivors else None,
            share_keys=next_share[1] if next_share and name in sharers else None))

    answered: dict[int, tuple[pm.SecAggStepReply | None, str | None]] = {}
    fast = {nid: rv for nid, rv in (steps or {}).items() if nid in targets}
    if fast and ctx.bulk is not None:
        posted = {nid: rv for nid, rv in fast.items()
                  if ctx.bulk.post(rv.token, request(nid).model_dump_json().encode())}
        got = ctx.bulk.answers([rv.token for rv in posted.values()], FAST_STEP_WAIT_S)
        for nid, rv in posted.items():
            if rv.token in got:
                answered[nid] = _step_answer(got[rv.token])
    rest = [n for n in targets if n not in answered]
    if rest:
        replies = ctx.net.send(rest, pm.UNMASK, lambda nid: pack(request(nid)),
                               timeout=SETUP_TIMEOUT_S)
        for nid in rest:
            rep, _, err = reply_part(nid, replies.get(nid), pm.SecAggStepReply)
            answered[nid] = (rep, err)
    unmask_replies, share_replies = [], []
    for nid in targets:
        rep, err = answered[nid]
        name = ctx.name(nid)
        if err is None and any(x is not None and x.site != name for x in (
                rep.secagg.unmask, rep.secagg.share_keys)):
            err = "answered in another site's name"
        if err is not None:
            event(ctx, step="unmask", round_id=rid, site=name, status="dropped", reason=err)
            continue
        if rep.secagg.unmask is not None:
            unmask_replies.append(rep.secagg.unmask)
        if rep.secagg.share_keys is not None:
            share_replies.append(rep.secagg.share_keys)
    if next_share is not None:
        try:
            sec.take_share_replies(next_share[0], share_replies)
        except SecAggAbort as err:
            event(ctx, step="share_keys", round_id=next_share[0], status="aborted",
                  reason=str(err))
            sec.drop(next_share[0])
    try:
        res = a.server.unmask(unmask_replies)
    finally:
        sec.drop(rid)
    event(ctx, step="unmask", round_id=rid, status="ok", survivors=res.survivors,
          dropped=res.dropped, recovered=bool(res.dropped), excluded=res.excluded,
          num_clipped=res.num_clipped, via_rendezvous=len(targets) - len(rest),
          via_flower=len(rest))
    return res, 1 if rest else 0


def _step_answer(body: bytes) -> tuple[pm.SecAggStepReply | None, str | None]:
    """(reply, None) or (None, why) from a rendezvous answer (``pm.StepAnswer`` JSON)."""
    try:
        ans = pm.StepAnswer.model_validate_json(body)
    except ValueError as err:
        return None, f"its step answer does not validate: {' '.join(str(err).split())[:300]}"
    if ans.error is not None:
        return None, f"{ans.error.kind} error at the site: {ans.error.message}"
    return ans.reply, None
