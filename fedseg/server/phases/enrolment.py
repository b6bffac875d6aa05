"""Enrolment and membership: which connected nodes take part in the job, and as which site.

Before the plan exists every site must agree on channels/labels (else the job fails: no majority
rule). Once a plan exists (later rounds, resume), a site that does not match it is refused alone.
Before every round the membership is refreshed: vanished nodes are forgotten, new ones (a site
restarted: a new node id) are enrolled and prepared, and replace the old entry of the same site
name — a restarted SuperNode registers with a new node id while the old id can look online for
up to a minute (Flower's heartbeat).
"""

from __future__ import annotations

import time

from fedseg.errors import FedsegError
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, unpack
from fedseg.server.job_context import JobContext, Site
from fedseg.server.messaging import reply_error
from fedseg.server.phases.preprocess import prepare
from fedseg.server.site_binding import SiteBinding, check_claims


def wait_for_nodes(ctx: JobContext, minimum: int, timeout: float) -> list[int]:
    """The connected node ids once there are ``minimum``; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(ctx.net.grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise FedsegError(
                f"only {len(nodes)} of min-sites={minimum} sites connected within "
                f"{timeout:.0f} s; start more sites or lower min_sites"
            )
        ctx.run.set_status(phase="enrolment", connected=len(nodes))
        time.sleep(1.0)


def enrol(ctx: JobContext, node_ids: list[int], advertise: str = "") -> list[int]:
    """Ask nodes who they are; refuse the ones that fail or do not fit; returns the new ones.

    ``advertise``: secure aggregation's round id whose keys the enrolment collects (the job's
    first aggregation; empty for sites that join later: they set their keys up with their first
    round)."""
    sec = ctx.secure
    req = pm.EnrolRequest(
        hide_case_counts=sec is not None,
        secagg=sec.part(advertise=[advertise]) if sec and advertise else None,
    )
    replies = ctx.net.send(node_ids, pm.ENROL, lambda _: pack(req), timeout=300)
    new: list[int] = []
    for nid in node_ids:
        r = replies.get(nid)
        err = reply_error(r)
        if err is None:
            try:
                info, _ = unpack(r.content, pm.EnrolReply)
            except pm.ProtocolError as perr:
                err = str(perr)
        if err is None and ctx.plan is not None:
            err = _mismatch(ctx, info)
        if err is None:  # the site is the one the node's key says (server/site_binding.py)
            if ctx.site_binding is None:
                ctx.site_binding = SiteBinding.for_job(ctx.cfg)
            err = check_claims(ctx.site_binding, ctx.net.grid, ctx.log, {nid: info.site}).get(nid)
        if err is None and any(ctx.sites[n].info.site == info.site for n in new):
            err = f"site name '{info.site}' is already used by another node"
        if err is None and sec is not None and info.site not in sec.config.roster:
            err = (f"site '{info.site}' is not in the consortium roster; secure aggregation "
                   "needs every site's identity key")
        if err is not None:
            ctx.log(f"enrolment: node {nid} refused: {err}")
            ctx.run.log({"phase": "enrol", "node": nid, "status": "refused", "reason": err,
                         "round": ctx.state.round + 1})
            ctx.refused.add(nid)
            continue
        for old, s in list(ctx.sites.items()):
            if s.info.site == info.site:
                ctx.log(f"site '{info.site}' reconnected as node {nid} (was node {old})")
                ctx.sites.pop(old)
        ctx.sites[nid] = Site(nid, info)
        new.append(nid)
        if sec is not None and advertise:
            sec.take_adverts(advertise, info.site, info.secagg)
        ctx.run.log({"phase": "enrol", "site": info.site, "node": nid, "status": "ok",
                     "cases": info.num_training_cases, "gpu_memory_gb": info.gpu_memory_gb,
                     "device": info.device, "round": ctx.state.round + 1})
    _check_consistent(ctx)
    return new


def _mismatch(ctx: JobContext, info: pm.EnrolReply) -> str | None:
    assert ctx.plan is not None
    if info.channel_names != ctx.plan.channel_names:
        return (f"declares channels {info.channel_names}, but the plan has "
                f"{ctx.plan.channel_names}")
    if info.labels != ctx.plan.labels:
        return f"declares labels {info.labels}, but the plan has {ctx.plan.labels}"
    return None


def _check_consistent(ctx: JobContext) -> None:
    sites = list(ctx.sites.values())
    if not sites:
        return
    plan = ctx.plan
    ref = plan.channel_names if plan else sites[0].info.channel_names
    ref_labels = plan.labels if plan else sites[0].info.labels
    ref_name = "the plan" if plan else sites[0].info.site
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


def refresh_sites(ctx: JobContext) -> None:
    """Enrol and prepare nodes that (re)joined since the last round; forget vanished ones.

    A site whose SuperNode restarted comes back under a NEW node id: :func:`enrol` swaps it in
    for the old entry of the same site name."""
    current = set(ctx.net.grid.get_node_ids())
    for nid in list(ctx.sites):
        if nid not in current:
            ctx.log(f"site '{ctx.name(nid)}' disconnected")
            ctx.run.log({"phase": "membership", "site": ctx.name(nid), "node": nid,
                         "status": "disconnected", "round": ctx.state.round + 1})
            ctx.sites.pop(nid)
    fresh = sorted(current - set(ctx.sites) - ctx.refused)
    if fresh:
        new = enrol(ctx, fresh)
        if new and ctx.plan is not None:
            prepare(ctx, new)


def wait_for_sites(ctx: JobContext, timeout: float) -> list[int]:
    """Refresh membership until at least ``min_sites`` prepared sites, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        refresh_sites(ctx)
        active = ctx.active_nodes()
        if len(active) >= ctx.cfg.min_sites or time.monotonic() >= deadline:
            return active
        ctx.run.set_status(phase="waiting-for-sites", connected=len(active))
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
