"""One fedseg federation on loopback for the benchmarks: N sites, a model of ~P parameters.

The same machinery a consortium runs (``fedseg.simulate.Federation``: a real SuperLink, one real
SuperNode per site, the job submitted with ``flwr run``), on the built-in demo data with a plan
whose U-Net is widened to the wanted parameter count (``plan_file``: the fingerprint phase is
skipped, the sites preprocess, then the rounds). Each site does ONE local iteration on a 16^3
patch per round, so the round time is almost all federation machinery; the sites' own compute
(training + evaluation seconds they report) is subtracted to give the per-round OVERHEAD. The
global model is evaluated in round 1 only (the untrained model): in fedseg the evaluation rides
on the training message, so evaluating every round would add site compute (subtracted anyway)
but no exchange — and a CPU sliding window over a 30M-parameter network only makes the bench
longer and noisier.

Site workers (``fedseg/client/worker.py``): up to ``MAX_WORKERS`` sites each get a worker of
their own, as at a hospital; above that, sites share workers (``sites_per_worker``, at most
``MAX_WORKERS`` worker processes): each worker loads torch and MONAI (~0.8 GB), so 30 sites with
one each would need ~24 GB. A shared worker runs its sites' tasks one after the other, which a
2-core machine does anyway.

Round time = wall time between the server's pooled records of consecutive rounds (so it includes
the server's aggregation, checkpointing and membership refresh). Round 1 is a warm-up (first
model build, caches) and is excluded from the statistics when there are at least 3 rounds.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RssSampler, round_stats  # noqa: E402

from fedseg.planning.plan import Plan  # noqa: E402

MAX_WORKERS = 6  # site worker processes a bench starts at most (sites_per_worker=None: auto)


def auto_sites_per_worker(sites: int, max_workers: int = MAX_WORKERS) -> int:
    """1 (a worker per site) up to ``max_workers`` sites, else as few per worker as keep the
    worker processes at ``max_workers`` or fewer."""
    return max(1, math.ceil(sites / max_workers))


def bench_plan(base: Plan, params: int) -> tuple[Plan, int]:
    """``base`` with its U-Net features scaled so the network has about ``params`` weights
    (nnU-Net's doubling per stage, capped at 10x the first stage as 32 -> 320), patch 16^3 per
    axis where the pooling allows, batch 1: the bench measures the federation, not the GPU."""
    from fedseg.models.network import build_network, num_parameters

    def with_base(b: int) -> Plan:
        p = base.model_copy(deep=True)
        c = p.configurations["3d_fullres"]
        c.features_per_stage = [min(b * 2**i, 10 * b) for i in range(c.n_stages)]
        c.batch_size = 1
        total = [1] * len(c.patch_size)  # overall downsampling per axis
        for st in c.strides:
            total = [t * x for t, x in zip(total, st, strict=True)]
        c.patch_size = [max(t, 16 // t * t) for t in total]
        c.data_identifier = f"{c.data_identifier}_bench"
        p.configurations = {"3d_fullres": c}
        return p

    @functools.cache
    def count(b: int) -> int:
        return num_parameters(build_network(with_base(b)))

    lo, hi = 1, 2
    while count(hi) < params:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # parameters grow ~b^2: bisect on the first-stage width
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < params else (lo, mid)
    b = lo if abs(count(lo) - params) <= abs(count(hi) - params) else hi
    return with_base(b), count(b)


def run_fedseg(
    work: Path, params: int, sites: int, rounds: int, secure: bool = False,
    timeout: float = 1800.0, cases: int = 3, site_workers: bool = True,
    sites_per_worker: int | None = None,
) -> dict:
    """``sites_per_worker``: None picks :func:`auto_sites_per_worker`."""
    from fedseg.data.demo import make_demo_data
    from fedseg.planning.cli_impl import plan_main
    from fedseg.server.config import JobConfig
    from fedseg.server.rundir import RunDir
    from fedseg.simulate import Federation, follow

    work = Path(work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    site_dirs = make_demo_data(work / "data", sites=sites, cases=cases, test_cases=0, seed=0)
    plan_path = work / "bench-plan.json"
    plan, n_params = bench_plan(plan_main(site_dirs, plan_path, preset="tiny"), params)
    plan.save(plan_path)
    job = JobConfig(
        run_dir=str(work / "run"), job_id=f"bench-{params}-{sites}", min_sites=sites,
        rounds=rounds, local_iterations=1, eval_every=rounds + 1, plan_file=str(plan_path),
        secure_aggregation=secure, enrol_timeout_s=300, round_timeout_s=timeout,
        site_wait_s=60, on_too_few_sites="fail",
    )
    run = RunDir(job.run_dir)
    t0 = time.monotonic()
    per_worker = auto_sites_per_worker(sites) if sites_per_worker is None else sites_per_worker
    with Federation(work, site_dirs, device="cpu", site_workers=site_workers,
                    sites_per_worker=per_worker) as fed:
        fed.require_secure_aggregation = secure
        def groups() -> dict[str, list[int]]:
            return {"server": [fed.superlink.pid] if fed.superlink and fed.superlink.pid else [],
                    "sites": [p.pid for p in [*fed.nodes.values(), *fed.workers.values()]
                              if p.pid]}

        with RssSampler(groups) as rss:
            fed.start_superlink()
            for d in site_dirs:
                fed.start_site(d)
            run_id = fed.submit(job)
            status = follow(fed, run_id, run, timeout, quiet=True)
        peaks = rss.peaks()
    recs = run.read_metrics()
    pooled = {r["round"]: r for r in recs if r.get("phase") == "train" and r.get("site") == "pooled"}
    starts = [r for r in recs if r.get("phase") in ("plan", "prepare")]
    prev = max(r["time"] for r in starts) if starts else None
    round_s, compute_s = [], []
    for rnd in sorted(pooled):
        t = pooled[rnd]["time"]
        round_s.append(round(t - prev, 3) if prev is not None else math.nan)
        prev = t
        per_site = {}
        for r in recs:
            if r.get("phase") == "train" and r.get("round") == rnd and r.get("site") != "pooled":
                per_site[r["site"]] = per_site.get(r["site"], 0.0) + float(r.get("seconds") or 0)
            if r.get("phase") == "eval" and r.get("round") == rnd - 1 and r.get("site") != "pooled":
                per_site[r["site"]] = per_site.get(r["site"], 0.0) + float(r.get("seconds") or 0)
        compute_s.append(round(max(per_site.values()) if per_site else 0.0, 3))
    overhead = [round(a - b, 3) for a, b in zip(round_s, compute_s, strict=True)]
    return {
        "system": "fedseg-secure" if secure else "fedseg-plain",
        "site_workers": site_workers,
        "sites_per_worker": per_worker if site_workers else None,
        "worker_processes": len(fed.workers),
        "params": n_params, "params_target": params, "sites": sites, "rounds": rounds,
        "round_seconds": round_s, "site_compute_seconds": compute_s,
        "overhead_seconds": overhead, "stats": round_stats(round_s),
        "overhead_stats": round_stats(overhead),
        "peak_rss_bytes": peaks, "status": status, "state": run.status().get("state"),
        "wall_seconds": round(time.monotonic() - t0, 1),
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secure", action="store_true")
    ap.add_argument("--no-site-workers", action="store_true",
                    help="run every message in a fresh ClientApp process (Flower's default)")
    ap.add_argument("--sites-per-worker", type=int, metavar="N",
                    help=f"sites per site worker process (default: 1 up to {MAX_WORKERS} "
                    f"sites, else at most {MAX_WORKERS} workers)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedseg-bench"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = run_fedseg(a.work, a.params, a.sites, a.rounds, a.secure,
                     site_workers=not a.no_site_workers, sites_per_worker=a.sites_per_worker)
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
