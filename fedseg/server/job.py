"""The federated job as the ServerApp runs it: the driver that runs the phases in order.

enrolment → federated fingerprint → plan → sites preprocess → R rounds (train k iterations,
aggregate deltas, evaluate the global model every E rounds) → final evaluation and model bundle.
With cross-validation (``folds`` K >= 2) the rounds, final evaluation and bundle repeat for
each fold's model and the job's bundle is their ensemble (``phases/crossval.py``).
Each phase is a module of ``server/phases/`` acting on the job's
:class:`~fedseg.server.job_context.JobContext`; with secure aggregation the fingerprint sum,
the rounds and the final evaluation are ``server/secure_rounds.py``'s instead. This module
decides only what runs when: resume, the rounds loop with its retries, the checkpoints.

Why hand-written instead of a Flower strategy's ``start()``: the job has phases a strategy does
not know (fingerprint, plan, preprocessing), the sites send DELTAS whose weighted SUM is all the
server may see once secure aggregation is on, and the run must be resumable from our own
checkpoint (Flower has no resume). Flower's ``Grid`` still does all the messaging
(``server/messaging.py``).

Secure aggregation (``cfg.secure_aggregation``, on by default): the fingerprint and every
round's update are summed with SecAgg, the server unmasking only sums over at least t sites
(message flow and the one extra exchange per round: ``server/secure_rounds.py``), and the sites
keep their case counts and training losses to themselves (they are only in the secure sums).
Updates are then validated at the sites.

Faults. Before every round the membership is refreshed (``phases/enrolment.py``): vanished
nodes are forgotten, new ones (a site restarted: a new node id) are enrolled and prepared, and
replace the old entry of the same site name. A site that dies mid-round is reported by Flower as
a NODE_UNAVAILABLE error reply within about a minute (two missed heartbeats);
``round_timeout_s`` bounds a site that hangs. Such sites are logged ``dropped``, updates that
fail ``check_update`` (NaN, shape, norm) ``rejected``, each with the reason; the round counts
when at least ``min_sites`` good updates arrived, else ``on_too_few_sites`` decides (wait
``site_wait_s`` for sites and retry, skip, or fail); implausible secure sums are ``refused`` and
the round retried (``robust.refused_retries``). A crashed server resumes from the last
checkpoint (``run_job`` with ``cfg.resume``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedseg.errors import FedsegError
from fedseg.planning.plan import Plan
from fedseg.privacy.dp import JobAccountant
from fedseg.server import secure_rounds
from fedseg.server.bulk_server import BulkServer
from fedseg.server.config import JobConfig
from fedseg.server.job_context import JobContext, Log
from fedseg.server.messaging import Messenger
from fedseg.server.phases import (
    crossval,
    enrolment,
    evaluation,
    finish,
    planning,
    selection,
    training,
)
from fedseg.server.phases.initial_model import initial_weights
from fedseg.server.phases.preprocess import prepare
from fedseg.server.plausibility import robust_config
from fedseg.server.secure_state import SecureAggregation


class FederatedJob:
    def __init__(self, grid: Grid, cfg: JobConfig, log: Log = print, run_id: int = 0,
                 net: Messenger | None = None) -> None:
        self.run_id = int(run_id)  # Flower's: secure-aggregation round ids start with it
        self.ctx = JobContext.create(grid, cfg, log, net)

    # ------------------------------------------------------------------ driver
    def run_job(self) -> None:
        """All phases (:meth:`_run_job`), with the bulk-transfer server up meanwhile."""
        ctx, cfg = self.ctx, self.ctx.cfg
        if cfg.bulk_transport == "http":
            ctx.bulk = BulkServer(Path(cfg.run_dir) / ".bulk", cfg.bulk_listen, cfg.bulk_url)
            try:
                ctx.bulk.start()
            except OSError as err:
                raise FedsegError(f"job config: field 'bulk_listen': cannot serve bulk transfers "
                                  f"on {cfg.bulk_listen} ({err})") from None
            ctx.log(f"bulk transfers: {ctx.bulk.url or '(the sites server address)'}/fedseg/bulk/ "
                    f"(listening on port {ctx.bulk.port})")
            ctx.run.log({"phase": "transport", "bulk_transport": "http",
                         "bulk_url": ctx.bulk.url, "bulk_port": ctx.bulk.port})
        try:
            self._run_job()
        finally:
            if ctx.bulk is not None:
                ctx.bulk.stop()

    def _run_job(self) -> None:
        """All phases. With ``cfg.resume`` and a checkpoint in the run folder, the job continues
        after the last completed round with the saved plan, global weights and server-optimiser
        state (a new Flower run: Flower cannot resume one). The sites' preprocessed caches are
        keyed by the plan's hash and their trainer state by job id + plan hash, so they continue
        too."""
        ctx, cfg = self.ctx, self.ctx.cfg
        (Path(cfg.run_dir) / "job.json").write_text(cfg.model_dump_json(indent=2) + "\n")
        ck_hash = self.restore() if cfg.resume and ctx.run.plan_path.exists() else None
        resuming = ck_hash is not None
        if resuming:
            crossval.use_plan(ctx, Plan.load(ctx.run.plan_path))
            if ck_hash and ck_hash != ctx.plan.hash():
                raise FedsegError(
                    f"{ctx.run.checkpoint_path('last')} was made with plan {ck_hash}, but "
                    f"{ctx.run.plan_path} has plan {ctx.plan.hash()}; cannot resume"
                )
        ctx.run.set_status(phase="enrolment", round=ctx.state.round, rounds=cfg.total_rounds,
                           state="running", error=None)
        if cfg.dp.enabled:  # ε composes over the whole job, resumes included (fedseg/privacy/dp.py)
            ctx.privacy = JobAccountant(cfg.dp.resolve(cfg.total_rounds),
                                        Path(cfg.run_dir) / "dp_accountant.json", resuming)
            ctx.log(f"differential privacy on: {ctx.privacy.config.model_dump()}")
        first_secure_round = self._start_secure_aggregation(resuming) if cfg.secure_aggregation else ""
        nodes = enrolment.wait_for_nodes(ctx, cfg.min_sites, cfg.enrol_timeout_s)
        # sites that join later set their keys up with their first round
        enrolment.enrol(ctx, nodes, advertise=first_secure_round)
        if len(ctx.sites) < cfg.min_sites:
            raise FedsegError(
                f"only {len(ctx.sites)} site(s) enrolled, min_sites={cfg.min_sites}; "
                "see metrics.jsonl for why the others were refused"
            )
        if resuming:
            assert ctx.plan is not None
            ctx.log(f"resuming after round {ctx.state.round} of {cfg.total_rounds} "
                    f"(plan {ctx.plan.hash()})")
            ctx.run.log({"phase": "resume", "round": ctx.state.round, "rounds": cfg.total_rounds,
                         "model": ctx.state.model,
                         "plan_hash": ctx.plan.hash(), "sites": len(ctx.sites),
                         "optimizer_state": bool(ctx.opt.m or ctx.opt.v)})
        elif cfg.plan_file:
            crossval.use_plan(ctx, planning.fixed_plan(ctx, Path(cfg.plan_file)))
        else:
            crossval.use_plan(ctx, planning.federated_plan(ctx, secure_round=first_secure_round))
        assert ctx.plan is not None
        if not resuming:
            ctx.state.weights = initial_weights(ctx.plan, cfg.seed)
            self.checkpoint()
        prepare(ctx, list(ctx.sites), share_round=ctx.state.round + 1)
        while True:  # one model, or the fold models one after the other (phases/crossval.py)
            self._rounds(until=(ctx.state.model + 1) * cfg.rounds)
            self._final_evaluation()
            if cfg.models == 1:
                finish.export(ctx)
                break
            crossval.finish_fold(ctx)
            if ctx.state.model + 1 == cfg.models:
                selection.finish(ctx)
                break
            crossval.start_next_model(ctx)
            self.checkpoint()
        ctx.run.set_status(phase="done", state="finished", round=ctx.state.round)

    def _final_evaluation(self) -> None:
        """The (fold's) final model scored on every site's validation cases."""
        ctx = self.ctx
        enrolment.refresh_sites(ctx)
        ctx.checkpoints.wait()
        if ctx.secure is not None and not ctx.cfg.per_site_metrics:
            secure_rounds.final_evaluation(ctx)
        else:
            evaluation.final_evaluation(ctx)

    def _rounds(self, until: int) -> None:
        """The training rounds after the last completed one up to ``until``, each checkpointed;
        a round that fails is retried, skipped or ends the job (module docstring)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        train_round = secure_rounds.train_round if ctx.secure is not None else training.train_round
        rnd = ctx.state.round + 1
        retries = 0
        while rnd <= until:
            nodes = enrolment.wait_for_sites(ctx, cfg.site_wait_s)
            ctx.run.set_status(phase="training", round=rnd,
                               sites={ctx.name(n): "active" for n in nodes})
            model, local = cfg.model_of(rnd)
            # a model's round 1: its untrained weights (a later model's: not worth a message)
            evaluate_first = (local - 1) % cfg.eval_every == 0 and not (model and local == 1)
            pooled = train_round(ctx, rnd, evaluate_first, nodes)
            if pooled["status"] == "refused" and retries < robust_config(cfg).refused_retries:
                retries += 1  # implausible sums, not applied (server/plausibility.py)
                ctx.log(f"round {rnd}: refused, retry {retries}/"
                        f"{robust_config(cfg).refused_retries} with the global model unchanged")
                continue
            if pooled["status"] != "ok":
                if cfg.on_too_few_sites == "fail":
                    raise FedsegError(f"round {rnd}: only {pooled['sites_ok']} good update(s), "
                                      f"min_sites={cfg.min_sites}")
                if cfg.on_too_few_sites == "retry" and retries < cfg.max_retries:
                    retries += 1
                    ctx.log(f"round {rnd}: too few sites, retry {retries}/{cfg.max_retries} "
                            f"(waiting up to {cfg.site_wait_s:.0f} s for sites)")
                    continue
                ctx.log(f"round {rnd}: too few sites, skipped (global model unchanged)")
                ctx.run.log({"phase": "train", "round": rnd, "site": "pooled",
                             "status": "skipped", "reason": pooled.get("reason", "")})
            retries = 0
            ctx.state.round = rnd
            self.checkpoint()
            ctx.log(f"round {rnd}/{cfg.total_rounds} done: {json.dumps(pooled)}")
            rnd += 1

    def _start_secure_aggregation(self, resuming: bool) -> str:
        """Secure aggregation on (the default): roster and threshold from the job config; returns
        the round id whose keys the enrolment advertises: the first aggregation's (the
        fingerprint, or on resume or with a fixed plan the next training round). See
        ``secure_rounds`` for the message flow."""
        ctx, cfg = self.ctx, self.ctx.cfg
        if not cfg.roster:
            raise FedsegError(
                "secure aggregation is on (the default) but the job has no roster: set "
                "roster = 'PKI/roster.json' (from 'fedseg provision') in the job config, or "
                "secure_aggregation = false"
            )
        sec = ctx.secure = SecureAggregation(cfg.roster, cfg.secagg_threshold, cfg.secagg_clip,
                                             cfg.name, self.run_id)
        if resuming or cfg.plan_file:  # no fingerprint sum: the keys are the next round's
            rid = sec.new_round("train", ctx.state.round + 1)
            sec.next_train[ctx.state.round + 1] = rid
        else:
            rid = sec.new_round("fingerprint", 0)
        ctx.log(f"secure aggregation on: {len(sec.config.roster)} sites in the roster, "
                f"threshold {sec.config.threshold}, clip {sec.config.clip}")
        return rid

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> None:
        """Write ``last`` in the background (``server/checkpoints.py``): the global model, the
        server optimiser's moments, the best Dice so far and the plan's hash."""
        ctx = self.ctx
        ctx.checkpoints.wait()
        state: dict[str, Any] = {
            "round": ctx.state.round,
            "weights": ctx.state.weights,
            "optimizer": {k: dict(v) for k, v in ctx.opt.state_dict().items()},
            "best_dice": ctx.state.best_dice,
            "model": ctx.state.model,
            "plan_hash": ctx.plan.hash() if ctx.plan else "",
        }
        every = ctx.cfg.snapshot_every
        ctx.checkpoints.write(state, snapshot=bool(every and ctx.state.round % every == 0))

    def restore(self) -> str | None:
        """The state of checkpoint ``last`` into the job; returns the hash of the plan it was
        made with ("" when it does not say), None without a checkpoint."""
        ctx = self.ctx
        ck = ctx.run.load_checkpoint("last")
        if ck is None:
            return None
        ctx.state.round = int(ck["round"])
        ctx.state.weights = dict(ck["weights"])
        ctx.opt.load_state_dict(ck.get("optimizer", {}))
        ctx.state.best_dice = float(ck.get("best_dice", -1.0))
        ctx.state.model = int(ck.get("model", 0))
        return str(ck.get("plan_hash", ""))
