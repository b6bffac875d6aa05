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

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import Message

from fedseg.client import faults
from fedseg.client.bulk_client import endpoint_of, reply_content
from fedseg.client.cases import train_val_ids
from fedseg.client.errors import UpdateRefused, error_reply
from fedseg.errors import FedsegError
from fedseg.privacy import aggregates as agg
from fedseg.privacy import exact_sum
from fedseg.privacy.buffers import BufferPool
from fedseg.privacy.dp import DPConfig, privatize
from fedseg.privacy.site_agent import SiteAgent, check_local_update, state_path
from fedseg.protocol import messages as pm
from fedseg.protocol.bulk import BulkRendezvous, get_envelope
from fedseg.protocol.records import pack, unpack

_UPLOAD_BUFFERS = BufferPool(keep=1)  # the masked vector's buffer, kept between rounds


class SiteLike(Protocol):
    """What these functions need of the ClientApp's ``SiteConfig``."""

    site: str
    data_dir: Path
    cache_dir: Path
    node_config: Mapping[str, object]


_STATE_LOCKS: dict[Path, threading.Lock] = {}
_STATE_LOCKS_GUARD = threading.Lock()


@contextmanager
def agent(run_id: int, cfg: SiteLike, part: pm.SecAggPart) -> Iterator[SiteAgent]:
    """The site's :class:`SiteAgent` for ``part``, holding its state file's lock: in a site
    worker the unmask step may be answered from a background thread (:func:`listen_for_step`)
    while the next message is handled, and a SiteAgent reads the state when it is made and
    writes it back after each step."""
    path = state_path(cfg.cache_dir, str(part.params.job_id)).resolve()
    with _STATE_LOCKS_GUARD:
        lock = _STATE_LOCKS.setdefault(path, threading.Lock())
    with lock:
        yield SiteAgent(cfg.site, cfg.node_config, cfg.cache_dir, part.params, int(run_id))


def _run_id(msg: Message) -> int:
    return int(msg.metadata.run_id)


def step_reply(run_id: int, cfg: SiteLike, req: pm.SecAggStepRequest) -> pm.SecAggStepReply:
    """A protocol step with no values of its own (share keys, unmask), however it came."""
    if req.secagg.mask is not None:
        raise FedsegError("a stand-alone secure-aggregation step cannot carry a mask request")
    with agent(run_id, cfg, req.secagg) as ag:
        reply, _ = ag.process(req.secagg)
    return pm.SecAggStepReply(site=cfg.site, secagg=reply)


def step(msg: Message, cfg: SiteLike) -> Message:
    """``query.share_keys`` / ``query.unmask``: protocol steps with no values of their own."""
    req, _ = unpack(msg.content, pm.SecAggStepRequest)
    return Message(pack(step_reply(_run_id(msg), cfg, req)), reply_to=msg)


# ---- the unmask step through the bulk rendezvous (fedseg/protocol/bulk.py: BulkRendezvous) ----
_BACKGROUND = {"on": False}
STEP_WAIT_S = 900.0  # a listener gives up this long after the upload (the server gives up sooner)


def enable_background_steps() -> None:
    """Called by the long-lived site worker (``client/worker.py``): this process outlives the
    message, so a TRAIN handler may leave a thread behind that answers the round's unmask step
    from the bulk rendezvous. A fresh ``flwr-clientapp`` process per message would end (and
    take the thread with it) as soon as it replied: there the step comes as a Flower message."""
    _BACKGROUND["on"] = True


def listen_for_step(rv: BulkRendezvous, run_id: int, cfg: SiteLike) -> threading.Thread:
    """Start the thread that waits on ``rv`` (the TRAIN request's rendezvous) for the follow-up
    step (the round's unmask, the next round's share keys) and answers it exactly as the
    ``query.unmask`` handler would; errors are answered as the handler's ``ErrorReply``.
    Returns the thread."""
    endpoint = endpoint_of(cfg.node_config)

    def run() -> None:
        t0 = time.monotonic()
        body = endpoint.await_step(rv, t0 + STEP_WAIT_S)
        if body is None:
            return  # closed: the server sent the step another way, or gave the round up
        t1 = time.monotonic()
        try:
            try:
                req = pm.SecAggStepRequest.model_validate_json(body)
            except ValueError as err:
                raise pm.ProtocolError(f"the step request does not validate: {err}") from None
            answer = pm.StepAnswer(reply=step_reply(run_id, cfg, req))
        except Exception as err:  # the same answer the Flower handler would give
            answer = pm.StepAnswer(error=error_reply(cfg.site, err))
        try:
            endpoint.answer_step(rv, answer.model_dump_json().encode())
        except FedsegError as err:
            print(f"[fedseg-client {cfg.site}] the unmask step's answer was not taken: {err}",
                  flush=True)
            return
        print(f"[fedseg-client {cfg.site}] {time.strftime('%H:%M:%S')} unmask step via the bulk "
              f"rendezvous: waited {t1 - t0:.2f} s, answered in {time.monotonic() - t1:.2f} s",
              flush=True)

    th = threading.Thread(target=run, name=f"fedseg-step-{cfg.site}", daemon=True)
    th.start()
    return th


def plain_part(msg: Message, cfg: SiteLike,
               part: pm.SecAggPart | None) -> pm.SecAggReplyPart | None:
    """Steps riding on a message whose own payload is not masked (enrol, prepare)."""
    if part is None:
        return None
    if part.mask is not None:
        raise FedsegError("this message cannot carry a mask request")
    with agent(_run_id(msg), cfg, part) as ag:
        reply, _ = ag.process(part)
    return reply  # type: ignore[return-value]


def train_counts(data_dir: Path, folds: int) -> list[int]:
    """The site's training cases for the rounds' denominator: of the one-model split (one
    value), or of each fold of a ``folds``-fold cross-validation."""
    if folds == 1:
        return [len(train_val_ids(data_dir)[0])]
    if not 2 <= folds <= 10:
        raise FedsegError(f"fingerprint: {folds} training-case counts asked for; a job has 1 to "
                          "10 folds")
    return [len(train_val_ids(data_dir, k, folds)[0]) for k in range(folds)]


def fingerprint_reply(msg: Message, cfg: SiteLike, part: pm.SecAggPart,
                      vector: np.ndarray) -> Message:
    """The fingerprint vector, exactly encoded (``exact_sum``), into the secure sum."""
    with agent(_run_id(msg), cfg, part) as ag:

        def values():
            ints = exact_sum.encode(vector, ag.config.num_sites, what=f"site {cfg.site}: fingerprint")
            out: dict[str, object] = {agg.FINGERPRINT_FIELD: ints}
            fields = part.mask.int_fields if part.mask is not None else {}
            if agg.TRAIN_CASES_FIELD in fields:  # N for the rounds' fixed denominator
                out[agg.TRAIN_CASES_FIELD] = train_counts(cfg.data_dir, fields[agg.TRAIN_CASES_FIELD])
            if agg.SITES_FIELD in fields:
                out[agg.SITES_FIELD] = [1]
            return np.zeros(0), out

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
    delta, cheat = faults.tamper_delta(dict(delta), req.round, cfg.cache_dir)  # tests only
    try:
        check_local_update(delta, None if cheat else req.max_update_norm)
    except ValueError as err:
        raise UpdateRefused(f"site {cfg.site} refuses its own update: {err}") from None
    weight = num_cases / req.case_scale
    # over a bulk upload the vector is sent before this returns, so its buffer can serve the
    # next round (fedseg/privacy/buffers.py); inside a Flower reply it cannot
    env = get_envelope(msg.content)
    mreq = req.secagg.mask
    buf = (_UPLOAD_BUFFERS.take(mreq.vector_length)
           if env is not None and env.up is not None and mreq is not None else None)
    try:
        with agent(_run_id(msg), cfg, req.secagg) as ag:
            int_max = ag.config.int_max
            if req.dp is not None:  # clipped and noised here, before anything is masked
                delta = private_delta(cfg, req, delta, max_sites=ag.config.num_sites)
                weight = 1.0

            counts = mreq is not None and "num_samples" in mreq.int_fields  # plan_file jobs

            def values():
                ints: dict[str, object] = agg.train_ints(num_cases, loss, int_max, counts)
                if not req.per_site_metrics and req.eval_classes:
                    if evaluation is None:
                        ints.update(agg.eval_ints(0, {}, {}, req.eval_classes, int_max))
                    else:
                        ints.update(agg.eval_ints(evaluation.num_cases, evaluation.dice_per_class,
                                                  evaluation.hd95_per_class, req.eval_classes,
                                                  int_max))
                # the tensors themselves: weighted, quantised and masked block by block
                return delta, ints

            reply, vec = ag.process(req.secagg, values, weight=weight, buffer=buf)
        if vec is not None:
            faults.replay_masked(vec, req.round, cfg.cache_dir)  # tests only (client/faults.py)
        # a long-lived worker takes the unmask step from the rendezvous (listen_for_step)
        step = env.step if env is not None and _BACKGROUND["on"] and vec is not None else None
        if step is not None:
            reply = reply.model_copy(update={"listening": True})
        shown = evaluation if req.per_site_metrics else None
        rep = pm.TrainReply(site=cfg.site, iterations=iterations, seconds=seconds,
                            iterations_per_s=it_per_s, evaluation=shown, secagg=reply)
        arrays = {pm.SECAGG_VECTOR: vec} if vec is not None else None
        content = reply_content(msg, rep, arrays, endpoint_of(cfg.node_config))
    finally:
        _UPLOAD_BUFFERS.give(buf)
    if step is not None:  # the upload is with the server: wait for its unmask request
        listen_for_step(step, _run_id(msg), cfg)
    return Message(content, reply_to=msg)


def eval_reply(msg: Message, cfg: SiteLike,
               req: pm.EvalRequest, evaluation: pm.EvalReply) -> Message:
    """Final evaluation into the secure sum (``per_site_metrics = false``)."""
    assert req.secagg is not None
    with agent(_run_id(msg), cfg, req.secagg) as ag:

        def values():
            return np.zeros(0), agg.eval_ints(evaluation.num_cases, evaluation.dice_per_class,
                                              evaluation.hd95_per_class, req.eval_classes,
                                              ag.config.int_max)

        reply, vec = ag.process(req.secagg, values)
    rep = pm.EvalReply(site=cfg.site, num_cases=0, dice_per_class={}, hd95_per_class={},
                       seconds=evaluation.seconds, secagg=reply)
    arrays = {pm.SECAGG_VECTOR: vec} if vec is not None else None
    return Message(pack(rep, arrays), reply_to=msg)
