"""Per-round federation overhead and server peak RAM: fedseg (plain aggregation) vs Flower's own
plain FedAvg (Message API) on the same workload, in the same run, on loopback.

    .venv/bin/python bench/federation.py --json bench/results/federation.json

Workload per (parameters, sites): a model of P float32 parameters, N sites, R rounds, all real
processes on 127.0.0.1 (one SuperLink, N SuperNodes). Flower: ``bench/flower_baseline.py``
(FedAvg with its default settings, i.e. a train exchange and an evaluate exchange per round;
clients send the model back plus noise, no training). fedseg: ``bench/fedseg_run.py`` (the real
ServerApp/ClientApp/site worker on the demo data, a U-Net widened to P parameters, one local
iteration per round; the sites' own compute is subtracted). Both report the median round time
over rounds 2..R (round 1 is a warm-up). Before each run the script waits until the rest of the
machine is idle (``--wait-quiet``), since other work on a 2-core box inflates every figure.

Targets (issue #3): fedseg's per-round overhead <= 0.5 x Flower's plain FedAvg round at 30M x 5;
server peak RAM (SuperLink + ServerApp process trees) <= 3 x model size + 1 GB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from common import run_configs  # noqa: E402
from fedseg_run import run_fedseg  # noqa: E402

from bench.flower_baseline import run_flower, wait_quiet  # noqa: E402

GB = 1024**3


def _median(res: dict, key: str = "stats") -> float:
    return float(res.get(key, {}).get("median", float("nan")))


def compare(work: Path, params: int, sites: int, rounds: int, quiet_s: float) -> dict:
    wait_quiet(quiet_s)
    fl = run_flower(work / f"flower-{params}-{sites}", params, sites, rounds)
    wait_quiet(quiet_s)
    fs = run_fedseg(work / f"fedseg-{params}-{sites}", params, sites, rounds, secure=False)
    model_bytes = 4 * fs["params"]
    ram_target = 3 * model_bytes + GB
    fl_round, fs_over = _median(fl), _median(fs, "overhead_stats")
    return {
        "params": fs["params"], "sites": sites, "rounds": rounds, "model_bytes": model_bytes,
        "flower_round_s": fl_round,
        "flower_train_exchange_s": _median(fl, "train_phase_stats"),
        "fedseg_round_s": _median(fs), "fedseg_site_compute_s": fs["site_compute_seconds"],
        "fedseg_overhead_s": fs_over,
        "overhead_ratio": fs_over / fl_round if fl_round > 0 else float("nan"),
        "server_peak_rss_bytes": {"fedseg": fs["peak_rss_bytes"].get("server", 0),
                                  "flower": fl["peak_rss_bytes"].get("server", 0)},
        "server_ram_target_bytes": ram_target,
        "server_ram_ok": fs["peak_rss_bytes"].get("server", 0) <= ram_target,
        "status": {"flower": fl["status"], "fedseg": fs["status"]},
        "raw": {"flower": fl, "fedseg": fs},
    }


def table(rows: list[dict]) -> str:
    out = ["| params x sites | Flower FedAvg s/round | fedseg s/round | fedseg overhead s/round "
           "| overhead / Flower | server peak RAM fedseg / Flower (GB) | RAM target (GB) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = r["server_peak_rss_bytes"]
        out.append(
            f"| {r['params'] / 1e6:.1f}M x {r['sites']} | {r['flower_round_s']:.1f} | "
            f"{r['fedseg_round_s']:.1f} | {r['fedseg_overhead_s']:.1f} | "
            f"{r['overhead_ratio']:.2f} | {rss['fedseg'] / GB:.2f} / {rss['flower'] / GB:.2f} | "
            f"{r['server_ram_target_bytes'] / GB:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, nargs="+", default=[1e6, 8e6, 30e6])
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedseg-bench-federation"))
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "federation.json")
    ap.add_argument("--wait-quiet", type=float, default=120.0, metavar="S",
                    help="before each run wait up to S s for the rest of the machine to idle")
    a = ap.parse_args(argv)
    configs = [(int(p), n) for p in a.params for n in a.sites]
    run_configs("federation", configs,
                lambda p, n: compare(a.work, p, n, a.rounds, a.wait_quiet), table, a.json,
                sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
