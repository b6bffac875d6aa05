"""CPU training speed with OpenMP threads that spin vs sleep while they wait, on an idle and on
a busy machine (``OMP_WAIT_POLICY``; fedseg sets PASSIVE unless the user chose, fedseg/__init__).

Why: a hospital's server and CI share their cores. libgomp's default lets a waiting thread spin,
which on a busy machine holds a core the other torch thread needs; each barrier then costs a
scheduler time slice. This measures ``bench/train_step.py --tiny`` (fedseg end to end, rate b)
in fresh processes for each policy, alternating, with ``--busy N`` busy-loop processes running
beside it (0 = the machine as it is).

    python bench/cpu_threads.py --busy 0 2 --repeats 2 --json bench/results/cpu_threads.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _spin(stop: mp.Event) -> None:  # type: ignore[valid-type]
    x = 0
    while not stop.is_set():
        x += 1


def measure(policy: str, iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        subprocess.run([sys.executable, str(HERE / "train_step.py"), "--device", "cpu", "--tiny",
                        "--skip-nnunet", "--iterations", str(iterations), "--json", str(out)],
                       env=env, check=True, capture_output=True, timeout=1800)
        r = json.loads(out.read_text())
    return {"a_compute_it_s": r["a_compute_it_s"], "b_fedseg_it_s": r["b_fedseg_it_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 2],
                    help="busy-loop processes beside the measurement (one run per value)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for busy in args.busy:
        stop = mp.Event()
        procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
        for p in procs:
            p.start()
        try:
            for rep in range(args.repeats):
                order = ("ACTIVE", "PASSIVE") if rep % 2 == 0 else ("PASSIVE", "ACTIVE")
                for policy in order:
                    t0 = time.time()
                    r = measure(policy, args.iterations)
                    rows.append({"busy_processes": busy, "policy": policy, "repeat": rep,
                                 "load_1min": os.getloadavg()[0],
                                 "seconds": round(time.time() - t0, 1), **r})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            stop.set()
            for p in procs:
                p.join(5)
    summary = {}
    for busy in args.busy:
        for policy in ("ACTIVE", "PASSIVE"):
            vals = [r["b_fedseg_it_s"] for r in rows
                    if r["busy_processes"] == busy and r["policy"] == policy]
            summary[f"busy{busy}_{policy}_b_it_s_mean"] = round(sum(vals) / len(vals), 3)
        summary[f"busy{busy}_passive_over_active"] = round(
            summary[f"busy{busy}_PASSIVE_b_it_s_mean"] / summary[f"busy{busy}_ACTIVE_b_it_s_mean"],
            2)
    out = {"cpus": os.cpu_count(), "rows": rows, "summary": summary}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
