"""The federated fingerprint: the SUM of every enrolled site's fingerprint vector (histograms
and moments that add), from which the one plan is made (``phases/planning.py``).

All sites must take part: a plan from some of them would not fit the others' data. Under
secure aggregation the server sees only the exact sum (``secure_rounds.fingerprint_sum``);
without it each site's vector comes in clear and the server adds them.
"""

from __future__ import annotations

import numpy as np

from fedseg.errors import FedsegError
from fedseg.planning.fingerprint import Fingerprint
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, unpack
from fedseg.server import secure_rounds
from fedseg.server.job_context import JobContext
from fedseg.server.messaging import reply_error


def fingerprint_sum(ctx: JobContext, secure_round: str = "") -> np.ndarray:
    """The summed fingerprint vector; ``secure_round``: the secure sum's round id (advertised
    with the enrolment)."""
    if ctx.secure is not None:
        return _secure_sum(ctx, secure_round)
    return _plain_sum(ctx, list(ctx.sites))


def _secure_sum(ctx: JobContext, rid: str) -> np.ndarray:
    """Exact secure sum of the fingerprints; round 1's keys are advertised with the
    fingerprint reply."""
    assert ctx.secure is not None
    info = next(iter(ctx.sites.values())).info
    length = Fingerprint.empty(info.channel_names).to_vector().size
    next_rid = ctx.secure.new_round("train", 1)
    ctx.secure.next_train[1] = next_rid
    return secure_rounds.fingerprint_sum(ctx, rid, length, next_rid)


def _plain_sum(ctx: JobContext, nodes: list[int]) -> np.ndarray:
    replies = ctx.net.send(nodes, pm.FINGERPRINT, lambda _: pack(pm.Empty()), timeout=3600)
    vectors = []
    for nid in nodes:
        r = replies.get(nid)
        err = reply_error(r)
        if err is not None:
            raise FedsegError(f"fingerprint: site '{ctx.name(nid)}' failed: {err}")
        _, arrays = unpack(r.content, pm.FingerprintReply)
        vectors.append(arrays["fingerprint"])
    # add in site-name order: the float sums (and so the plan's hash) do not depend on
    # which node id Flower happened to give each site
    order = sorted(range(len(nodes)), key=lambda i: ctx.sites[nodes[i]].info.site)
    total = vectors[order[0]].astype(np.float64)
    for i in order[1:]:
        total = total + vectors[i]
    return total
