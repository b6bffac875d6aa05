"""The Flower ClientApp: what a hospital's SuperNode runs for each server message.

Flower starts a fresh ClientApp process for every message and keeps nothing across a SuperNode
restart, so every handler rebuilds what it needs from the site's disk: the dataset (node config
``data-dir``), the plan-keyed preprocessed cache and the trainer's state (``cache-dir``). Only
aggregate quantities leave the site: the fingerprint's histograms/sums, the weight delta, case
counts and evaluation metrics. When the server runs the job with secure aggregation (the
default; node config ``identity-key`` and ``roster``) the fingerprint, the update, the case count
and the training loss leave the site only MASKED (``client/secure.py``; the server unmasks sums
over at least t sites), the site validates its own update before masking it, and the protocol's
private keys stay in ``CACHE_DIR/secagg/`` (0600). Errors the site can fix (bad data) come back
as an ``ErrorReply`` with one clear line instead of a remote traceback.

Test-only fault injection (OFF unless set): the environment variable ``FEDSEG_FAULT_INJECT`` of
the site's SuperNode (inherited by its ClientApp processes) makes the train handler misbehave on
purpose, so that the server's defences can be tested end to end with real processes:
``nan-update`` (every round) or ``nan-update@R`` (round R only) replaces the first tensor of the
update with NaN, which the server must reject. Nothing sets it outside tests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedseg.client import faults, secure
from fedseg.client.bulk_client import receive, reply_content
from fedseg.client.cases import train_val_ids
from fedseg.client.errors import PlainRequestRefused
from fedseg.client.job_end import record_job_end
from fedseg.client.site_config import SiteConfig, handler
from fedseg.errors import FedsegError
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, unpack

app = ClientApp()


def _require_masked(cfg: SiteConfig, masked: bool, what: str) -> None:
    if not masked and str(cfg.node_config.get("require-secure-aggregation", True)).lower() != "false":
        raise PlainRequestRefused(
            f"site '{cfg.site}' refuses to send its {what} unmasked: it requires secure "
            "aggregation; run the job with secure_aggregation = true (the default), or set "
            "require_secure_aggregation = false in the site's client.toml")


def _device_info(cfg: SiteConfig) -> tuple[str, float]:
    import torch

    from fedseg.training.predict import resolve_device

    dev = resolve_device(cfg.device)
    if cfg.gpu_memory_gb is not None:
        return str(dev), cfg.gpu_memory_gb
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return f"{dev} ({props.name})", props.total_memory / 1024**3
    return str(dev), 0.0


@app.query("enrol")
@handler
def enrol(msg: Message, cfg: SiteConfig) -> Message:
    from fedseg.data.dataset import read_dataset_json
    from fedseg.data.validate import validate_dataset

    problems = validate_dataset(cfg.data_dir)
    if problems:
        more = f" (and {len(problems) - 1} more; run 'fedseg check-data')" if len(problems) > 1 else ""
        raise FedsegError(problems[0] + more)
    req, _ = unpack(msg.content, pm.EnrolRequest)
    _require_masked(cfg, req.hide_case_counts, "case counts")
    ds = read_dataset_json(cfg.data_dir)
    train, val = train_val_ids(cfg.data_dir)
    device, gpu = _device_info(cfg)
    hide = req.hide_case_counts  # secure aggregation: the counts go into secure sums only
    reply = pm.EnrolReply(
        site=cfg.site, channel_names=ds.channel_names, labels=ds.labels,
        regions_class_order=ds.regions_class_order, file_ending=ds.file_ending,
        num_training_cases=None if hide else len(train),
        num_validation_cases=None if hide else len(val), gpu_memory_gb=gpu, device=device,
        secagg=secure.plain_part(msg, cfg, req.secagg),
    )
    return Message(pack(reply), reply_to=msg)


@app.query("fingerprint")
@handler
def fingerprint(msg: Message, cfg: SiteConfig) -> Message:
    from fedseg.planning.fingerprint import compute_fingerprint

    req, _ = unpack(msg.content, pm.FingerprintRequest)
    _require_masked(cfg, req.secagg is not None, "fingerprint")
    fp = compute_fingerprint(cfg.data_dir)
    vec = np.asarray(fp.to_vector(), dtype=np.float64)
    if req.secagg is not None:  # exactly encoded into the secure sum: only the sum is seen
        return secure.fingerprint_reply(msg, cfg, req.secagg, vec)
    return Message(pack(pm.FingerprintReply(site=cfg.site, num_cases=fp.num_cases),
                        {"fingerprint": vec}), reply_to=msg)


@app.query("prepare")
@handler
def prepare(msg: Message, cfg: SiteConfig) -> Message:
    from fedseg.planning.plan import Plan
    from fedseg.training.preprocess import PreprocessedDataset, preprocess_dataset

    req, _ = unpack(msg.content, pm.PrepareRequest)
    _require_masked(cfg, req.hide_case_counts, "case count")
    plan = Plan.model_validate_json(req.plan_json)
    t0 = time.monotonic()
    folder = preprocess_dataset(cfg.data_dir, plan, cfg.preprocessed_root, req.config)
    n = len(PreprocessedDataset(folder))
    part = secure.plain_part(msg, cfg, req.secagg)  # round 1's share keys ride here
    return Message(pack(pm.PrepareReply(site=cfg.site, num_cases=None if req.hide_case_counts else n,
                                        seconds=time.monotonic() - t0, secagg=part)),
                   reply_to=msg)


def _load_plan(cfg: SiteConfig, plan_hash: str):
    from fedseg.planning.plan import Plan

    path = cfg.preprocessed_root / plan_hash / "plan.json"
    if not path.is_file():
        raise FedsegError(f"{path}: no plan {plan_hash} at this site; the server must send "
                          "'prepare' first (restart the site to re-enrol)")
    return Plan.load(path)


def _evaluate(cfg: SiteConfig, plan, weights: dict[str, np.ndarray], rnd: int,
              fold: int = 0, folds: int = 1) -> pm.EvalReply:
    import torch

    from fedseg.training.predict import load_network, resolve_device
    from fedseg.training.preprocess import PreprocessedDataset, cache_folder
    from fedseg.training.validation import evaluate_cases

    _, val = train_val_ids(cfg.data_dir, fold, folds)
    device = resolve_device(cfg.device)
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
    net = load_network(plan, plan.default_configuration, state, cfg.preprocessed_root).to(device)
    ds = PreprocessedDataset(cache_folder(cfg.preprocessed_root, plan))
    missing: dict[str, int] = {}
    dice, hd, secs = evaluate_cases(net, plan, ds, val, device, hd95_missing=missing)
    return pm.EvalReply(site=cfg.site, num_cases=len(val), dice_per_class=dice,
                        hd95_per_class=hd, hd95_missing_per_class=missing, seconds=secs)


class _TrainerCache:
    """The last LocalTrainer OF EACH SITE, kept between rounds in a long-lived site worker
    (``client/worker.py``): no network rebuild, no state reload, data loader and (on a GPU) the
    compiled graph kept warm. Its state is still saved to disk every round (a crash loses
    nothing); a cached trainer is used only while the state file on disk is the one it wrote
    itself, so anything else that touched the state (another process, a restore) wins. Batches
    depend only on (seed, iteration), so a cached trainer trains exactly like a rebuilt one.

    One slot per site (``site``: the site's cache dir): a hospital's worker serves one site and
    keeps one trainer, as before; a worker serving several simulated sites
    (``fedseg simulate --sites-per-worker``) keeps each site's own, so the sites' rounds do not
    evict each other's trainer. Within a slot, one at a time: a new job or plan frees the old."""

    def __init__(self) -> None:
        self.slots: dict[str, tuple[tuple, object, tuple[int, int] | None]] = {}

    @staticmethod
    def _signature(state_dir: Path) -> tuple[int, int] | None:
        from fedseg.training.trainer import STATE_FILE

        try:
            st = (state_dir / STATE_FILE).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def take(self, key: tuple, state_dir: Path, site: str = ""):
        """The site's cached trainer for ``key`` (removed from the cache: a round that fails
        midway must not leave a half-updated trainer behind), or None."""
        slot = self.slots.pop(site, None)  # one per site at a time: free the old one
        if slot is None:
            return None
        cached_key, trainer, signature = slot
        ok = cached_key == key and signature is not None and self._signature(state_dir) == signature
        return trainer if ok else None

    def put(self, key: tuple, trainer, site: str = "") -> None:
        self.slots[site] = (key, trainer, self._signature(trainer.state_dir))


_TRAINERS = _TrainerCache()


@app.train()
@handler
def train(msg: Message, cfg: SiteConfig) -> Message:
    from fedseg.training.preprocess import cache_folder
    from fedseg.training.trainer import LocalTrainer, TrainConfig

    req, weights = receive(msg, pm.TrainRequest, cfg.bulk)
    _require_masked(cfg, req.secagg is not None, "model update and case count")
    plan = _load_plan(cfg, req.plan_hash)
    evaluation = (_evaluate(cfg, plan, weights, req.round - 1, req.fold, req.folds)
                  if req.evaluate_first else None)
    train_ids, _ = train_val_ids(cfg.data_dir, req.fold, req.folds)
    state_dir = cfg.cache_dir / "state" / req.job_id / req.plan_hash
    if req.folds > 1:  # each fold's model has its own trainer state
        state_dir = state_dir / f"fold_{req.fold}"
    tcfg = TrainConfig(device=cfg.device, seed=req.seed, total_iterations=req.global_total_iterations,
                       initial_lr=req.initial_lr, momentum=req.momentum,
                       save_weights=False)  # the server sends them every round
    key = (str(state_dir), plan.hash(), tcfg.model_dump_json(), tuple(train_ids))
    trainer = _TRAINERS.take(key, state_dir, site=str(cfg.cache_dir))
    if trainer is None:
        trainer = LocalTrainer(plan, cache_folder(cfg.preprocessed_root, plan), state_dir, tcfg,
                               case_ids=train_ids)
    import torch

    res = trainer.train_iterations(
        {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()},
        req.local_iterations, req.global_iteration_start, req.global_total_iterations,
        proximal_mu=req.proximal_mu, reset_momentum=req.reset_momentum,
    )
    _TRAINERS.put(key, trainer, site=str(cfg.cache_dir))
    delta = {f"d/{k}": (res.weights[k].numpy().astype(np.float32) - weights[k]) for k in weights}
    delta = _fault_injected(delta, req.round)  # test hook, off by default (module docstring)
    if req.secagg is not None:  # checked here, weighted, clipped and masked: see client/secure.py
        return secure.train_reply(
            msg, cfg, req, {k[len("d/"):]: v for k, v in delta.items()}, len(train_ids),
            res.loss, evaluation, res.iterations, res.seconds, res.iterations_per_s)
    if req.dp is not None:  # differential privacy: clipped + noise share before it leaves
        delta = secure.private_delta(cfg, req, delta)
    reply = pm.TrainReply(
        site=cfg.site, num_cases=len(train_ids), iterations=res.iterations, loss=res.loss,
        seconds=res.seconds, iterations_per_s=res.iterations_per_s, evaluation=evaluation,
    )
    return Message(reply_content(msg, reply, delta, cfg.bulk), reply_to=msg)


# ---- test-only fault injection (FEDSEG_FAULT_INJECT; see the module docstring) -------------
FAULT_ENV = "FEDSEG_FAULT_INJECT"


def _fault_injected(delta: dict[str, np.ndarray], rnd: int) -> dict[str, np.ndarray]:
    if not os.environ.get(FAULT_ENV, "").strip():
        return delta
    # the other kinds of fault act under secure aggregation (client/secure.py)
    if not any(f.kind == "nan-update" and f.round in (None, rnd) for f in faults.parse()):
        return delta
    first = next(iter(delta))
    print(f"[fedseg-client] {FAULT_ENV}: sending a NaN update in round {rnd}", flush=True)
    return {**delta, first: np.full_like(delta[first], np.nan)}
# ---- end of fault injection ------------------------------------------------------------------


@app.evaluate()
@handler
def evaluate(msg: Message, cfg: SiteConfig) -> Message:
    req, weights = receive(msg, pm.EvalRequest, cfg.bulk)
    plan = _load_plan(cfg, req.plan_hash)
    if req.cv_candidates:  # the job's selection: candidates from the kept CV predictions
        result = _score_candidates(cfg, plan, req)
    else:
        result = _evaluate(cfg, plan, weights, req.round, req.fold, req.folds)
        if req.keep_cv_predictions:
            from fedseg.training import cv_predictions as cvp

            _, val = train_val_ids(cfg.data_dir, req.fold, req.folds)
            cvp.store(plan, weights, cfg.data_dir, val,
                      cvp.store_dir(cfg.cache_dir, req.job_id, req.plan_hash), cfg.device)
    if req.secagg is not None:  # per-site metrics off: into the secure sum
        return secure.eval_reply(msg, cfg, req, result)
    return Message(pack(result), reply_to=msg)


def _score_candidates(cfg: SiteConfig, plan, req: pm.EvalRequest) -> pm.EvalReply:
    """Dice of the server's candidates (configurations and their ensembles) on this site's
    kept cross-validation predictions: means over its cases, keyed CANDIDATE/CLASS."""
    from fedseg.training import cv_predictions as cvp

    t0 = time.monotonic()
    stores = {name: [cvp.store_dir(cfg.cache_dir, req.job_id, h) for h in hashes]
              for name, hashes in req.cv_candidates.items()}
    dice, n = cvp.score_candidates(cfg.data_dir, plan, stores, req.cv_postprocess)
    return pm.EvalReply(site=cfg.site, num_cases=n, dice_per_class=dice, hd95_per_class={},
                        seconds=time.monotonic() - t0)


@app.query("share_keys")
@handler
def share_keys(msg: Message, cfg: SiteConfig) -> Message:
    """Secure aggregation set-up step (advertise / share keys) that rides on no other message."""
    return secure.step(msg, cfg)


@app.query("unmask")
@handler
def unmask(msg: Message, cfg: SiteConfig) -> Message:
    """Secure aggregation: shares to unmask round r (+ round r+1's share keys)."""
    return secure.step(msg, cfg)


@app.query("job_end")
def job_end(msg: Message, context: Context) -> Message:
    """The job ended on the server (fedseg/protocol/job_end.py): recorded for fedseg-client,
    which logs "job finished" (and exits with exit_when_done); nothing of the site is sent."""
    return record_job_end(msg, context)
