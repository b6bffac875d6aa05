"""docs/deploy.md's one-machine script, run VERBATIM (issue #16), default suite, real processes.

The blocks marked ``tested: onemachine`` at the end of the walk-through are joined in order and
run in ONE ``bash -euo pipefail`` in an empty folder, exactly as the doc prints them: provision
with loopback names, demo data, ``fedseg-server start`` and two ``fedseg-client`` sites in the
background (TLS, SuperNode authentication, the signed job, secure aggregation: the defaults),
the sites exiting 0 on the server's "job finished" (``exit_when_done``), then status, sites,
predict and evaluate. Nothing in the commands is rewritten: the test only sets the variables
of the ``tested: variables`` block, as a reader does — the checkout holding ``.venv``
(``FEDSEG_REPO``) and two free ports (``PORT``, ``SUPERLINK_PORT``) — and checks that the doc
asks the reader for exactly those. Whatever still runs when the script ends or times out (its
whole session) is stopped.

Measured on the 2-core development box with other work on it: about 1.5-2 minutes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from test_deploy import REPO, _env, doc_blocks

from fedseg.runtime.processes import free_port

TIMEOUT_S = 900  # a busy 2-core machine; about 2 minutes when it is not


def _script_and_variables() -> tuple[str, set[str]]:
    blocks = doc_blocks()
    (variables,) = [b for b in blocks if b.kind == "variables"]
    names = set(re.findall(r"\b([A-Z_]+)=", variables.text))
    script = "\n".join(b.text for b in blocks if b.kind == "onemachine")
    assert script, "docs/deploy.md has no 'tested: onemachine' blocks"
    return script, names


def test_one_machine_variables_are_the_ones_the_script_uses() -> None:
    script, names = _script_and_variables()
    assert names == {"FEDSEG_REPO", "PORT", "SUPERLINK_PORT"}, names
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", script))
    assert used == names, (used, names)  # nothing else is expected from the reader's shell
    assert "fedseg.example.org" not in script and "--server-san 127.0.0.1,localhost" in script
    assert '.venv/bin/activate"' in script  # the README's install does not put fedseg on PATH


def test_one_machine_script_runs_verbatim_to_a_finished_job(tmp_path: Path) -> None:
    script, _ = _script_and_variables()
    env = _env({"FEDSEG_REPO": str(REPO), "PORT": str(free_port()),
                "SUPERLINK_PORT": str(free_port())})
    env["PATH"] = os.defpath  # not our venv: the script activates it itself, as a reader does
    env.pop("VIRTUAL_ENV", None)
    out = tmp_path / "script.out"
    t0 = time.monotonic()
    with out.open("w") as f:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                                env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop_session(proc.pid)
    seconds = time.monotonic() - t0
    trial = tmp_path / "fedseg-trial"
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in
                     [out, *sorted(trial.glob("*.log"))] if p.is_file())
    assert code == 0, f"the one-machine script ended {code} after {seconds:.0f} s:\n{logs}"
    text = out.read_text()
    st = json.loads((trial / "runs" / "trial" / "status.json").read_text())
    assert st["state"] == "finished" and st["round"] == 1, st
    assert (trial / "runs" / "trial" / "model").is_dir()
    for site in ("hospitalA", "hospitalB"):
        log = (trial / f"{site}.log").read_text()
        assert "fedseg-client: job finished: 'trial'" in log, log[-2000:]
        # the start-up probe; a site that started before the server said why it waited
        assert "is fedseg-server's public port" in log, log[-2000:]
        assert all("(refused)" in ln for ln in log.splitlines() if "cannot connect" in ln), log
        assert re.search(rf"^{site}\s+\d+\s", text, re.M), text  # fedseg-server sites
    server_log = (trial / "server.log").read_text()
    assert "TLS, SuperNode authentication" in server_log and "job signed" in server_log
    assert "mean" in json.loads((trial / "pred" / "siteA-metrics.json").read_text())
    print(f"one-machine script: {seconds:.0f} s")


def _stop_session(sid: int) -> None:
    """SIGTERM, then SIGKILL, to whatever of the script's session still runs (the server and
    the sites stop their own children on SIGTERM)."""
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _session_pids(sid):
            time.sleep(0.5)


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (from /proc: field 6 of stat is the session id)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids
