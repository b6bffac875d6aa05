"""``fedseg-server sites``: which node id is which site, and which are online now.

Why: ``flwr supernode ls`` lists node ids and states only (Flower keeps no site name), while
the mapping lived in two files an admin had to know about: ``STATE_DIR/node_ids.json`` (written
when ``fedseg-server`` registers the roster's keys) and the run's ``metrics.jsonl`` (each
enrolment: site, node id; a restarted SuperNode of an unauthenticated trial enrols under a new
id). This command joins them and, while the server runs, adds the SuperLink's own view of each
node (``registered``, ``online``, ``offline``) over loopback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError
from fedseg.runtime.processes import flower_env, pid_alive

CONNECTION = "fedseg"  # server/cli.py writes this connection into STATE_DIR/.flwr


def site_table(state: Path, run_dir: Path | None) -> list[dict[str, Any]]:
    """One row per site (and per node id nobody could name): site, node, status, enrolled."""
    by_site: dict[str, dict[str, Any]] = {}
    ids = state / "node_ids.json"
    if ids.is_file():
        try:
            for site, nid in json.loads(ids.read_text()).items():
                by_site[site] = {"site": site, "node": int(nid), "enrolled": ""}
        except (ValueError, TypeError, AttributeError):
            raise FedsegError(f"{ids}: not a JSON object of site -> node id; it is rewritten at "
                              "the next 'fedseg-server start'") from None
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("phase") == "enrol" and rec.get("status") == "ok" and rec.get("site"):
                row = by_site.setdefault(rec["site"], {"site": rec["site"]})
                row["node"] = int(rec.get("node", row.get("node", 0)) or 0)
                row["enrolled"] = f"round {rec.get('round', '?')}"
    running = _running(state)
    live = _live_status(state) if running else {}
    for row in by_site.values():
        row["status"] = live.pop(row.get("node"), "not at the SuperLink" if running
                                 else "(server not running)")
    for nid, status in sorted(live.items()):  # known to the SuperLink, named nowhere
        by_site[f"?{nid}"] = {"site": "(unknown)", "node": nid, "status": status, "enrolled": ""}
    return sorted(by_site.values(), key=lambda r: (r["site"] == "(unknown)", r["site"]))


def _running(state: Path) -> bool:
    try:
        return pid_alive(int((state / "server.pid").read_text().strip()))
    except (OSError, ValueError):
        return False


def _live_status(state: Path) -> dict[int, str]:
    """node id -> the SuperLink's status (``flwr supernode ls`` over loopback); {} when the
    SuperLink does not answer."""
    if not (state / ".flwr" / "config.toml").is_file():
        return {}
    from fedseg.privacy.transport import list_nodes

    try:
        nodes = list_nodes(flower_env(state / ".flwr"), CONNECTION, timeout=60)
    except FedsegError:
        return {}
    return {int(n["node-id"]): str(n.get("status", "?")) for n in nodes}


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no sites known yet (no node_ids.json, no enrolment in the run folder)"
    head = ("site", "node id", "status", "last enrolled")
    body = [(r["site"], str(r.get("node", "")), str(r.get("status", "")), r.get("enrolled", ""))
            for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, tuple("-" * w for w in widths), *body))


def state_and_run(run_dir: str | None, state_dir: str) -> tuple[Path, Path | None]:
    """The state folder (from RUN_DIR/server.json when a run folder is given) and the run."""
    if not run_dir:
        return Path(state_dir).resolve(), None
    saved = Path(run_dir) / "server.json"
    if not saved.is_file():
        raise FedsegError(f"{saved}: missing; {run_dir} was not started by 'fedseg-server "
                          "start' (or give --state-dir)")
    try:
        state = json.loads(saved.read_text())["state_dir"]
    except (ValueError, KeyError, TypeError):
        raise FedsegError(f"{saved}: no 'state_dir' in it") from None
    return Path(state).resolve(), Path(run_dir)
