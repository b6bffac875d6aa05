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
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedseg.data.dataset_json import DatasetJson
from fedseg.errors import FedsegError
from fedseg.planning.plan import Plan
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, payload_bytes, unpack
from fedseg.server.aggregate import (
    ServerOptimizer,
    State,
    UpdateRejected,
    check_update,
    weighted_mean,
)
from fedseg.server.config import JobConfig
from fedseg.server.rundir import RunDir

Log = Callable[[str], None]


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
    def __init__(self, grid: Grid, cfg: JobConfig, log: Log = print) -> None:
        self.grid = grid
        self.cfg = cfg
        self.log = log
        self.run = RunDir(cfg.run_dir)
        self.sites: dict[int, Site] = {}
        self.plan: Plan | None = None
        self.state = JobState()
        self.opt = ServerOptimizer(cfg.aggregation)

    # ------------------------------------------------------------------ messaging helpers
    def _send(
        self, node_ids: Iterable[int], mtype: str, content_for: Callable[[int], Any],
        timeout: float,
    ) -> dict[int, Message]:
        msgs = []
        sent_bytes: dict[int, int] = {}
        for nid in node_ids:
            content = content_for(nid)
            sent_bytes[nid] = payload_bytes(content)
            msgs.append(Message(content=content, dst_node_id=nid, message_type=mtype))
        self._sent_bytes = sent_bytes
        replies = self.grid.send_and_receive(msgs, timeout=timeout)
        return {r.metadata.src_node_id: r for r in replies}

    def _name(self, nid: int) -> str:
        s = self.sites.get(nid)
        return s.info.site if s else f"node-{nid}"

    def _reply_error(self, reply: Message | None) -> str | None:
        if reply is None:
            return "no reply before the timeout"
        if reply.has_error():
            return f"error {reply.error.code}: {reply.error.reason}"
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
        """Ask nodes who they are; drop the ones that fail; check consistency."""
        replies = self._send(node_ids, pm.ENROL, lambda _: pack(pm.Empty()), timeout=300)
        new = []
        for nid in node_ids:
            r = replies.get(nid)
            err = self._reply_error(r)
            if err is None:
                try:
                    info, _ = unpack(r.content, pm.EnrolReply)
                except pm.ProtocolError as perr:
                    err = str(perr)
            if err is not None:
                self.log(f"enrolment: node {nid} refused: {err}")
                self.run.log({"phase": "enrol", "node": nid, "status": "refused", "reason": err})
                continue
            self.sites[nid] = Site(nid, info)
            new.append(nid)
            self.run.log({"phase": "enrol", "site": info.site, "node": nid, "status": "ok",
                          "cases": info.num_training_cases, "gpu_memory_gb": info.gpu_memory_gb,
                          "device": info.device})
        self._check_consistent()
        return new

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
        replies = self._send(nodes, pm.FINGERPRINT, lambda _: pack(pm.Empty()), timeout=3600)
        vectors = []
        for nid in nodes:
            r = replies.get(nid)
            err = self._reply_error(r)
            if err is not None:
                raise FedsegError(f"fingerprint: site '{self._name(nid)}' failed: {err}")
            _, arrays = unpack(r.content, pm.FingerprintReply)
            vectors.append(arrays["fingerprint"])
        total = np.sum(np.stack(vectors), axis=0)
        info = self.sites[nodes[0]].info
        ds = DatasetJson(channel_names=info.channel_names, labels=info.labels,
                         file_ending=info.file_ending)
        gpus = [s.info.gpu_memory_gb for s in self.sites.values() if s.info.gpu_memory_gb > 0]
        budget = self.cfg.gpu_memory_gb or (min(gpus) if gpus else 8.0)
        plan = plan_from_fingerprint_sum(total, ds, gpu_memory_gb=budget,
                                         dataset_name=Path(self.cfg.run_dir).name,
                                         preset=self.cfg.plan_preset)
        plan.save(self.run.plan_path)
        self.run.log({"phase": "plan", "plan_hash": plan.hash(), "sites": len(nodes),
                      "gpu_memory_gb": budget})
        return plan

    def prepare(self, node_ids: list[int]) -> list[int]:
        assert self.plan is not None
        req = pm.PrepareRequest(plan_json=self.plan.model_dump_json())
        self.run.set_status(phase="preprocess")
        replies = self._send(node_ids, pm.PREPARE, lambda _: pack(req), timeout=3600)
        ok = []
        for nid in node_ids:
            r = replies.get(nid)
            err = self._reply_error(r)
            if err is not None:
                self.log(f"preprocess: site '{self._name(nid)}' failed: {err}")
                self.run.log({"phase": "prepare", "site": self._name(nid), "status": "failed",
                              "reason": err})
                self.sites.pop(nid, None)
                continue
            rep, _ = unpack(r.content, pm.PrepareReply)
            self.sites[nid].prepared_for = self.plan.hash()
            self.run.log({"phase": "prepare", "site": rep.site, "status": "ok",
                          "cases": rep.num_cases, "seconds": rep.seconds})
            ok.append(nid)
        return ok

    def init_weights(self) -> State:
        import torch

        from fedseg.models.network import build_network

        assert self.plan is not None
        torch.manual_seed(self.cfg.seed)
        net = build_network(self.plan)
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}

    def refresh_sites(self) -> None:
        """Enrol and prepare nodes that (re)joined since the last round; forget vanished ones."""
        current = set(self.grid.get_node_ids())
        for nid in list(self.sites):
            if nid not in current:
                self.log(f"site '{self._name(nid)}' disconnected")
                self.run.log({"phase": "membership", "site": self._name(nid), "node": nid,
                              "status": "disconnected", "round": self.state.round + 1})
                self.sites.pop(nid)
        fresh = sorted(current - set(self.sites))
        if fresh:
            new = self.enrol(fresh)
            # a site that restarts comes back as a new node: drop its old entry if still there
            names = {}
            for nid, s in sorted(self.sites.items()):
                if s.info.site in names and nid in new:
                    self.sites.pop(names[s.info.site], None)
                names[s.info.site] = nid
            if new:
                self.prepare(new)

    # ------------------------------------------------------------------ rounds
    def train_round(self, rnd: int, evaluate_first: bool) -> dict[str, Any]:
        """One round; returns the pooled record (also logged)."""
        assert self.plan is not None
        cfg = self.cfg
        t0 = time.monotonic()
        nodes = [n for n, s in self.sites.items() if s.prepared_for == self.plan.hash()]
        total_its = cfg.rounds * cfg.local_iterations
        req = pm.TrainRequest(
            round=rnd, job_id=cfg.job_id or Path(cfg.run_dir).name,
            local_iterations=cfg.local_iterations,
            global_iteration_start=(rnd - 1) * cfg.local_iterations,
            global_total_iterations=total_its, plan_hash=self.plan.hash(),
            proximal_mu=cfg.proximal_mu if cfg.aggregation.kind == "fedprox" else 0.0,
            seed=cfg.seed, evaluate_first=evaluate_first,
        )
        content = pack(req, self.state.weights)
        replies = self._send(nodes, pm.TRAIN, lambda _: content, timeout=cfg.round_timeout_s)
        deltas, weights, losses, evals = [], [], [], []
        for nid in nodes:
            name = self._name(nid)
            r = replies.get(nid)
            err = self._reply_error(r)
            rec: dict[str, Any] = {"phase": "train", "round": rnd, "site": name,
                                   "bytes_sent": self._sent_bytes.get(nid, 0)}
            if err is None:
                try:
                    rep, arrays = unpack(r.content, pm.TrainReply)
                    delta = {k[len("d/"):]: v for k, v in arrays.items() if k.startswith("d/")}
                    norm = check_update(delta, self.state.weights, cfg.max_update_norm)
                except (pm.ProtocolError, UpdateRejected) as rej:
                    rec.update(status="rejected", reason=str(rej),
                               bytes_received=payload_bytes(r.content))
                    self.log(f"round {rnd}: update from '{name}' rejected: {rej}")
                    self.run.log(rec)
                    continue
                rec.update(status="ok", loss=rep.loss, cases=rep.num_cases,
                           iterations=rep.iterations, seconds=rep.seconds,
                           it_per_s=rep.iterations_per_s, update_norm=norm,
                           bytes_received=payload_bytes(r.content))
                deltas.append(delta)
                weights.append(float(rep.num_cases))
                losses.append((rep.loss, rep.num_cases))
                if rep.evaluation is not None:
                    evals.append((name, rep.evaluation))
            else:
                rec.update(status="dropped", reason=err)
                self.log(f"round {rnd}: site '{name}' dropped: {err}")
            self.run.log(rec)
        if evals:
            self._log_eval(rnd - 1, evals)
        pooled: dict[str, Any] = {"phase": "train", "round": rnd, "site": "pooled",
                                  "sites_ok": len(deltas), "sites_asked": len(nodes)}
        if len(deltas) < cfg.min_sites:
            pooled.update(status="too_few_sites", seconds=round(time.monotonic() - t0, 3))
            self.run.log(pooled)
            return pooled
        mean_delta = weighted_mean(deltas, weights)
        self.state.weights = self.opt.step(self.state.weights, mean_delta)
        pooled.update(
            status="ok",
            loss=float(sum(lo * n for lo, n in losses) / max(1, sum(n for _, n in losses))),
            cases=int(sum(weights)), seconds=round(time.monotonic() - t0, 3),
        )
        self.run.log(pooled)
        return pooled

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
                          "mean_dice": float(np.mean(list(e.dice_per_class.values()))),
                          "seconds": e.seconds})
        mean = float(np.mean(list(pooled_dice.values()))) if pooled_dice else float("nan")
        self.run.log({"phase": "eval", "round": after_round, "site": "pooled", "cases": tot,
                      "dice": pooled_dice, "hd95": pooled_hd, "mean_dice": mean})
        self.run.set_status(latest_dice=mean, latest_eval_round=after_round)
        if after_round > 0 and mean > self.state.best_dice:
            self.state.best_dice = mean
            best = self.run.load_checkpoint("last")
            if best is not None and best.get("round") == after_round:
                self.run.save_checkpoint("best", best)
        return mean

    def final_evaluation(self) -> None:
        assert self.plan is not None
        nodes = list(self.sites)
        req = pm.EvalRequest(round=self.state.round, plan_hash=self.plan.hash())
        content = pack(req, self.state.weights)
        self.run.set_status(phase="final-evaluation")
        replies = self._send(nodes, pm.EVALUATE, lambda _: content, timeout=self.cfg.round_timeout_s)
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
        self.run.save_checkpoint("last", {
            "round": self.state.round,
            "weights": self.state.weights,
            "optimizer": self.opt.state_dict(),
            "best_dice": self.state.best_dice,
            "plan_hash": self.plan.hash() if self.plan else "",
        })

    def restore(self) -> bool:
        ck = self.run.load_checkpoint("last")
        if ck is None:
            return False
        self.state.round = int(ck["round"])
        self.state.weights = dict(ck["weights"])
        self.opt.load_state_dict(ck.get("optimizer", {}))
        self.state.best_dice = float(ck.get("best_dice", -1.0))
        return True

    # ------------------------------------------------------------------ driver
    def run_job(self) -> None:
        cfg = self.cfg
        (Path(cfg.run_dir) / "job.json").write_text(cfg.model_dump_json(indent=2) + "\n")
        self.run.set_status(phase="enrolment", round=0, rounds=cfg.rounds, state="running")
        nodes = self.wait_for_nodes(cfg.min_sites, cfg.enrol_timeout_s)
        self.enrol(nodes)
        if len(self.sites) < cfg.min_sites:
            raise FedsegError(
                f"only {len(self.sites)} site(s) enrolled, min_sites={cfg.min_sites}; "
                "see metrics.jsonl for why the others were refused"
            )
        resumed = cfg.resume and self.run.plan_path.exists() and self.restore()
        if resumed:
            self.plan = Plan.load(self.run.plan_path)
            self._check_consistent()
            self.log(f"resuming after round {self.state.round} of {cfg.rounds}")
            self.run.log({"phase": "resume", "round": self.state.round})
        else:
            self.plan = self.fingerprint_and_plan()
        self.prepare(list(self.sites))
        if not resumed:
            self.state.weights = self.init_weights()
            self.checkpoint()
        rnd = self.state.round + 1
        retries = 0
        while rnd <= cfg.rounds:
            self.refresh_sites()
            self.run.set_status(phase="training", round=rnd,
                                sites={s.info.site: "active" for s in self.sites.values()})
            evaluate_first = (rnd - 1) % cfg.eval_every == 0  # round 1: the untrained model
            pooled = self.train_round(rnd, evaluate_first)
            if pooled["status"] != "ok":
                if cfg.on_too_few_sites == "fail":
                    raise FedsegError(f"round {rnd}: only {pooled['sites_ok']} site(s) replied, "
                                      f"min_sites={cfg.min_sites}")
                if cfg.on_too_few_sites == "retry" and retries < cfg.max_retries:
                    retries += 1
                    self.log(f"round {rnd}: too few sites, retry {retries}/{cfg.max_retries}")
                    continue
                self.log(f"round {rnd}: too few sites, skipped (global model unchanged)")
            retries = 0
            self.state.round = rnd
            self.checkpoint()
            self.log(f"round {rnd}/{cfg.rounds} done: {json.dumps(pooled)}")
            rnd += 1
        self.refresh_sites()
        self.final_evaluation()
        self.export()
        self.run.set_status(phase="done", state="finished", round=self.state.round)

    def export(self) -> None:
        import torch

        from fedseg.models.bundle import BundleInfo, save_bundle

        assert self.plan is not None
        ds = DatasetJson(channel_names=self.plan.channel_names, labels=self.plan.labels,
                         file_ending=self.plan.file_ending, name=self.plan.dataset_name)
        state = {k: torch.from_numpy(v) for k, v in self.state.weights.items()}
        save_bundle(self.run.model_dir, self.plan, ds, state,
                    BundleInfo(trained_iterations=self.state.round * self.cfg.local_iterations,
                               note=f"federated job {self.cfg.job_id}, {self.state.round} rounds"))
        from fedseg.server.report import write_report

        write_report(self.run)


def unpack_error(reply: Message) -> tuple[pm.ErrorReply, dict]:
    return unpack(reply.content, pm.ErrorReply)  # type: ignore[return-value]
