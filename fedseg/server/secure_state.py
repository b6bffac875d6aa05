"""What the server keeps of secure aggregation: the roster's SecAgg settings and, per
aggregation (round id), the advertisements, the SecAgg server and its requests.

Why a module of its own: no Flower and no job inside — the job's context holds one
(``server/job_context.py``), and the phases that send its requests (``secure_steps``,
``secure_rounds``) take that context; the protocol itself is ``fedseg/privacy/secagg.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fedseg.errors import FedsegError
from fedseg.privacy.buffers import BufferPool
from fedseg.privacy.secagg import (
    KeyAdvertisement,
    MaskRequest,
    SecAggConfig,
    SecAggServer,
    ShareKeysReply,
    ShareKeysRequest,
)
from fedseg.protocol import messages as pm


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
        # imported here: the x509 machinery is ~0.25 s of ServerApp start-up a plain job skips
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
        self.robust_state: dict[str, Any] | None = None  # the checks' history: secure_apply.py

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
