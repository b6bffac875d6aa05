"""The federated job, phase by phase, as the ServerApp runs it.

enrolment → federated fingerprint → plan → sites preprocess → R rounds (train k iterations,
aggregate deltas, evaluate the global model every E rounds) → final evaluation and model bundle.

Why hand-written instead of a Flower strategy's ``start()``: the job has phases a strategy does
not know (fingerprint, plan, preprocessing), the sites send DELTAS whose weighted SUM is all the
server may see once secure aggregation is on, and the run must be resumable from our own
checkpoint (Flower has no resume). Flower's ``Grid`` still does all the messaging.

Round trips dominate wall time in Flower 1.42 (~6 s each, even empty), so evaluation of the
global model is folded into the next round's training message (the site evaluates the weights
it receives before training on them); only the final evaluation is a message of its own.

Secure aggregation (``cfg.secure_aggregation``, on by default): the fingerprint and every
round's update are summed with SecAgg, the server unmasking only sums over at least t sites;
the phases hand over to :mod:`fedseg.server.secure_rounds` (message flow and the one extra
exchange per round there), and the sites keep their case counts and training losses to
themselves (they are only in the secure sums). Updates are then validated at the sites.

Faults. Before every round the membership is refreshed: vanished nodes are forgotten, new ones
(a site restarted: a new node id) are enrolled and prepared, and replace the old entry of the
same site name. A site that dies mid-round is reported by Flower as a NODE_UNAVAILABLE error
reply within about a minute (two missed heartbeats); ``round_timeout_s`` bounds a site that
hangs. Such sites are logged ``dropped``, updates that fail :func:`check_update` (NaN, shape,
norm) ``rejected``, each with the reason; the round counts when at least ``min_sites`` good
updates arrived, else ``on_too_few_sites`` decides (wait ``site_wait_s`` for sites and retry,
skip, or fail). A crashed server resumes from the last checkpoint (``run_job`` with ``resume``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedseg.data.dataset_json import DatasetJson
from fedseg.errors import FedsegError
from fedseg.planning.plan import Plan, with_configuration
from fedseg.privacy.dp import JobAccountant
from fedseg.privacy.keys import SecAggAbort
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, payload_bytes, unpack
from fedseg.server.aggregate import (
    RunningMean,
    ServerOptimizer,
    State,
    UpdateRejected,
    check_update,
)
from fedseg.server.bulk_server import BulkServer
from fedseg.server.config import JobConfig, train_request_fields
from fedseg.server.outbox import Outbox, model_bytes, strip_prefix
from fedseg.server.plausibility import robust_config
from fedseg.server.replies import PullFailed, pull_ready
from fedseg.server.rundir import RunDir, memory_mb, snapshot_name
from fedseg.server.secure_rounds import SecureAggregation
from fedseg.server.site_binding import check_claims

Log = Callable[[str], None]

POLL_S = 0.25  # how often the server asks the SuperLink for replies (Flower's own loop: 3 s)
MAX_PULL_FAILURES = 120  # consecutive failed pulls (about a minute) before the job gives up

_FLOWER_ERRORS = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int)}


@dataclass
class Site:
    node_id: int
    info: pm.EnrolReply
    prepared_for: str = ""  # plan hash the site has preprocessed for


@dataclass
class JobState:
    round: int = 0  # rounds completed
    weights: State = field(default_factory=dict)
    best_dice: float = -1.0


class FederatedJob:
    def __init__(self, grid: Grid, cfg: JobConfig, log: Log = print, run_id: int = 0) -> None:
        self.grid = grid
        self.run_id = int(run_id)  # Flower's: secure-aggregation round ids start with it
        self.secure: SecureAggregation | None = None  # set by run_job when it is on
        self._enrol_round = ""  # secure aggregation: round id the enrolment advertises
        self.cfg = cfg
        self.log = log
        self.run = RunDir(cfg.run_dir)
        self.sites: dict[int, Site] = {}
        self.refused: set[int] = set()  # node ids not asked again (a fixed site gets a new id)
        self._restored_plan_hash = ""
        self.plan: Plan | None = None
        self.state = JobState()
        self.opt = ServerOptimizer(cfg.aggregation)
        self._checkpoint_thread: threading.Thread | None = None
        self._checkpoint_error: Exception | None = None
        self.privacy: JobAccountant | None = None  # differential privacy (cfg.dp), by run_job
        self.bulk: BulkServer | None = None  # bulk arrays over HTTP (cfg.bulk_transport), by run_job

    def outbox(self, arrays: State | None, upload: bool = False) -> Outbox:
        """Outgoing model / incoming updates for one exchange (``server/outbox.py``); an upload
        slot takes at most the model's size (+1 MB of slack for small extra arrays)."""
        up = model_bytes(self.state.weights) + (1 << 20) if upload else None
        return Outbox(self.bulk, arrays, up)

    # ------------------------------------------------------------------ messaging helpers
    def _send(
        self, node_ids: Iterable[int], mtype: str, content_for: Callable[[int], Any],
        timeout: float,
    ) -> dict[int, Message]:
        """Send one message per node; the replies that came before ``timeout``, by node id."""
        out: dict[int, Message] = {}

        def keep(nid: int, reply: Message) -> None:
            out[nid] = reply

        self._exchange(node_ids, mtype, content_for, timeout, keep)
        return out

    def _exchange(
        self, node_ids: Iterable[int], mtype: str, content_for: Callable[[int], Any],
        timeout: float, on_reply: Callable[[int, Message], None],
        after_push: Callable[[], None] | None = None,
    ) -> set[int]:
        """Send one message per node and hand each reply to ``on_reply`` AS IT ARRIVES; returns
        the node ids that replied before ``timeout``.

        Why not ``grid.send_and_receive``: it sleeps 3 s between polls, inflates every ready
        reply at once and fails the job on one SuperLink error. Here the SuperLink is asked every
        ``POLL_S`` (one call for all pending replies) and the ready replies are fetched one at a
        time (``server/replies.py``), so a round ends a fraction of a second after its last site,
        and the server holds at most ONE site's update in memory at a time (callers fold it into
        a running sum and drop it): the server's peak RAM does not grow with the number of sites.
        """
        msgs = []
        sent_bytes: dict[int, int] = {}
        node_ids = list(node_ids)
        for nid in node_ids:
            content = content_for(nid)
            sent_bytes[nid] = payload_bytes(content)
            # TTL a little past the timeout: an instruction nobody picked up in time expires at
            # the SuperLink instead of being run by a site that reconnects hours later
            msgs.append(Message(content=content, dst_node_id=nid, message_type=mtype,
                                ttl=timeout + 60.0))
        self._sent_bytes = sent_bytes
        ids = list(self.grid.push_messages(msgs))
        del msgs
        if after_push is not None:
            after_push()
        # Match replies to nodes by the instruction they answer: the error reply the SuperLink
        # makes for a dead node (NODE_UNAVAILABLE) comes FROM the SuperLink, not from the node.
        pending = {mid: nid for mid, nid in zip(ids, node_ids, strict=True) if mid}
        replied: set[int] = set()
        deadline = time.monotonic() + timeout
        failures = 0
        while pending and time.monotonic() < deadline:
            got = False
            try:
                for reply in pull_ready(self.grid, list(pending)):
                    nid = pending.pop(reply.metadata.reply_to_message_id, None)
                    if nid is None:
                        continue
                    got = True
                    replied.add(nid)
                    on_reply(nid, reply)
                    del reply
                failures = 0
            except PullFailed as err:  # e.g. SQLite "database is locked" under load: retry
                failures += 1
                if failures >= MAX_PULL_FAILURES:
                    raise FedsegError(f"{mtype}: the SuperLink failed {failures} pulls in a row; "
                                      f"last: {err}") from None
                self.log(f"{mtype}: {err} (retrying)")
            if pending and not got:
                time.sleep(POLL_S)
        return replied

    def _name(self, nid: int) -> str:
        s = self.sites.get(nid)
        return s.info.site if s else f"node-{nid}"

    def _reply_error(self, reply: Message | None) -> str | None:
        if reply is None:
            return "no reply before the timeout"
        if reply.has_error():
            code = _FLOWER_ERRORS.get(reply.error.code, str(reply.error.code))
            return f"Flower error {code}: {reply.error.reason}"
        if "error" in reply.content.config_records:
            err, _ = unpack_error(reply)
            return f"{err.kind} error at the site: {err.message}"
        return None

    # ------------------------------------------------------------------ phases
    def wait_for_nodes(self, minimum: int, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= minimum:
                return nodes
            if time.monotonic() > deadline:
                raise FedsegError(
                    f"only {len(nodes)} of min-sites={minimum} sites connected within "
                    f"{timeout:.0f} s; start more sites or lower min_sites"
                )
            self.run.set_status(phase="enrolment", connected=len(nodes))
            time.sleep(1.0)

    def enrol(self, node_ids: list[int]) -> list[int]:
        """Ask nodes who they are; refuse the ones that fail or do not fit; returns the new ones.

        Before the plan exists every site must agree on channels/labels (else the job fails: no
        majority rule). Once a plan exists (later rounds, resume), a site that does not match it
        is refused alone. A node with the name of an enrolled site replaces it: a restarted
        SuperNode registers with a new node id while the old id can look online for up to a
        minute (Flower's heartbeat)."""
        sec = self.secure
        req = pm.EnrolRequest(
            hide_case_counts=sec is not None,
            secagg=sec.part(advertise=[self._enrol_round]) if sec and self._enrol_round else None,
        )
        replies = self._send(node_ids, pm.ENROL, lambda _: pack(req), timeout=300)
        new: list[int] = []
        for nid in node_ids:
            r = replies.get(nid)
            err = self._reply_error(r)
            if err is None:
                try:
                    info, _ = unpack(r.content, pm.EnrolReply)
                except pm.ProtocolError as perr:
                    err = str(perr)
            if err is None and self.plan is not None:
                err = self._mismatch(info)
            if err is None:  # the site is the one the node's key says (server/site_binding.py)
                err = check_claims(self, {nid: info.site}).get(nid)
            if err is None and any(self.sites[n].info.site == info.site for n in new):
                err = f"site name '{info.site}' is already used by another node"
            if err is None and sec is not None and info.site not in sec.config.roster:
                err = (f"site '{info.site}' is not in the consortium roster; secure aggregation "
                       "needs every site's identity key")
            if err is not None:
                self.log(f"enrolment: node {nid} refused: {err}")
                self.run.log({"phase": "enrol", "node": nid, "status": "refused", "reason": err,
                              "round": self.state.round + 1})
                self.refused.add(nid)
                continue
            for old, s in list(self.sites.items()):
                if s.info.site == info.site:
                    self.log(f"site '{info.site}' reconnected as node {nid} (was node {old})")
                    self.sites.pop(old)
            self.sites[nid] = Site(nid, info)
            new.append(nid)
            if sec is not None and self._enrol_round:
                sec.take_adverts(self._enrol_round, info.site, info.secagg)
            self.run.log({"phase": "enrol", "site": info.site, "node": nid, "status": "ok",
                          "cases": info.num_training_cases, "gpu_memory_gb": info.gpu_memory_gb,
                          "device": info.device, "round": self.state.round + 1})
        self._check_consistent()
        return new

    def _mismatch(self, info: pm.EnrolReply) -> str | None:
        assert self.plan is not None
        if info.channel_names != self.plan.channel_names:
            return (f"declares channels {info.channel_names}, but the plan has "
                    f"{self.plan.channel_names}")
        if info.labels != self.plan.labels:
            return f"declares labels {info.labels}, but the plan has {self.plan.labels}"
        return None

    def _check_consistent(self) -> None:
        sites = list(self.sites.values())
        if not sites:
            return
        ref = self.plan.channel_names if self.plan else sites[0].info.channel_names
        ref_labels = self.plan.labels if self.plan else sites[0].info.labels
        ref_name = "the plan" if self.plan else sites[0].info.site
        for s in sites:
            if s.info.channel_names != ref:
                raise FedsegError(
                    f"site '{s.info.site}' declares channels {s.info.channel_names}, but "
                    f"{ref_name} has {ref}; every site's dataset.json must declare the same channels"
                )
            if s.info.labels != ref_labels:
                raise FedsegError(
                    f"site '{s.info.site}' declares labels {s.info.labels}, but {ref_name} has "
                    f"{ref_labels}; every site's dataset.json must declare the same labels"
                )

    def fingerprint_and_plan(self) -> Plan:
        from fedseg.planning.federated import plan_from_fingerprint_sum

        nodes = list(self.sites)
        self.run.set_status(phase="fingerprint")
        if self.secure is not None:
            total = self._secure_fingerprint_sum()
        else:
            total = self._plain_fingerprint_sum(nodes)
        info = self.sites[nodes[0]].info
        ds = DatasetJson(channel_names=info.channel_names, labels=info.labels,
                         file_ending=info.file_ending,
                         regions_class_order=info.regions_class_order)
        gpus = [s.info.gpu_memory_gb for s in self.sites.values() if s.info.gpu_memory_gb > 0]
        budget = self.cfg.gpu_memory_gb or (min(gpus) if gpus else 8.0)
        plan = plan_from_fingerprint_sum(total, ds, gpu_memory_gb=budget,
                                         dataset_name=Path(self.cfg.run_dir).name,
                                         preset=self.cfg.plan_preset)
        plan = with_configuration(plan, self.cfg.configuration)
        plan.save(self.run.plan_path)
        self.run.log({"phase": "plan", "plan_hash": plan.hash(), "sites": len(nodes),
                      "gpu_memory_gb": budget, "secure_aggregation": self.secure is not None})
        return plan

    def fixed_plan(self, path: Path) -> Plan:
        """The job's ``plan_file``: checked against what the sites declared, saved as the run's
        plan. No fingerprint leaves the sites."""
        from fedseg.config_io import load_json_model

        plan = load_json_model(path, Plan, "no such plan file; fix the job's 'plan_file'")
        plan = with_configuration(plan, self.cfg.configuration)
        for s in self.sites.values():
            if s.info.channel_names != plan.channel_names or s.info.labels != plan.labels:
                raise FedsegError(
                    f"{path}: the plan's channels {plan.channel_names} / labels {plan.labels} "
                    f"differ from site '{s.info.site}' ({s.info.channel_names} / {s.info.labels}); "
                    "use a plan made for this data"
                )
        plan.save(self.run.plan_path)
        self.run.log({"phase": "plan", "plan_hash": plan.hash(), "sites": len(self.sites),
                      "plan_file": str(path), "secure_aggregation": self.secure is not None})
        return plan

    def _secure_fingerprint_sum(self) -> np.ndarray:
        """Exact secure sum of the fingerprints (``secure_rounds.fingerprint_sum``); round 1's
        keys are advertised with the fingerprint reply."""
        from fedseg.planning.fingerprint import Fingerprint
        from fedseg.server import secure_rounds

        assert self.secure is not None
        info = next(iter(self.sites.values())).info
        length = Fingerprint.empty(info.channel_names).to_vector().size
        next_rid = self.secure.new_round("train", 1)
        self.secure.next_train[1] = next_rid
        return secure_rounds.fingerprint_sum(self, self._fingerprint_round, length, next_rid)

    def _plain_fingerprint_sum(self, nodes: list[int]) -> np.ndarray:
        replies = self._send(nodes, pm.FINGERPRINT, lambda _: pack(pm.Empty()), timeout=3600)
        vectors = []
        for nid in nodes:
            r = replies.get(nid)
            err = self._reply_error(r)
            if err is not None:
                raise FedsegError(f"fingerprint: site '{self._name(nid)}' failed: {err}")
            _, arrays = unpack(r.content, pm.FingerprintReply)
            vectors.append(arrays["fingerprint"])
        # add in site-name order: the float sums (and so the plan's hash) do not depend on
        # which node id Flower happened to give each site
        order = sorted(range(len(nodes)), key=lambda i: self.sites[nodes[i]].info.site)
        total = vectors[order[0]].astype(np.float64)
        for i in order[1:]:
            total = total + vectors[i]
        return total

    def prepare(self, node_ids: list[int], share_round: int | None = None) -> list[int]:
        """Preprocess with the plan. ``share_round``: secure aggregation's share-keys step of
        that training round rides on this message (its keys were advertised earlier)."""
        from fedseg.server import secure_rounds

        assert self.plan is not None
        share = None
        if self.secure is not None and share_round is not None:
            share = secure_rounds.prepare_share(self, share_round)
        self.run.set_status(phase="preprocess")

        def content(nid: int):
            part = None
            if share is not None and any(a.site == self._name(nid)
                                         for a in share[1].advertisements):
                part = self.secure.part(share_keys=share[1])
            return pack(pm.PrepareRequest(plan_json=self.plan.model_dump_json(), secagg=part,
                                          hide_case_counts=self.secure is not None))

        replies = self._send(node_ids, pm.PREPARE, content, timeout=3600)
        ok = []
        shared = []
        for nid in node_ids:
            r = replies.get(nid)
            err = self._reply_error(r)
            if err is not None:
                self.log(f"preprocess: site '{self._name(nid)}' failed: {err}")
                self.run.log({"phase": "prepare", "site": self._name(nid), "status": "failed",
                              "reason": err})
                self.sites.pop(nid, None)
                self.refused.add(nid)
                continue
            rep, _ = unpack(r.content, pm.PrepareReply)
            if rep.secagg is not None and rep.secagg.share_keys is not None:
                shared.append(rep.secagg.share_keys)
            self.sites[nid].prepared_for = self.plan.hash()
            self.run.log({"phase": "prepare", "site": rep.site, "status": "ok",
                          "cases": rep.num_cases, "seconds": rep.seconds})
            ok.append(nid)
        if share is not None:
            try:
                self.secure.take_share_replies(share[0], shared)
            except SecAggAbort as err:  # the round sets its keys up afresh
                self.run.log({"phase": "secagg", "step": "share_keys", "round_id": share[0],
                              "status": "aborted", "reason": str(err)})
                self.secure.drop(share[0])
        return ok

    def init_weights(self) -> State:
        """The untrained network's weights, made in a SUBPROCESS (``fedseg.models.init``) so the
        ServerApp never imports torch/MONAI: ~300 MB less server memory for the whole run."""
        import subprocess
        import sys
        import tempfile

        assert self.plan is not None
        with tempfile.TemporaryDirectory(prefix="fedseg-init-") as tmp:
            plan_path, out = Path(tmp) / "plan.json", Path(tmp) / "weights.npz"
            self.plan.save(plan_path)
            res = subprocess.run(
                [sys.executable, "-m", "fedseg.models.init", str(plan_path), str(out),
                 "--seed", str(self.cfg.seed)],
                capture_output=True, text=True, timeout=1800,
            )
            if res.returncode != 0:
                raise FedsegError("could not build the initial network: "
                                  + (res.stderr.strip().splitlines() or ["?"])[-1])
            with np.load(out, allow_pickle=False) as z:
                return {k: z[k].astype(np.float32) for k in z.files}

    def refresh_sites(self) -> None:
        """Enrol and prepare nodes that (re)joined since the last round; forget vanished ones.

        A site whose SuperNode restarted comes back under a NEW node id: :meth:`enrol` swaps
        it in for the old entry of the same site name."""
        current = set(self.grid.get_node_ids())
        for nid in list(self.sites):
            if nid not in current:
                self.log(f"site '{self._name(nid)}' disconnected")
                self.run.log({"phase": "membership", "site": self._name(nid), "node": nid,
                              "status": "disconnected", "round": self.state.round + 1})
                self.sites.pop(nid)
        fresh = sorted(current - set(self.sites) - self.refused)
        if fresh:
            new = self.enrol(fresh)
            if new and self.plan is not None:
                self.prepare(new)

    def active_nodes(self) -> list[int]:
        assert self.plan is not None
        h = self.plan.hash()
        return [n for n, s in self.sites.items() if s.prepared_for == h]

    def wait_for_sites(self, timeout: float) -> list[int]:
        """Refresh membership until at least ``min_sites`` prepared sites, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh_sites()
            active = self.active_nodes()
            if len(active) >= self.cfg.min_sites or time.monotonic() >= deadline:
                return active
            self.run.set_status(phase="waiting-for-sites", connected=len(active))
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------------ rounds
    def train_round(self, rnd: int, evaluate_first: bool, nodes: list[int]) -> dict[str, Any]:
        """One round with ``nodes``; returns the pooled record (also logged).

        Bounded in time: replies are awaited at most ``round_timeout_s``; a site that died
        comes back as Flower's NODE_UNAVAILABLE error within about a minute (two missed
        heartbeats). Missing, failed and rejected sites are logged per site ("dropped",
        "rejected" with the reason); the round counts if at least ``min_sites`` updates are
        good."""
        assert self.plan is not None
        if self.secure is not None:
            from fedseg.server import secure_rounds

            return secure_rounds.train_round(self, rnd, evaluate_first, nodes)
        cfg = self.cfg
        t0 = time.monotonic()
        if len(nodes) < cfg.min_sites:
            pooled = {"phase": "train", "round": rnd, "site": "pooled", "sites_ok": 0,
                      "sites_asked": 0, "status": "too_few_sites",
                      "reason": f"only {len(nodes)} prepared site(s) connected"}
            self.run.log(pooled)
            return pooled
        req = pm.TrainRequest(
            **train_request_fields(cfg, self.plan.hash(), rnd, evaluate_first),
            dp=pm.DPParams.for_round(self.privacy.config, len(nodes)) if self.privacy else None,
        )
        box = self.outbox(self.state.weights, upload=True)
        acc = RunningMean()
        losses: list[tuple[float, int]] = []
        evals: list[tuple[str, pm.EvalReply]] = []

        def take(nid: int, r: Message | None) -> None:
            """Check one reply and fold its update into the running mean (then it is dropped)."""
            name = self._name(nid)
            err = self._reply_error(r)
            rec: dict[str, Any] = {"phase": "train", "round": rnd, "site": name,
                                   "bytes_sent": self._sent_bytes.get(nid, 0)}
            if err is None:
                try:
                    rep, arrays = box.unpack(nid, r, pm.TrainReply)
                    delta = strip_prefix(arrays, "d/")  # spooled uploads: read tensor by tensor
                    bound = None if self.privacy else cfg.max_update_norm  # DP: noise adds norm
                    norm = check_update(delta, self.state.weights, bound)
                except (pm.ProtocolError, UpdateRejected) as rej:
                    rec.update(status="rejected", reason=str(rej),
                               bytes_received=payload_bytes(r.content))
                    self.log(f"round {rnd}: update from '{name}' rejected: {rej}")
                    self.run.log(rec)
                    box.done(nid)
                    return
                rec.update(status="ok", loss=rep.loss, cases=rep.num_cases,
                           iterations=rep.iterations, seconds=rep.seconds,
                           it_per_s=rep.iterations_per_s, update_norm=norm,
                           bytes_received=payload_bytes(r.content))
                acc.add(delta, 1.0 if self.privacy else float(rep.num_cases))  # DP: unweighted
                box.done(nid)
                losses.append((rep.loss, rep.num_cases))
                if rep.evaluation is not None:
                    evals.append((name, rep.evaluation))
            else:
                rec.update(status="dropped", reason=err)
                self.log(f"round {rnd}: site '{name}' dropped: {err}")
            self.run.log(rec)

        self._train_exchange(rnd, nodes, box, box.content_for(lambda _: req), take, evals)
        pooled: dict[str, Any] = {"phase": "train", "round": rnd, "site": "pooled",
                                  "sites_ok": acc.count, "sites_asked": len(nodes)}
        if acc.count < cfg.min_sites:
            pooled.update(status="too_few_sites", seconds=round(time.monotonic() - t0, 3),
                          reason=f"{acc.count} good update(s), min_sites={cfg.min_sites}")
            self.run.log(pooled)
            return pooled
        self.state.weights = self.opt.step(self.state.weights, acc.mean())
        pooled.update(
            status="ok",
            loss=float(sum(lo * n for lo, n in losses) / max(1, sum(n for _, n in losses))),
            cases=int(sum(n for _, n in losses)), seconds=round(time.monotonic() - t0, 3),
            **(self.privacy.release(len(nodes), acc.count) if self.privacy else {}),
            **memory_mb(),
        )
        self.run.log(pooled)
        return pooled

    def _train_exchange(self, rnd: int, nodes: list[int], box: Outbox,
                        content_for: Callable[[int], Any],
                        take: Callable[[int, Message | None], None],
                        evals: list[tuple[str, pm.EvalReply]]) -> None:
        """A round's TRAIN exchange (plain or secure): each reply to ``take`` as it arrives,
        then ``take(nid, None)`` for each site that did not reply in time; the model's offer is
        withdrawn; the evaluations of the previous round's model that rode on it are logged."""
        try:
            replied = self._exchange(nodes, pm.TRAIN, content_for, self.cfg.round_timeout_s,
                                     take, after_push=box.pushed)
        finally:
            box.close()
        for nid in nodes:
            if nid not in replied:
                take(nid, None)
        if evals:
            self._log_eval(rnd - 1, sorted(evals, key=lambda e: e[0]))

    def _log_eval(self, after_round: int, evals: list[tuple[str, pm.EvalReply]]) -> float:
        """Log per-site and pooled (case-weighted) Dice/HD95; returns pooled mean Dice."""
        tot = sum(e.num_cases for _, e in evals)
        classes = sorted({c for _, e in evals for c in e.dice_per_class})
        pooled_dice, pooled_hd = {}, {}
        for c in classes:
            vals = [(e.dice_per_class[c], e.num_cases) for _, e in evals if c in e.dice_per_class]
            pooled_dice[c] = float(sum(v * n for v, n in vals) / max(1, sum(n for _, n in vals)))
            hds = [(e.hd95_per_class[c], e.num_cases) for _, e in evals
                   if c in e.hd95_per_class and np.isfinite(e.hd95_per_class[c])]
            pooled_hd[c] = (float(sum(v * n for v, n in hds) / sum(n for _, n in hds))
                            if hds else float("nan"))
        for name, e in evals:
            self.run.log({"phase": "eval", "round": after_round, "site": name,
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
        return self.record_pooled_eval(after_round, tot, pooled_dice, pooled_hd, **extra)

    def record_pooled_eval(
        self, after_round: int, cases: int, dice: dict[str, float], hd95: dict[str, float],
        **extra: Any,
    ) -> float:
        """Log the pooled evaluation, update status, keep ``best`` in step; returns mean Dice."""
        mean = float(np.mean(list(dice.values()))) if dice else float("nan")
        self.run.log({"phase": "eval", "round": after_round, "site": "pooled", "cases": cases,
                      "dice": dice, "hd95": hd95, "mean_dice": mean, **extra})
        self.run.set_status(latest_dice=mean, latest_eval_round=after_round)
        if after_round > 0 and mean > self.state.best_dice:
            self.state.best_dice = mean
            self.wait_checkpoint()
            if self.state.round == after_round and self.run.checkpoint_path("last").exists():
                self.run.copy_checkpoint("last", "best")
        return mean

    def final_evaluation(self) -> None:
        assert self.plan is not None
        if self.secure is not None and not self.cfg.per_site_metrics:
            from fedseg.server import secure_rounds

            secure_rounds.final_evaluation(self)
            return
        nodes = list(self.sites)
        req = pm.EvalRequest(round=self.state.round, plan_hash=self.plan.hash())
        box = self.outbox(self.state.weights)
        self.run.set_status(phase="final-evaluation")
        try:
            replies = self._send(nodes, pm.EVALUATE, box.content_for(lambda _: req),
                                 timeout=self.cfg.round_timeout_s)
        finally:
            box.close()
        evals = []
        for nid in nodes:
            r = replies.get(nid)
            err = self._reply_error(r)
            if err is not None:
                self.run.log({"phase": "eval", "round": self.state.round, "site": self._name(nid),
                              "status": "dropped", "reason": err})
                continue
            rep, _ = unpack(r.content, pm.EvalReply)
            evals.append((rep.site, rep))
        if evals:
            self._log_eval(self.state.round, evals)

    def checkpoint(self) -> None:
        """Write ``last`` in a background thread: the next round's messages go out while the
        file (the model plus the server optimiser's moments, fsync'ed) is written. The write is
        atomic, so a crash meanwhile leaves the previous round's checkpoint (resume repeats one
        round). The weights dict is replaced, never mutated, by every step, so the thread writes
        a consistent snapshot."""
        self.wait_checkpoint()
        state = {
            "round": self.state.round,
            "weights": self.state.weights,
            "optimizer": {k: dict(v) for k, v in self.opt.state_dict().items()},
            "best_dice": self.state.best_dice,
            "plan_hash": self.plan.hash() if self.plan else "",
        }

        snap = self.cfg.snapshot_every and self.state.round % self.cfg.snapshot_every == 0

        def write() -> None:
            try:
                self.run.save_checkpoint("last", state)
                if snap:  # kept for learning curves: bench/quality.py, bundle_from_checkpoint
                    self.run.copy_checkpoint("last", snapshot_name(int(state["round"])))
            except Exception as err:  # reported by wait_checkpoint, in the job's thread
                self._checkpoint_error = err

        self._checkpoint_thread = threading.Thread(target=write, name="checkpoint")
        self._checkpoint_thread.start()

    def wait_checkpoint(self) -> None:
        """Until the last checkpoint is on disk; a failed write stops the job here."""
        t, self._checkpoint_thread = self._checkpoint_thread, None
        if t is not None:
            t.join()
        err, self._checkpoint_error = self._checkpoint_error, None
        if err is not None:
            raise FedsegError(f"could not write {self.run.checkpoint_path('last')}: {err}")

    def restore(self) -> bool:
        ck = self.run.load_checkpoint("last")
        if ck is None:
            return False
        self._restored_plan_hash = str(ck.get("plan_hash", ""))
        self.state.round = int(ck["round"])
        self.state.weights = dict(ck["weights"])
        self.opt.load_state_dict(ck.get("optimizer", {}))
        self.state.best_dice = float(ck.get("best_dice", -1.0))
        return True

    # ------------------------------------------------------------------ driver
    def run_job(self) -> None:
        """All phases (:meth:`_run_job`), with the bulk-transfer server up meanwhile."""
        cfg = self.cfg
        if cfg.bulk_transport == "http":
            self.bulk = BulkServer(Path(cfg.run_dir) / ".bulk", cfg.bulk_listen, cfg.bulk_url)
            try:
                self.bulk.start()
            except OSError as err:
                raise FedsegError(f"job config: field 'bulk_listen': cannot serve bulk transfers "
                                  f"on {cfg.bulk_listen} ({err})") from None
            self.log(f"bulk transfers: {self.bulk.url or '(the sites server address)'}/fedseg/bulk/ "
                     f"(listening on port {self.bulk.port})")
            self.run.log({"phase": "transport", "bulk_transport": "http",
                          "bulk_url": self.bulk.url, "bulk_port": self.bulk.port})
        try:
            self._run_job()
        finally:
            if self.bulk is not None:
                self.bulk.stop()

    def _run_job(self) -> None:
        """All phases. With ``cfg.resume`` and a checkpoint in the run folder, the job continues
        after the last completed round with the saved plan, global weights and server-optimiser
        state (a new Flower run: Flower cannot resume one). The sites' preprocessed caches are
        keyed by the plan's hash and their trainer state by job id + plan hash, so they continue
        too."""
        cfg = self.cfg
        (Path(cfg.run_dir) / "job.json").write_text(cfg.model_dump_json(indent=2) + "\n")
        resuming = cfg.resume and self.run.plan_path.exists() and self.restore()
        if resuming:
            self.plan = Plan.load(self.run.plan_path)
            ck_hash = self._restored_plan_hash
            if ck_hash and ck_hash != self.plan.hash():
                raise FedsegError(
                    f"{self.run.checkpoint_path('last')} was made with plan {ck_hash}, but "
                    f"{self.run.plan_path} has plan {self.plan.hash()}; cannot resume"
                )
        self.run.set_status(phase="enrolment", round=self.state.round, rounds=cfg.rounds,
                            state="running", error=None)
        if cfg.dp.enabled:  # ε composes over the whole job, resumes included (fedseg/privacy/dp.py)
            self.privacy = JobAccountant(cfg.dp.resolve(cfg.rounds),
                                         Path(cfg.run_dir) / "dp_accountant.json", resuming)
            self.log(f"differential privacy on: {self.privacy.config.model_dump()}")
        if cfg.secure_aggregation:
            self._start_secure_aggregation(resuming)
        nodes = self.wait_for_nodes(cfg.min_sites, cfg.enrol_timeout_s)
        self.enrol(nodes)
        self._enrol_round = ""  # sites that join later set their keys up with their first round
        if len(self.sites) < cfg.min_sites:
            raise FedsegError(
                f"only {len(self.sites)} site(s) enrolled, min_sites={cfg.min_sites}; "
                "see metrics.jsonl for why the others were refused"
            )
        if resuming:
            assert self.plan is not None
            self.log(f"resuming after round {self.state.round} of {cfg.rounds} "
                     f"(plan {self.plan.hash()})")
            self.run.log({"phase": "resume", "round": self.state.round, "rounds": cfg.rounds,
                          "plan_hash": self.plan.hash(), "sites": len(self.sites),
                          "optimizer_state": bool(self.opt.m or self.opt.v)})
        elif cfg.plan_file:
            self.plan = self.fixed_plan(Path(cfg.plan_file))
        else:
            self.plan = self.fingerprint_and_plan()
        if not resuming:
            self.state.weights = self.init_weights()
            self.checkpoint()
        self.prepare(list(self.sites), share_round=self.state.round + 1)
        rnd = self.state.round + 1
        retries = 0
        while rnd <= cfg.rounds:
            nodes = self.wait_for_sites(cfg.site_wait_s)
            self.run.set_status(phase="training", round=rnd,
                                sites={self._name(n): "active" for n in nodes})
            evaluate_first = (rnd - 1) % cfg.eval_every == 0  # round 1: the untrained model
            pooled = self.train_round(rnd, evaluate_first, nodes)
            if pooled["status"] == "refused" and retries < robust_config(cfg).refused_retries:
                retries += 1  # implausible sums, not applied (server/plausibility.py)
                self.log(f"round {rnd}: refused, retry {retries}/"
                         f"{robust_config(cfg).refused_retries} with the global model unchanged")
                continue
            if pooled["status"] != "ok":
                if cfg.on_too_few_sites == "fail":
                    raise FedsegError(f"round {rnd}: only {pooled['sites_ok']} good update(s), "
                                      f"min_sites={cfg.min_sites}")
                if cfg.on_too_few_sites == "retry" and retries < cfg.max_retries:
                    retries += 1
                    self.log(f"round {rnd}: too few sites, retry {retries}/{cfg.max_retries} "
                             f"(waiting up to {cfg.site_wait_s:.0f} s for sites)")
                    continue
                self.log(f"round {rnd}: too few sites, skipped (global model unchanged)")
                self.run.log({"phase": "train", "round": rnd, "site": "pooled",
                              "status": "skipped", "reason": pooled.get("reason", "")})
            retries = 0
            self.state.round = rnd
            self.checkpoint()
            self.log(f"round {rnd}/{cfg.rounds} done: {json.dumps(pooled)}")
            rnd += 1
        self.refresh_sites()
        self.wait_checkpoint()
        self.final_evaluation()
        self.export()
        self.run.set_status(phase="done", state="finished", round=self.state.round)

    def _start_secure_aggregation(self, resuming: bool) -> None:
        """Secure aggregation on (the default): roster and threshold from the job config; the
        enrolment advertises the keys of the first aggregation (the fingerprint, or on resume
        the next training round). See ``secure_rounds`` for the message flow."""
        cfg = self.cfg
        if not cfg.roster:
            raise FedsegError(
                "secure aggregation is on (the default) but the job has no roster: set "
                "roster = 'PKI/roster.json' (from 'fedseg provision') in the job config, or "
                "secure_aggregation = false"
            )
        self.secure = SecureAggregation(cfg.roster, cfg.secagg_threshold, cfg.secagg_clip,
                                        cfg.job_id or Path(cfg.run_dir).name, self.run_id)
        if resuming or cfg.plan_file:  # no fingerprint sum: the keys are the next round's
            rid = self.secure.new_round("train", self.state.round + 1)
            self.secure.next_train[self.state.round + 1] = rid
        else:
            rid = self._fingerprint_round = self.secure.new_round("fingerprint", 0)
        self._enrol_round = rid
        self.log(f"secure aggregation on: {len(self.secure.config.roster)} sites in the roster, "
                 f"threshold {self.secure.config.threshold}, clip {self.secure.config.clip}")

    def export(self) -> None:
        import torch

        from fedseg.models.bundle import BundleInfo, save_bundle

        assert self.plan is not None
        ds = self.plan.dataset_json()
        state = {k: torch.from_numpy(v) for k, v in self.state.weights.items()}
        save_bundle(self.run.model_dir, self.plan, ds, state,
                    BundleInfo(trained_iterations=self.state.round * self.cfg.local_iterations,
                               note=f"federated job {self.cfg.job_id}, {self.state.round} rounds"))
        from fedseg.server.report import write_report

        write_report(self.run)


def unpack_error(reply: Message) -> tuple[pm.ErrorReply, dict]:
    return unpack(reply.content, pm.ErrorReply)  # type: ignore[return-value]

