"""Shared pieces of the federation benchmarks: a synthetic model, a process-tree RSS sampler and
per-round statistics.

Only NumPy and the standard library: this module is also shipped inside the Flower app bundle of
``bench/flower_baseline.py`` (the ServerApp builds its initial model with :func:`model_arrays`).
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# relative widths of the encoder stages of a small 3-D conv net; the widths double per stage as
# in a U-Net encoder, so a handful of conv kernels hold nearly all parameters
_STAGES = (1, 2, 4, 8, 16)
_KERNEL = (3, 3, 3)
_KVOL = math.prod(_KERNEL)


def _conv_net_spec(params: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a conv-net-like state dict holding exactly ``params`` elements."""
    # encoder weights for base width w: 27 * (w + 2w² + 8w² + 32w² + 128w²) = 27 * (170w² + w);
    # aim them at ~90 % of the budget and let a final conv (+ a 1-D remainder) take the rest
    w = int(math.sqrt(0.9 * params / (_KVOL * 170)))
    if w < 1:
        return [("head.weight", (params,))]
    spec: list[tuple[str, tuple[int, ...]]] = []
    c_in = 1
    for i, mult in enumerate(_STAGES):
        c_out = w * mult
        spec += [
            (f"encoder.{i}.conv.weight", (c_out, c_in, *_KERNEL)),
            (f"encoder.{i}.norm.weight", (c_out,)),
            (f"encoder.{i}.norm.bias", (c_out,)),
        ]
        c_in = c_out
    rest = params - sum(math.prod(s) for _, s in spec)
    k = rest // (c_in * _KVOL)
    if k > 0:
        spec.append(("head.conv.weight", (k, c_in, *_KERNEL)))
        rest -= k * c_in * _KVOL
    if rest > 0:
        spec.append(("head.conv.bias", (rest,)))
    return spec


def model_arrays(params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic float32 arrays totalling exactly ``params`` elements, shaped like the state
    dict of a 3-D conv net (five big conv kernels, a head, small norm vectors)."""
    if params < 1:
        raise ValueError(f"params must be >= 1, got {params}")
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in _conv_net_spec(int(params)):
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, dtype=np.float32)
        elif name.endswith(("norm.bias", "conv.bias")):
            out[name] = np.zeros(shape, dtype=np.float32)
        else:
            arr = rng.standard_normal(shape, dtype=np.float32)
            arr *= np.float32(0.05)
            out[name] = arr
    assert sum(a.size for a in out.values()) == params
    return out


# ---------------------------------------------------------------------------------------------
# RSS of process trees
# ---------------------------------------------------------------------------------------------

_PROC = Path("/proc")


def _children_map() -> dict[int, list[int]]:
    """pid -> child pids, from fedseg's own /proc walk (``runtime/processes.py``)."""
    from fedseg.runtime.processes import _parent_map

    children: dict[int, list[int]] = {}
    for pid, parent in _parent_map().items():
        children.setdefault(parent, []).append(pid)
    return children


def _tree(roots: list[int], children: dict[int, list[int]]) -> set[int]:
    out: set[int] = set()
    todo = [p for p in roots if p]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS), 0 if it is gone or a zombie."""
    try:
        with open(_PROC / str(pid) / "status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds (user + system) used so far by the process trees under ``roots``, including
    children that have exited and been reaped (their time is in the parents' cutime/cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _tree([int(p) for p in roots if p], _children_map()):
        try:
            stat = (_PROC / str(pid) / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
        total += sum(int(x) for x in fields[11:15])
    return total / tick


def system_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat, idle and iowait excluded)."""
    with open(_PROC / "stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    busy = sum(vals[:8]) - vals[3] - vals[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples the summed RSS of whole process trees every ``interval`` seconds, in a thread.

    ``groups()`` maps a role name to the root pids of that role; it is called on every tick
    (roots may appear later or be replaced) and each root's descendants (found through the
    ``ppid`` in ``/proc/*/stat``) count towards its role. A process reachable from two roles
    counts once, for the first role. Records the peak of each role's sum and the peak of the sum
    over all roles (``"total"``, taken at one instant, so it can be below the sum of role peaks).

        with RssSampler(lambda: {"server": [p1], "sites": [p2, p3]}) as s:
            ...
        s.peaks()  # {"server": ..., "sites": ..., "total": ...} in bytes
    """

    def __init__(self, groups: Callable[[], dict[str, list[int]]], interval: float = 0.2) -> None:
        self.groups = groups
        self.interval = interval
        self._peaks: dict[str, int] = {"total": 0}
        self.names: dict[str, set[str]] = {}  # role -> process names (comm) ever seen in it
        self._samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, int]:
        """Take one sample now (also folded into the peaks); returns role -> bytes."""
        try:
            groups = self.groups()
        except Exception:  # noqa: BLE001 - a failing callback must not kill the sampler
            groups = {}
        children = _children_map()
        seen: set[int] = set()
        now: dict[str, int] = {}
        for role, roots in groups.items():
            pids = _tree([int(p) for p in roots if p], children) - seen
            seen |= pids
            now[role] = sum(rss_bytes(p) for p in pids)
            names = self.names.setdefault(role, set())
            for p in pids:
                try:
                    names.add((_PROC / str(p) / "comm").read_text().strip())
                except OSError:
                    pass
        now["total"] = sum(now.values())
        with self._lock:
            self._samples += 1
            for role, value in now.items():
                if value > self._peaks.get(role, 0):
                    self._peaks[role] = value
                else:
                    self._peaks.setdefault(role, 0)
        return now

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def start(self) -> RssSampler:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def samples(self) -> int:
        return self._samples

    def peaks(self) -> dict[str, int]:
        """Peak bytes per role and ``"total"`` (peak of the simultaneous sum over roles)."""
        with self._lock:
            return dict(self._peaks)


# ---------------------------------------------------------------------------------------------
# per-round statistics
# ---------------------------------------------------------------------------------------------


def round_stats(times: list[float]) -> dict:
    """Mean/median/min/max of per-round seconds. With 3 or more rounds, round 1 is left out
    (warm-up: first connections, imports, first ClientApp start-up); ``warmup_excluded`` says
    whether it was."""
    times = [float(t) for t in times]
    exclude = len(times) >= 3
    used = times[1:] if exclude else times
    out: dict = {
        "rounds_total": len(times),
        "rounds_used": len(used),
        "warmup_excluded": exclude,
        "note": ("round 1 excluded (warm-up)" if exclude
                 else "all rounds used (fewer than 3, no warm-up exclusion)"),
    }
    if used:
        out.update(mean=statistics.fmean(used), median=statistics.median(used),
                   min=min(used), max=max(used))
    else:
        out.update(mean=None, median=None, min=None, max=None)
    return out


def run_configs(name: str, configs: list, run_one: Callable[..., dict],
                table: Callable[[list[dict]], str], out: Path, argv: list[str]) -> list[dict]:
    """Run ``run_one(*config)`` for each config of a comparison bench, printing each row's table
    and rewriting ``out`` (JSON: bench, command, seconds, rows) after every config, so a long
    run that is stopped keeps what it measured."""
    import json

    rows: list[dict] = []
    t0 = time.monotonic()
    for cfg in configs:
        print(f"== {cfg[0] / 1e6:.0f}M x {cfg[1]} sites", flush=True)
        rows.append(run_one(*cfg))
        print(table(rows[-1:]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "bench": name, "command": f"python bench/{name}.py " + " ".join(argv),
            "seconds": round(time.monotonic() - t0, 1), "rows": rows}, indent=2) + "\n")
    print(table(rows))
    return rows
