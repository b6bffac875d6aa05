"""Server side of secure aggregation in the federated job: fingerprint sum, training rounds,
final evaluation — the server only ever unmasks SUMS over at least t sites.

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
BulkRendezvous) when the job moves arrays over HTTP (``bulk_transport = "http"``, the default)
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

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message

from fedseg.errors import FedsegError
from fedseg.privacy import aggregates as agg
from fedseg.privacy import exact_sum
from fedseg.privacy.buffers import BufferPool
from fedseg.privacy.keys import SecAggAbort
from fedseg.privacy.secagg import (
    AggregateResult,
    KeyAdvertisement,
    MaskRequest,
    SecAggConfig,
    SecAggServer,
    ShareKeysReply,
    ShareKeysRequest,
)
from fedseg.protocol import messages as pm
from fedseg.protocol.bulk import BulkRendezvous
from fedseg.protocol.records import pack, payload_bytes, unpack
from fedseg.server import secure_apply
from fedseg.server.config import train_request_fields

if TYPE_CHECKING:
    from fedseg.server.job import FederatedJob
    from fedseg.server.outbox import Outbox

SETUP_TIMEOUT_S = 600.0
FAST_STEP_WAIT_S = 20.0  # rendezvous answers are awaited this long, then sent by Flower instead


@dataclass
class _Agg:
    rid: str
    adverts: dict[str, KeyAdvertisement] = field(default_factory=dict)
    server: SecAggServer | None = None
    share_req: ShareKeysRequest | None = None
    mask_reqs: dict[str, MaskRequest] | None = None
    layout: tuple[int, dict[str, int]] | None = None


class SecureAggregation:
    """Protocol state of the job's aggregations at the server (no Flower inside)."""

    def __init__(self, roster_path: str, threshold: int | None, clip: float, job_id: str,
                 run_id: int) -> None:
        from fedseg.privacy.provision import load_roster

        roster = load_roster(roster_path)
        n = len(roster.sites)
        t = threshold if threshold is not None else n // 2 + 1
        try:
            self.config = SecAggConfig(
                roster={k: v.public_key_pem for k, v in roster.sites.items()}, threshold=t, clip=clip
            )
        except ValueError as err:
            raise FedsegError(f"secure aggregation: {' '.join(str(err).split())[:300]}") from None
        self.params = pm.SecAggParams(job_id=job_id, run_id=int(run_id), threshold=t, clip=clip)
        self._job = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:80] or "job"
        self._attempt = 0
        self.aggs: dict[str, _Agg] = {}
        self.next_train: dict[int, str] = {}  # round -> round id advertised in advance
        self.pool = BufferPool(keep=2)  # the running sums' buffers, reused round after round

    # ---- bookkeeping
    def new_round(self, kind: str, rnd: int) -> str:
        self._attempt += 1
        rid = f"{self.params.run_id}/{self._job}/{kind}{rnd}/{self._attempt}"
        self.aggs[rid] = _Agg(rid)
        return rid

    def part(self, **kw: Any) -> pm.SecAggPart:
        return pm.SecAggPart(params=self.params, **kw)

    def take_adverts(self, rid: str, site: str, reply: pm.SecAggReplyPart | None) -> None:
        a = self.aggs.get(rid)
        if a is None or reply is None:
            return
        for adv in reply.advertisements:
            if adv.round_id == rid and adv.site == site and a.server is None:
                a.adverts[site] = adv

    def share_request(self, rid: str, layout: tuple[int, dict[str, int]]) -> ShareKeysRequest:
        """Verify the advertisements (signatures against the roster) → the key list to share."""
        a = self.aggs[rid]
        if a.share_req is None:
            a.layout = layout
            a.server = SecAggServer(self.config, rid, layout[0], layout[1], pool=self.pool)
            a.share_req = a.server.advertisements(a.adverts[s] for s in sorted(a.adverts))
        return a.share_req

    def take_share_replies(self, rid: str, replies: list[ShareKeysReply]) -> dict[str, MaskRequest]:
        a = self.aggs[rid]
        assert a.server is not None
        a.mask_reqs = a.server.relay_shares(replies)
        return a.mask_reqs

    def ready(self, rid: str | None, sites: list[str], layout: tuple[int, dict[str, int]]) -> bool:
        a = self.aggs.get(rid or "")
        return (a is not None and a.mask_reqs is not None and a.layout == layout
                and set(sites) <= set(a.mask_reqs))

    def drop(self, rid: str | None) -> None:
        self.aggs.pop(rid or "", None)


# --------------------------------------------------------------------------- job phases


def _reply_part(job: FederatedJob, nid: int, r: Message | None, model: type,
                box: Outbox | None = None) -> tuple[Any, Any, str | None]:
    err = job._reply_error(r)
    if err is not None:
        return None, {}, err
    try:
        rep, arrays = (box.unpack(nid, r, model) if box is not None  # type: ignore[arg-type]
                       else unpack(r.content, model))  # type: ignore[union-attr]
    except pm.ProtocolError as perr:
        return None, {}, str(perr)
    return rep, arrays, None


def _vector(arrays: Any) -> Any:
    """The masked vector of a reply: read block by block from the spool file when it came as a
    bulk upload (``SpooledArrays.lazy``), else the array itself."""
    return arrays.lazy(pm.SECAGG_VECTOR) if hasattr(arrays, "lazy") else arrays[pm.SECAGG_VECTOR]


def _event(job: FederatedJob, **rec: Any) -> None:
    job.run.log({"phase": "secagg", **rec})


def setup(job: FederatedJob, rid: str, nodes: list[int], layout: tuple[int, dict[str, int]],
          what: str) -> list[int]:
    """Advertise (for nodes without an advertisement) and share keys; returns the nodes that
    have a mask request for ``rid``. Raises SecAggAbort with fewer than t sites."""
    sec: SecureAggregation = job.secure
    a = sec.aggs[rid]
    failed: dict[int, str] = {}
    job._secagg_setup_failed = failed  # node -> why it is not in the aggregation
    missing = [n for n in nodes if job._name(n) not in a.adverts]
    if missing:
        req = pm.SecAggStepRequest(secagg=sec.part(advertise=[rid]))
        replies = job._send(missing, pm.SHARE_KEYS, lambda _: pack(req), timeout=SETUP_TIMEOUT_S)
        for nid in missing:
            rep, _, err = _reply_part(job, nid, replies.get(nid), pm.SecAggStepReply)
            if err is not None:
                _event(job, step="advertise", round_id=rid, what=what, site=job._name(nid),
                       status="dropped", reason=err)
                failed[nid] = err
                continue
            sec.take_adverts(rid, job._name(nid), rep.secagg)
    share_req = sec.share_request(rid, layout)
    listed = {adv.site for adv in share_req.advertisements}
    asked = [n for n in nodes if job._name(n) in listed]
    req = pm.SecAggStepRequest(secagg=sec.part(share_keys=share_req))
    replies = job._send(asked, pm.SHARE_KEYS, lambda _: pack(req), timeout=SETUP_TIMEOUT_S)
    got = []
    for nid in asked:
        rep, _, err = _reply_part(job, nid, replies.get(nid), pm.SecAggStepReply)
        if err is not None or rep.secagg.share_keys is None:
            _event(job, step="share_keys", round_id=rid, what=what, site=job._name(nid),
                   status="dropped", reason=err or "no share-keys reply")
            failed[nid] = err or "no share-keys reply"
            continue
        got.append(rep.secagg.share_keys)
    mask_reqs = sec.take_share_replies(rid, got)
    a = sec.aggs[rid]
    job._secagg_setup_exchanges = 2 if missing else 1
    _event(job, step="setup", round_id=rid, what=what, sites=sorted(mask_reqs),
           excluded=dict(a.server.excluded) if a.server else {},
           exchanges=job._secagg_setup_exchanges)
    return [n for n in nodes if job._name(n) in mask_reqs]


def unmask(job: FederatedJob, rid: str, nodes: list[int],
           next_share: tuple[str, ShareKeysRequest] | None = None,
           steps: dict[int, BulkRendezvous] | None = None) -> AggregateResult:
    """The UNMASK step (carrying the next aggregation's share keys); returns the sums.

    ``steps``: the sites that listen on a bulk rendezvous for it (their TRAIN reply said so):
    they get the request there and answer within ``FAST_STEP_WAIT_S`` (no Flower exchange; why:
    ``fedseg/protocol/bulk.py``, BulkRendezvous). The others, and a listener that did not answer
    in time (its worker restarted, say), get it as a Flower message — the same request, which a
    site answers identically however often it comes. ``job._secagg_unmask_exchanges`` says
    whether a Flower exchange was needed (0 or 1)."""
    sec: SecureAggregation = job.secure
    a = sec.aggs[rid]
    assert a.server is not None
    ureq = a.server.unmask_request()
    survivors = set(ureq.survivors)
    sharers = {x.site for x in next_share[1].advertisements} if next_share else set()
    targets = [n for n in nodes if job._name(n) in survivors or job._name(n) in sharers]

    def request(nid: int) -> pm.SecAggStepRequest:
        name = job._name(nid)
        return pm.SecAggStepRequest(secagg=sec.part(
            unmask=ureq if name in survivors else None,
            share_keys=next_share[1] if next_share and name in sharers else None))

    answered: dict[int, tuple[pm.SecAggStepReply | None, str | None]] = {}
    fast = {nid: rv for nid, rv in (steps or {}).items() if nid in targets}
    if fast and job.bulk is not None:
        posted = {nid: rv for nid, rv in fast.items()
                  if job.bulk.post(rv.token, request(nid).model_dump_json().encode())}
        got = job.bulk.answers([rv.token for rv in posted.values()], FAST_STEP_WAIT_S)
        for nid, rv in posted.items():
            if rv.token in got:
                answered[nid] = _step_answer(got[rv.token])
    rest = [n for n in targets if n not in answered]
    job._secagg_unmask_exchanges = 1 if rest else 0
    if rest:
        replies = job._send(rest, pm.UNMASK, lambda nid: pack(request(nid)),
                            timeout=SETUP_TIMEOUT_S)
        for nid in rest:
            rep, _, err = _reply_part(job, nid, replies.get(nid), pm.SecAggStepReply)
            answered[nid] = (rep, err)
    unmask_replies, share_replies = [], []
    for nid in targets:
        rep, err = answered[nid]
        name = job._name(nid)
        if err is None and any(x is not None and x.site != name for x in (
                rep.secagg.unmask, rep.secagg.share_keys)):
            err = "answered in another site's name"
        if err is not None:
            _event(job, step="unmask", round_id=rid, site=name, status="dropped", reason=err)
            continue
        if rep.secagg.unmask is not None:
            unmask_replies.append(rep.secagg.unmask)
        if rep.secagg.share_keys is not None:
            share_replies.append(rep.secagg.share_keys)
    if next_share is not None:
        try:
            sec.take_share_replies(next_share[0], share_replies)
        except SecAggAbort as err:
            _event(job, step="share_keys", round_id=next_share[0], status="aborted", reason=str(err))
            sec.drop(next_share[0])
    try:
        res = a.server.unmask(unmask_replies)
    finally:
        sec.drop(rid)
    _event(job, step="unmask", round_id=rid, status="ok", survivors=res.survivors,
           dropped=res.dropped, recovered=bool(res.dropped), excluded=res.excluded,
           num_clipped=res.num_clipped, via_rendezvous=len(targets) - len(rest),
           via_flower=len(rest))
    return res


def _step_answer(body: bytes) -> tuple[pm.SecAggStepReply | None, str | None]:
    """(reply, None) or (None, why) from a rendezvous answer (``pm.StepAnswer`` JSON)."""
    try:
        ans = pm.StepAnswer.model_validate_json(body)
    except ValueError as err:
        return None, f"its step answer does not validate: {' '.join(str(err).split())[:300]}"
    if ans.error is not None:
        return None, f"{ans.error.kind} error at the site: {ans.error.message}"
    return ans.reply, None


# ---- fingerprint -------------------------------------------------------------------------


def fingerprint_sum(job: FederatedJob, rid: str, length: int, next_rid: str) -> np.ndarray:
    """The exact sum of every enrolled site's fingerprint vector; all sites must take part."""
    nodes = list(job.sites)
    layout = (0, {agg.FINGERPRINT_FIELD: exact_sum.encoded_length(length),
                  agg.TRAIN_CASES_FIELD: 1, agg.SITES_FIELD: 1})
    try:
        ready = setup(job, rid, nodes, layout, "fingerprint")
        if len(ready) != len(nodes):
            raise SecAggAbort(f"only {len(ready)} of {len(nodes)} sites set up the secure sum")
        sec: SecureAggregation = job.secure
        reqs = sec.aggs[rid].mask_reqs
        assert reqs is not None
        replies = job._send(nodes, pm.FINGERPRINT, lambda nid: pack(pm.FingerprintRequest(
            secagg=sec.part(mask=reqs[job._name(nid)], advertise=[next_rid]))), timeout=3600)
        server = sec.aggs[rid].server
        assert server is not None
        for nid in nodes:
            rep, arrays, err = _reply_part(job, nid, replies.get(nid), pm.FingerprintReply)
            if err is None and (rep.secagg is None or rep.secagg.masked is None
                                or pm.SECAGG_VECTOR not in arrays):
                err = "no masked fingerprint in the reply"
            if err is None and not server.add_masked(rep.secagg.masked, arrays[pm.SECAGG_VECTOR]):
                err = server.excluded.get(job._name(nid), "masked upload refused")
            if err is not None:
                raise FedsegError(f"fingerprint: site '{job._name(nid)}' failed: {err}")
            sec.take_adverts(next_rid, job._name(nid), rep.secagg)
        res = unmask(job, rid, nodes)
    except SecAggAbort as err:
        raise FedsegError(f"fingerprint: secure aggregation failed: {err}") from None
    if int(res.ints[agg.SITES_FIELD][0]) != len(res.survivors):  # server/plausibility.py
        raise FedsegError("fingerprint: the secure sum's canary does not match the sites; some "
                          "upload was not masked for this sum (a replayed or forged vector)")
    total = exact_sum.decode(res.ints[agg.FINGERPRINT_FIELD], length)
    # N, the rounds' fixed denominator (server/secure_apply.py), and the sites it covers
    secure_apply.set_census(job, res.survivors, int(res.ints[agg.TRAIN_CASES_FIELD][0]))
    if not np.isfinite(total).all():
        raise FedsegError("fingerprint: the securely summed fingerprint is not finite")
    return total


# ---- training rounds ---------------------------------------------------------------------


def shapes(job: FederatedJob) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in job.state.weights.items()}


def eval_classes(job: FederatedJob) -> list[str]:
    from fedseg.training.evaluate import label_groups

    assert job.plan is not None
    return sorted(label_groups(job.plan.labels))


def train_layout(job: FederatedJob, rnd: int) -> tuple[int, dict[str, int]]:
    cfg = job.cfg
    with_eval = (not cfg.per_site_metrics) and (rnd - 1) % cfg.eval_every == 0
    from fedseg.server.secure_apply import counts_per_round

    return (agg.flat_length(shapes(job)),
            agg.train_int_fields(eval_classes(job) if with_eval else (), counts_per_round(job)))


def case_scale(job: FederatedJob) -> float:
    """Public weight scale s (``aggregates``): mean training cases per site, from the pooled
    fingerprint's case count (a sum), never from one site's count."""
    assert job.plan is not None
    n_sites = max(1, len(job.secure.config.roster))
    return max(1.0, float(job.plan.num_training_cases) / n_sites)


def prepare_share(job: FederatedJob, rnd: int) -> tuple[str, ShareKeysRequest] | None:
    """Share-keys request of round ``rnd`` when its advertisements already arrived."""
    sec: SecureAggregation = job.secure
    rid = sec.next_train.get(rnd)
    if rid is None or rid not in sec.aggs or not sec.aggs[rid].adverts:
        return None
    try:
        return rid, sec.share_request(rid, train_layout(job, rnd))
    except SecAggAbort as err:
        _event(job, step="share_keys", round_id=rid, status="aborted", reason=str(err))
        sec.drop(rid)
        sec.next_train.pop(rnd, None)
        return None


def train_round(job: FederatedJob, rnd: int, evaluate_first: bool, nodes: list[int]) -> dict[str, Any]:
    """The secure version of ``FederatedJob.train_round`` (same pooled record, plus secagg)."""
    cfg = job.cfg
    sec: SecureAggregation = job.secure
    t0 = time.monotonic()
    pooled: dict[str, Any] = {"phase": "train", "round": rnd, "site": "pooled",
                              "sites_ok": 0, "sites_asked": len(nodes), "secure_aggregation": True}
    need = max(cfg.min_sites, sec.config.threshold)

    def fail(reason: str) -> dict[str, Any]:
        pooled.update(status="too_few_sites", reason=reason, seconds=round(time.monotonic() - t0, 3))
        job.run.log(pooled)
        return pooled

    if len(nodes) < need:
        return fail(f"only {len(nodes)} prepared site(s) connected, need {need} "
                    f"(min_sites={cfg.min_sites}, secure-aggregation threshold "
                    f"{sec.config.threshold})")
    layout = train_layout(job, rnd)
    names = [job._name(n) for n in nodes]
    asked = list(nodes)
    rid = sec.next_train.pop(rnd, None)
    exchanges = 1  # TRAIN; + UNMASK when it went by Flower (unmask())
    if not sec.ready(rid, names, layout):
        sec.drop(rid)
        rid = sec.new_round("train", rnd)
        try:
            nodes = setup(job, rid, nodes, layout, f"train round {rnd}")
        except SecAggAbort as err:
            sec.drop(rid)
            return fail(f"secure-aggregation set-up failed: {err}")
        exchanges += job._secagg_setup_exchanges
    a = sec.aggs[rid]
    assert a.mask_reqs is not None and a.server is not None
    for nid in asked:  # asked for the round, lost in its secure-aggregation set-up
        if job._name(nid) not in a.mask_reqs:
            why = getattr(job, "_secagg_setup_failed", {}).get(nid) or a.server.excluded.get(
                job._name(nid), "did not complete the secure-aggregation set-up")
            job.log(f"round {rnd}: site '{job._name(nid)}' dropped: {why}")
            job.run.log({"phase": "train", "round": rnd, "site": job._name(nid),
                         "status": "dropped", "reason": f"secure-aggregation set-up: {why}"})
    nodes = [n for n in nodes if job._name(n) in a.mask_reqs]
    next_rid = sec.new_round("train", rnd + 1) if rnd < cfg.rounds else None
    if next_rid:
        sec.next_train[rnd + 1] = next_rid
    classes = eval_classes(job)
    scale = case_scale(job)
    priv = getattr(job, "privacy", None)  # differential privacy: fedseg/privacy/dp.py
    dp = pm.DPParams.for_round(priv.config, len(nodes)) if priv is not None else None

    def content(nid: int):
        req = pm.TrainRequest(
            **train_request_fields(cfg, job.plan.hash(), rnd, evaluate_first),
            secagg=sec.part(mask=a.mask_reqs[job._name(nid)],
                            advertise=[next_rid] if next_rid else []),
            max_update_norm=cfg.max_update_norm, case_scale=scale,
            per_site_metrics=cfg.per_site_metrics,
            eval_classes=classes if "eval_cases" in layout[1] else [], dp=dp,
        )
        if job.bulk is not None:  # the unmask step can come through the bulk server
            steps[nid] = job.bulk.rendezvous()
        return box.content(nid, req, step=steps.get(nid))

    box = job.outbox(job.state.weights, upload=True)  # the model once for every site
    evals: list[tuple[str, pm.EvalReply]] = []
    steps: dict[int, BulkRendezvous] = {}  # node -> its rendezvous for this round's unmask
    listening: set[int] = set()  # nodes whose reply says they wait on it

    def take(nid: int, r: Message | None) -> None:
        """Fold one masked upload into the running sum as it arrives (then it is dropped)."""
        name = job._name(nid)
        rec: dict[str, Any] = {"phase": "train", "round": rnd, "site": name,
                               "bytes_sent": job._sent_bytes.get(nid, 0)}
        rep, arrays, err = _reply_part(job, nid, r, pm.TrainReply, box)
        if err is None:
            rec["bytes_received"] = payload_bytes(r.content)
            if rep.secagg is None or rep.secagg.masked is None or pm.SECAGG_VECTOR not in arrays:
                err = "no masked update in the reply"
            elif not a.server.add_masked(rep.secagg.masked, _vector(arrays)):
                err = a.server.excluded.get(name, "masked upload refused")
            box.done(nid)
            if err is not None:
                rec.update(status="rejected", reason=err)
                job.log(f"round {rnd}: update from '{name}' rejected: {err}")
                job.run.log(rec)
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
            job.log(f"round {rnd}: site '{name}' {rec['status']}: {err}")
        job.run.log(rec)

    try:
        job._train_exchange(rnd, nodes, box, content, take, evals)
        ok = len(a.server._peers)
        pooled["sites_ok"] = ok
        if ok < need:
            sec.drop(rid)
            return fail(f"{ok} masked update(s), need {need} (min_sites={cfg.min_sites}, "
                        f"secure-aggregation threshold {sec.config.threshold}); nothing was unmasked")
        guard = secure_apply.retry_guard(job, rnd, a.server)
        if guard is not None:  # nothing unmasked; job.py retries (or gives up on) the round
            sec.drop(rid)
            pooled["sites_ok"] = ok
            return secure_apply.refuse(job, rnd, pooled, [guard], t0)
        next_share = prepare_share(job, rnd + 1) if next_rid else None
        try:
            res = unmask(job, rid, nodes, next_share,
                         {nid: rv for nid, rv in steps.items() if nid in listening})
        except SecAggAbort as err:
            _event(job, step="unmask", round_id=rid, status="aborted", reason=str(err))
            return fail(f"unmasking failed: {err}")
        exchanges += job._secagg_unmask_exchanges
    finally:  # a site still waiting on its rendezvous is told the step is over
        for rv in steps.values():
            job.bulk.close_rendezvous(rv.token)  # type: ignore[union-attr]
    if dp is not None:  # the noised sum is out: account it even if it is not applied below
        pooled.update(priv.release(dp.n_sites, len(res.survivors)))
    # weights, plausibility checks, the step or a refusal: server/secure_apply.py
    return secure_apply.finish_round(job, rnd, res, layout, pooled, scale, dp, classes, t0,
                                     exchanges)


def log_pooled_eval(job: FederatedJob, after_round: int, pe: dict) -> float:
    """Pooled-only evaluation record (``per_site_metrics = false``)."""
    return job.record_pooled_eval(after_round, pe["cases"], pe["dice"], pe["hd95"],
                                  secure_aggregation=True)


def final_evaluation(job: FederatedJob) -> None:
    """Final evaluation into a secure sum (``per_site_metrics = false``)."""
    sec: SecureAggregation = job.secure
    nodes = list(job.active_nodes())
    classes = eval_classes(job)
    layout = (0, agg.eval_int_fields(classes))
    rid = sec.new_round("final-eval", job.state.round)
    try:
        nodes = setup(job, rid, nodes, layout, "final evaluation")
        a = sec.aggs[rid]
        assert a.mask_reqs is not None and a.server is not None
        box = job.outbox(job.state.weights)  # the model once for every site
        try:
            replies = job._send(nodes, pm.EVALUATE, box.content_for(lambda nid: pm.EvalRequest(
                round=job.state.round, plan_hash=job.plan.hash(), per_site_metrics=False,
                eval_classes=classes, secagg=sec.part(mask=a.mask_reqs[job._name(nid)]),
            )), timeout=job.cfg.round_timeout_s)
        finally:
            box.close()
        for nid in nodes:
            rep, arrays, err = _reply_part(job, nid, replies.get(nid), pm.EvalReply)
            if err is None and (rep.secagg is None or rep.secagg.masked is None
                                or not a.server.add_masked(rep.secagg.masked,
                                                           arrays.get(pm.SECAGG_VECTOR, np.zeros(0)))):
                err = a.server.excluded.get(job._name(nid), "no masked evaluation")
            if err is not None:
                job.run.log({"phase": "eval", "round": job.state.round, "site": job._name(nid),
                             "status": "dropped", "reason": err})
        res = unmask(job, rid, nodes)
    except SecAggAbort as err:
        _event(job, step="final-eval", round_id=rid, status="aborted", reason=str(err))
        sec.drop(rid)
        return
    from fedseg.server import plausibility as pl

    problems = pl.check_sums(res.ints, res.num_clipped, len(res.survivors), 0,
                             pl.robust_config(job.cfg))
    if problems:  # a replayed or forged evaluation upload: no pooled evaluation is made of it
        _event(job, step="final-eval", round_id=rid, status="refused", reason="; ".join(problems))
        return
    pe = agg.pooled_eval(res.ints, classes)
    if pe is not None:
        log_pooled_eval(job, job.state.round, pe)
