"""ClientApp side of secure aggregation: what the handlers in ``app.py`` call when a message
carries a :class:`~fedseg.protocol.messages.SecAggPart`.

The site validates its own update before masking it (the server cannot see it any more):
finite values and, when the server names a bound, the global L2 norm. A refused update ends
as an ``ErrorReply`` of kind ``rejected``; a secure-aggregation check that fails (a forged or
replayed key, an inconsistent unmask request, settings that violate 2t > n) as kind
``secagg`` — either way nothing of the update leaves the site.

Differential privacy (``TrainRequest.dp``, off unless the job sets ``[job.dp]``;
``fedseg/privacy/dp.py``): :func:`private_delta` clips the site's delta to the L2 bound S and
adds its share N(0, (z·S)²/n) of the Gaussian noise BEFORE the delta is masked (or, without
secure aggregation, sent), with fresh randomness from the OS CSPRNG. The masked contribution is
then unweighted (see :func:`train_reply`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import Message

from fedseg.errors import FedsegError
from fedseg.privacy import aggregates as agg
from fedseg.privacy import exact_sum
from fedseg.privacy.dp import DPConfig, privatize
from fedseg.privacy.site_agent import SiteAgent, check_local_update
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, unpack


class UpdateRefused(FedsegError):
    """The site's own update failed validation; it is not masked nor sent."""


class SiteLike(Protocol):
    """What these functions need of the ClientApp's ``SiteConfig``."""

    site: str
    cache_dir: Path
    node_config: Mapping[str, object]


def agent(msg: Message, cfg: SiteLike, part: pm.SecAggPart) -> SiteAgent:
    return SiteAgent(cfg.site, cfg.node_config, cfg.cache_dir, part.params, int(msg.metadata.run_id))


def step(msg: Message, cfg: SiteLike) -> Message:
    """``query.share_keys`` / ``query.unmask``: protocol steps with no values of their own."""
    req, _ = unpack(msg.content, pm.SecAggStepRequest)
    if req.secagg.mask is not None:
        raise FedsegError("a stand-alone secure-aggregation step cannot carry a mask request")
    reply, _ = agent(msg, cfg, req.secagg).process(req.secagg)
    return Message(pack(pm.SecAggStepReply(site=cfg.site, secagg=reply)), reply_to=msg)


def plain_part(msg: Message, cfg: SiteLike,
               part: pm.SecAggPart | None) -> pm.SecAggReplyPart | None:
    """Steps riding on a message whose own payload is not masked (enrol, prepare)."""
    if part is None:
        return None
    if part.mask is not None:
        raise FedsegError("this message cannot carry a mask request")
    reply, _ = agent(msg, cfg, part).process(part)
    return reply  # type: ignore[return-value]


def fingerprint_reply(msg: Message, cfg: SiteLike, part: pm.SecAggPart,
                      vector: np.ndarray) -> Message:
    """The fingerprint vector, exactly encoded (``exact_sum``), into the secure sum."""
    ag = agent(msg, cfg, part)

    def values():
        ints = exact_sum.encode(vector, ag.config.num_sites, what=f"site {cfg.site}: fingerprint")
        return np.zeros(0), {agg.FINGERPRINT_FIELD: ints}

    reply, vec = ag.process(part, values)
    arrays = {pm.SECAGG_VECTOR: vec} if vec is not None else None
    return Message(pack(pm.FingerprintReply(site=cfg.site, secagg=reply), arrays), reply_to=msg)


def private_delta(cfg: SiteLike, req: pm.TrainRequest, delta: Mapping[str, np.ndarray],
                  max_sites: int | None = None) -> dict[str, np.ndarray]:
    """Differential privacy (``req.dp``): the delta clipped to global L2 norm <= S plus this
    site's share of the noise, N(0, σ²) per value with σ = z·S/√n, so that the SUM over the n
    sites asked carries std z·S. ``max_sites`` (the site's own roster size under secure
    aggregation) caps n: a larger split would shrink every site's share of the noise. The
    update norm is printed to the site's own log only."""
    p = req.dp
    assert p is not None
    if max_sites is not None and p.n_sites > max_sites:
        raise UpdateRefused(
            f"site {cfg.site} refuses to split the privacy noise over {p.n_sites} sites: its "
            f"roster has {max_sites}")
    dp = DPConfig(enabled=True, clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier)
    try:
        out, info = privatize(delta, dp, p.n_sites)
    except (TypeError, ValueError) as err:
        raise UpdateRefused(f"site {cfg.site} refuses its own update: {err}") from None
    assert info is not None
    print(f"[fedseg-client {cfg.site}] differential privacy: update norm "
          f"{info.original_norm:.4g} {'clipped to' if info.clipped else 'within'} "
          f"{p.clip_norm:g}, noise std {info.noise_std:.4g} per value", flush=True)
    return out


def train_reply(
    msg: Message, cfg: SiteLike,
    req: pm.TrainRequest, delta: Mapping[str, np.ndarray], num_cases: int, loss: float,
    evaluation: pm.EvalReply | None, iterations: int, seconds: float, it_per_s: float,
) -> Message:
    """Validate, weight and mask the update (plus case count, loss and, if asked, evaluation);
    the reply carries no per-site loss or case count in clear.

    With differential privacy (``req.dp``) the masked vector is the clipped, noised delta with
    weight 1, not (num_cases / case_scale)·delta: the server divides the sum by the number of
    survivors. A case weight after the clip would scale this site's sensitivity by
    num_cases / case_scale (beyond the bound S the accountant assumes), and the case-weighted
    mean's divisor, the summed case count, depends on each site's private count."""
    assert req.secagg is not None
    try:
        check_local_update(delta, req.max_update_norm)
    except ValueError as err:
        raise UpdateRefused(f"site {cfg.site} refuses its own update: {err}") from None
    ag = agent(msg, cfg, req.secagg)
    int_max = ag.config.int_max
    weight = num_cases / req.case_scale
    if req.dp is not None:  # clipped and noised here, before anything is masked
        delta = private_delta(cfg, req, delta, max_sites=ag.config.num_sites)
        weight = 1.0

    def values():
        floats = agg.flatten_delta(delta, weight)
        ints: dict[str, object] = agg.train_ints(num_cases, loss, int_max)
        if not req.per_site_metrics and req.eval_classes:
            if evaluation is None:
                ints.update(agg.eval_ints(0, {}, {}, req.eval_classes, int_max))
            else:
                ints.update(agg.eval_ints(evaluation.num_cases, evaluation.dice_per_class,
                                          evaluation.hd95_per_class, req.eval_classes, int_max))
        return floats, ints

    reply, vec = ag.process(req.secagg, values)
    shown = evaluation if req.per_site_metrics else None
    rep = pm.TrainReply(site=cfg.site, iterations=iterations, seconds=seconds,
                        iterations_per_s=it_per_s, evaluation=shown, secagg=reply)
    arrays = {pm.SECAGG_VECTOR: vec} if vec is not None else None
    from fedseg.client.bulk_client import endpoint_of, reply_content

    return Message(reply_content(msg, rep, arrays, endpoint_of(cfg.node_config)), reply_to=msg)


def eval_reply(msg: Message, cfg: SiteLike,
               req: pm.EvalRequest, evaluation: pm.EvalReply) -> Message:
    """Final evaluation into the secure sum (``per_site_metrics = false``)."""
    assert req.secagg is not None
    ag = agent(msg, cfg, req.secagg)

    def values():
        return np.zeros(0), agg.eval_ints(evaluation.num_cases, evaluation.dice_per_class,
                                          evaluation.hd95_per_class, req.eval_classes,
                                          ag.config.int_max)

    reply, vec = ag.process(req.secagg, values)
    rep = pm.EvalReply(site=cfg.site, num_cases=0, dice_per_class={}, hd95_per_class={},
                       seconds=evaluation.seconds, secagg=reply)
    arrays = {pm.SECAGG_VECTOR: vec} if vec is not None else None
    return Message(pack(rep, arrays), reply_to=msg)
