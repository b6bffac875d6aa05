"""Server side of secure aggregation in the federated job: fingerprint sum, training rounds,
final evaluation — the server only ever unmasks SUMS over at least t sites. The job's driver
(``server/job.py``) calls these instead of the plain phases (``server/phases/``) when secure
aggregation is on.

Message flow (one Flower exchange = one ``send_and_receive``; [+] marks an exchange that plain
aggregation does not have). The setup steps of the next aggregation ride on messages that flow
anyway, as ``fedseg/privacy/secagg.py`` describes:

    ENROL            → advertise(FP)                       reply: KeyAdvertisement(FP)
    SHARE_KEYS [+]   → ShareKeysRequest(FP)                reply: ShareKeysReply(FP)
    FINGERPRINT      → MaskRequest(FP), advertise(T1)      reply: masked exact fingerprint, adv(T1)
    UNMASK [+]       → UnmaskRequest(FP)                   reply: UnmaskReply(FP)
    PREPARE          → plan, ShareKeysRequest(T1)          reply: ShareKeysReply(T1)
    TRAIN_r          → weights, MaskRequest(Tr), adv(Tr+1) reply: masked update, adv(Tr+1)
    UNMASK_r (bulk)  → UnmaskRequest(Tr), ShareKeys(Tr+1)  reply: UnmaskReply(Tr), ShareKeysReply(Tr+1)
    EVALUATE         (per-site metrics: as without SecAgg; else setup [+][+], masked, unmask [+])

UNMASK_r goes through each site's bulk rendezvous (``fedseg/protocol/bulk.py``:
BulkRendezvous; the set-up and unmask steps are ``server/secure_steps.py``, the protocol state
``server/secure_state.py``) when the job moves arrays over HTTP (``bulk_transport = "http"``, the default)
and the site said in its TRAIN reply that it listens (its ClientApp runs in fedseg's long-lived
site worker): the server posts the request, the site's listener thread answers it, no Flower
exchange — so a training round is ONE exchange, as without secure aggregation. A site that does
not listen, or does not answer within ``FAST_STEP_WAIT_S``, gets UNMASK_r as a Flower message
[+] (one extra exchange, the only one). When the round's keys were not set up in advance — the
first round after a resume, a site that joined or came back, a retried round — the round first
runs the two set-up exchanges (advertise, share keys) with a FRESH round id.

Round ids are ``<Flower run id>/<job id>/<kind><round>/<attempt>``: the sites check the run-id
prefix and never reuse an id, and the attempt counter is new for every set-up, so a retried or
resumed round always has fresh keys.

Update validation: the server cannot check one site's update any more (it never sees one).
Each site checks its own before masking (finite, L2 norm <= ``max_update_norm``; see
``fedseg/client/secure.py``) and the server checks the unmasked SUMS before applying them
(``server/plausibility.py``: a masked canary, the clip count, the mean step's norm against the
bound, the model and the round history; ``server/secure_apply.py``): an implausible round is
refused with the model unchanged and retried. A malicious site can still send a bad update
whose effect on the mean stays within those bounds (docs/security-notes.md §9). The mean is
weighted with the fingerprint's fixed case count, so no per-round case count is unmasked.

Differential privacy (job ``dp``, off by default; ``fedseg/privacy/dp.py``): the TRAIN message
carries ``DPParams`` with n = the sites asked; each site clips its delta to S and adds its noise
share before masking, UNWEIGHTED, and the server divides the unmasked sum by the number m of
survivors and accounts the release with noise multiplier z·√(m/n) (``dp_epsilon`` and
``dp_sigma`` in the pooled record).
"""


from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import Message

from fedseg.errors import FedsegError
from fedseg.privacy import aggregates as agg
from fedseg.privacy import exact_sum
from fedseg.privacy.keys import SecAggAbort
from fedseg.privacy.secagg import ShareKeysRequest
from fedseg.protocol import messages as pm
from fedseg.protocol.bulk import BulkRendezvous
from fedseg.protocol.records import pack, payload_bytes
from fedseg.server import plausibility as pl
from fedseg.server import secure_apply
from fedseg.server.config import train_request_fields
from fedseg.server.job_context import JobContext
from fedseg.server.phases.evaluation import final_eval_fields
from fedseg.server.phases.training import train_exchange
from fedseg.server.secure_apply import eval_classes, log_pooled_eval, shapes
from fedseg.server.secure_steps import event, reply_part, secure, setup, unmask


def _vector(arrays: Any) -> Any:
    """The masked vector of a reply: read block by block from the spool file when it came as a
    bulk upload (``SpooledArrays.lazy``), else the array itself."""
    return arrays.lazy(pm.SECAGG_VECTOR) if hasattr(arrays, "lazy") else arrays[pm.SECAGG_VECTOR]


# ---- fingerprint -------------------------------------------------------------------------


def fingerprint_sum(ctx: JobContext, rid: str, length: int, next_rid: str) -> np.ndarray:
    """The exact sum of every enrolled site's fingerprint vector; all sites must take part."""
    nodes = list(ctx.sites)
    layout = (0, {agg.FINGERPRINT_FIELD: exact_sum.encoded_length(length),
                  agg.TRAIN_CASES_FIELD: ctx.cfg.folds, agg.SITES_FIELD: 1})
    try:
        ready = setup(ctx, rid, nodes, layout, "fingerprint").nodes
        if len(ready) != len(nodes):
            raise SecAggAbort(f"only {len(ready)} of {len(nodes)} sites set up the secure sum")
        sec = secure(ctx)
        reqs = sec.aggs[rid].mask_reqs
        assert reqs is not None
        replies = ctx.net.send(nodes, pm.FINGERPRINT, lambda nid: pack(pm.FingerprintRequest(
            secagg=sec.part(mask=reqs[ctx.name(nid)], advertise=[next_rid]))), timeout=3600)
        server = sec.aggs[rid].server
        assert server is not None
        for nid in nodes:
            rep, arrays, err = reply_part(nid, replies.get(nid), pm.FingerprintReply)
            if err is None and (rep.secagg is None or rep.secagg.masked is None
                                or pm.SECAGG_VECTOR not in arrays):
                err = "no masked fingerprint in the reply"
            if err is None and not server.add_masked(rep.secagg.masked, arrays[pm.SECAGG_VECTOR]):
                err = server.excluded.get(ctx.name(nid), "masked upload refused")
            if err is not None:
                raise FedsegError(f"fingerprint: site '{ctx.name(nid)}' failed: {err}")
            sec.take_adverts(next_rid, ctx.name(nid), rep.secagg)
        res, _ = unmask(ctx, rid, nodes)
    except SecAggAbort as err:
        raise FedsegError(f"fingerprint: secure aggregation failed: {err}") from None
    if int(res.ints[agg.SITES_FIELD][0]) != len(res.survivors):  # server/plausibility.py
        raise FedsegError("fingerprint: the secure sum's canary does not match the sites; some "
                          "upload was not masked for this sum (a replayed or forged vector)")
    total = exact_sum.decode(res.ints[agg.FINGERPRINT_FIELD], length)
    # N, the rounds' fixed denominator (server/secure_apply.py), and the sites it covers
    n = [int(x) for x in res.ints[agg.TRAIN_CASES_FIELD]]  # one per fold with folds > 1
    secure_apply.set_census(ctx, res.survivors, n if ctx.cfg.folds > 1 else n[0])
    if not np.isfinite(total).all():
        raise FedsegError("fingerprint: the securely summed fingerprint is not finite")
    return total


# ---- training rounds ---------------------------------------------------------------------


def train_layout(ctx: JobContext, rnd: int) -> tuple[int, dict[str, int]]:
    cfg = ctx.cfg
    with_eval = (not cfg.per_site_metrics) and (rnd - 1) % cfg.eval_every == 0
    return (agg.flat_length(shapes(ctx)),
            agg.train_int_fields(eval_classes(ctx) if with_eval else (),
                                 secure_apply.counts_per_round(ctx)))


def case_scale(ctx: JobContext) -> float:
    """Public weight scale s (``aggregates``): mean training cases per site, from the pooled
    fingerprint's case count (a sum), never from one site's count."""
    assert ctx.plan is not None
    n_sites = max(1, len(secure(ctx).config.roster))
    return max(1.0, float(ctx.plan.num_training_cases) / n_sites)


def prepare_share(ctx: JobContext, rnd: int) -> tuple[str, ShareKeysRequest] | None:
    """Share-keys request of round ``rnd`` when its advertisements already arrived."""
    sec = secure(ctx)
    rid = sec.next_train.get(rnd)
    if rid is None or rid not in sec.aggs or not sec.aggs[rid].adverts:
        return None
    try:
        return rid, sec.share_request(rid, train_layout(ctx, rnd))
    except SecAggAbort as err:
        event(ctx, step="share_keys", round_id=rid, status="aborted", reason=str(err))
        sec.drop(rid)
        sec.next_train.pop(rnd, None)
        return None


def train_round(ctx: JobContext, rnd: int, evaluate_first: bool,
                nodes: list[int]) -> dict[str, Any]:
    """The secure version of ``phases.training.train_round`` (same pooled record, plus secagg)."""
    cfg = ctx.cfg
    sec = secure(ctx)
    t0 = time.monotonic()
    pooled: dict[str, Any] = {"phase": "train", "round": rnd, "site": "pooled",
                              "sites_ok": 0, "sites_asked": len(nodes), "secure_aggregation": True}
    need = max(cfg.min_sites, sec.config.threshold)

    def fail(reason: str) -> dict[str, Any]:
        pooled.update(status="too_few_sites", reason=reason, seconds=round(time.monotonic() - t0, 3))
        ctx.run.log(pooled)
        return pooled

    if len(nodes) < need:
        return fail(f"only {len(nodes)} prepared site(s) connected, need {need} "
                    f"(min_sites={cfg.min_sites}, secure-aggregation threshold "
                    f"{sec.config.threshold})")
    layout = train_layout(ctx, rnd)
    names = [ctx.name(n) for n in nodes]
    asked = list(nodes)
    rid = sec.next_train.pop(rnd, None)
    exchanges = 1  # TRAIN; + UNMASK when it went by Flower (unmask())
    setup_failed: dict[int, str] = {}
    if not sec.ready(rid, names, layout):
        sec.drop(rid)
        rid = sec.new_round("train", rnd)
        try:
            done = setup(ctx, rid, nodes, layout, f"train round {rnd}")
        except SecAggAbort as err:
            sec.drop(rid)
            return fail(f"secure-aggregation set-up failed: {err}")
        nodes, setup_failed = done.nodes, done.failed
        exchanges += done.exchanges
    assert rid is not None
    a = sec.aggs[rid]
    assert a.mask_reqs is not None and a.server is not None
    for nid in asked:  # asked for the round, lost in its secure-aggregation set-up
        if ctx.name(nid) not in a.mask_reqs:
            why = setup_failed.get(nid) or a.server.excluded.get(
                ctx.name(nid), "did not complete the secure-aggregation set-up")
            ctx.log(f"round {rnd}: site '{ctx.name(nid)}' dropped: {why}")
            ctx.run.log({"phase": "train", "round": rnd, "site": ctx.name(nid),
                         "status": "dropped", "reason": f"secure-aggregation set-up: {why}"})
    nodes = [n for n in nodes if ctx.name(n) in a.mask_reqs]
    # the next round's keys ride on this one, unless a final evaluation comes between (the last
    # round of a fold model: phases/crossval.py), whose own set-up would end them at the sites
    last_of_model = rnd == cfg.total_rounds or cfg.model_of(rnd + 1)[0] != cfg.model_of(rnd)[0]
    next_rid = None if last_of_model else sec.new_round("train", rnd + 1)
    if next_rid:
        sec.next_train[rnd + 1] = next_rid
    classes = eval_classes(ctx)
    scale = case_scale(ctx)
    priv = ctx.privacy  # differential privacy: fedseg/privacy/dp.py
    dp = pm.DPParams.for_round(priv.config, len(nodes)) if priv is not None else None
    assert ctx.plan is not None
    plan_hash = ctx.plan.hash()

    def content(nid: int):
        req = pm.TrainRequest(
            **train_request_fields(cfg, plan_hash, rnd, evaluate_first),
            secagg=sec.part(mask=a.mask_reqs[ctx.name(nid)],
                            advertise=[next_rid] if next_rid else []),
            max_update_norm=cfg.max_update_norm, case_scale=scale,
            per_site_metrics=cfg.per_site_metrics,
            eval_classes=classes if "eval_cases" in layout[1] else [], dp=dp,
        )
        if ctx.bulk is not None:  # the unmask step can come through the bulk server
            steps[nid] = ctx.bulk.rendezvous()
        return box.content(nid, req, step=steps.get(nid))

    box = ctx.outbox(ctx.state.weights, upload=True)  # the model once for every site
    evals: list[tuple[str, pm.EvalReply]] = []
    steps: dict[int, BulkRendezvous] = {}  # node -> its rendezvous for this round's unmask
    listening: set[int] = set()  # nodes whose reply says they wait on it

    def take(nid: int, r: Message | None) -> None:
        """Fold one masked upload into the running sum as it arrives (then it is dropped)."""
        name = ctx.name(nid)
        rec: dict[str, Any] = {"phase": "train", "round": rnd, "site": name,
                               "bytes_sent": ctx.net.sent_bytes.get(nid, 0)}
        rep, arrays, err = reply_part(nid, r, pm.TrainReply, box)
        if err is None:
            rec["bytes_received"] = payload_bytes(r.content)
            if rep.secagg is None or rep.secagg.masked is None or pm.SECAGG_VECTOR not in arrays:
                err = "no masked update in the reply"
            elif not a.server.add_masked(rep.secagg.masked, _vector(arrays)):
                err = a.server.excluded.get(name, "masked upload refused")
            box.done(nid)
            if err is not None:
                rec.update(status="rejected", reason=err)
                ctx.log(f"round {rnd}: update from '{name}' rejected: {err}")
                ctx.run.log(rec)
                return
            rec.update(status="ok", iterations=rep.iterations, seconds=rep.seconds,
                       it_per_s=rep.iterations_per_s)
            if rep.evaluation is not None:
                evals.append((name, rep.evaluation))
            if rep.secagg.listening:
                listening.add(nid)
            if next_rid:
                sec.take_adverts(next_rid, name, rep.secagg)
        else:
            rejected = r is not None and not r.has_error() and "rejected error" in err
            rec.update(status="rejected" if rejected else "dropped", reason=err)
            ctx.log(f"round {rnd}: site '{name}' {rec['status']}: {err}")
        ctx.run.log(rec)

    try:
        train_exchange(ctx, rnd, nodes, box, content, take, evals)
        ok = len(a.server._peers)
        pooled["sites_ok"] = ok
        if ok < need:
            sec.drop(rid)
            return fail(f"{ok} masked update(s), need {need} (min_sites={cfg.min_sites}, "
                        f"secure-aggregation threshold {sec.config.threshold}); nothing was unmasked")
        guard = secure_apply.retry_guard(ctx, rnd, a.server)
        if guard is not None:  # nothing unmasked; job.py retries (or gives up on) the round
            sec.drop(rid)
            pooled["sites_ok"] = ok
            return secure_apply.refuse(ctx, rnd, pooled, [guard], t0)
        next_share = prepare_share(ctx, rnd + 1) if next_rid else None
        try:
            res, flower_unmask = unmask(ctx, rid, nodes, next_share,
                                        {nid: rv for nid, rv in steps.items() if nid in listening})
        except SecAggAbort as err:
            event(ctx, step="unmask", round_id=rid, status="aborted", reason=str(err))
            return fail(f"unmasking failed: {err}")
        exchanges += flower_unmask
    finally:  # a site still waiting on its rendezvous is told the step is over
        for rv in steps.values():
            ctx.bulk.close_rendezvous(rv.token)  # type: ignore[union-attr]
    if dp is not None:  # the noised sum is out: account it even if it is not applied below
        pooled.update(priv.release(dp.n_sites, len(res.survivors)))
    # weights, plausibility checks, the step or a refusal: server/secure_apply.py
    return secure_apply.finish_round(ctx, rnd, res, layout, pooled, scale, dp, classes, t0,
                                     exchanges)


# ---- final evaluation --------------------------------------------------------------------


def final_evaluation(ctx: JobContext) -> None:
    """Final evaluation into a secure sum (``per_site_metrics = false``)."""
    pe = secure_evaluation(ctx, eval_classes(ctx), ctx.state.weights, **final_eval_fields(ctx))
    if pe is not None:
        log_pooled_eval(ctx, ctx.state.round, pe)


def secure_evaluation(ctx: JobContext, classes: list[str], weights: Any,
                      what: str = "final evaluation", step: str = "final-eval",
                      phase: str = "eval", **fields: Any) -> dict | None:
    """An EVALUATE exchange into a secure sum: ``weights`` to every active site (None: no
    model travels), each site's ``dice_per_class`` over ``classes`` masked; returns the pooled
    case-weighted means (``aggregates.pooled_eval``), None when the sum failed or was
    refused (logged)."""
    sec = secure(ctx)
    assert ctx.plan is not None
    plan_hash = ctx.plan.hash()
    nodes = list(ctx.active_nodes())
    layout = (0, agg.eval_int_fields(classes))
    rid = sec.new_round(step, ctx.state.round)
    try:
        nodes = setup(ctx, rid, nodes, layout, what).nodes
        a = sec.aggs[rid]
        assert a.mask_reqs is not None and a.server is not None
        reqs = a.mask_reqs
        box = ctx.outbox(weights)  # the model once for every site
        try:
            replies = ctx.net.send(nodes, pm.EVALUATE, box.content_for(lambda nid: pm.EvalRequest(
                round=ctx.state.round, plan_hash=plan_hash, per_site_metrics=False,
                eval_classes=classes, secagg=sec.part(mask=reqs[ctx.name(nid)]), **fields,
            )), timeout=ctx.cfg.round_timeout_s)
        finally:
            box.close()
        for nid in nodes:
            rep, arrays, err = reply_part(nid, replies.get(nid), pm.EvalReply)
            if err is None and (rep.secagg is None or rep.secagg.masked is None
                                or not a.server.add_masked(rep.secagg.masked,
                                                           arrays.get(pm.SECAGG_VECTOR, np.zeros(0)))):
                err = a.server.excluded.get(ctx.name(nid), "no masked evaluation")
            if err is not None:
                ctx.run.log({"phase": phase, "round": ctx.state.round, "site": ctx.name(nid),
                             "status": "dropped", "reason": err})
        res, _ = unmask(ctx, rid, nodes)
    except SecAggAbort as err:
        event(ctx, step=step, round_id=rid, status="aborted", reason=str(err))
        sec.drop(rid)
        return None
    problems = pl.check_sums(res.ints, res.num_clipped, len(res.survivors), 0,
                             pl.robust_config(ctx.cfg))
    if problems:  # a replayed or forged evaluation upload: no pooled evaluation is made of it
        event(ctx, step=step, round_id=rid, status="refused", reason="; ".join(problems))
        return None
    return agg.pooled_eval(res.ints, classes)
