"""The site worker: one long-lived process per site that runs fedseg's ClientApp for its SuperNode.

Why: Flower 1.42 starts a FRESH ``flwr-clientapp`` process for every message (found by its
``flower-superexec``, which polls for tasks every second). For fedseg that meant, per message and
site, starting Python, importing flwr, installing the app bundle, then importing torch, MONAI
and torch's compiler stack (the first ``torch.optim`` optimizer pulls in ``torch._dynamo``):
3-6 s of CPU before any work, much more when several sites share a machine, and on a GPU a
new CUDA context every time. So ``fedseg-client`` (and ``fedseg simulate``) start the SuperNode
with ``--isolation process`` -- it then launches nothing itself -- and start this worker next to
it: the worker takes the SuperNode's ClientApp tasks from its local runtime API (what
``flower-superexec`` does) and runs each IN THIS PROCESS (what ``flwr-clientapp`` does), with
torch and MONAI already loaded. Flower has no public API for that loop, so :func:`run_task`
follows Flower 1.42's ``run_clientapp`` closely (flwr is pinned exactly).

Two more properties a hospital gets from it: the site runs only fedseg's own INSTALLED ClientApp
(the job's bundle must name ``fedseg.client.app:app``; bundle code is never installed or
imported), and nothing is lost if the worker dies: everything that must survive a crash lives
on the site's disk (trainer state, caches, secure-aggregation keys), the SuperNode reports the
message as failed, and the supervisor restarts the worker.

One worker, several sites (``fedseg simulate --sites-per-worker N``, ``Federation(...,
sites_per_worker=N)``, the benchmarks): a hospital runs ONE site, so ``fedseg-client`` always
starts one worker for its one SuperNode. A simulation of many sites on one machine, though, would
pay for torch, MONAI and fedseg's training code once PER SITE (~0.8 GB resident each: 30 sites
need ~24 GB) although the sites' tasks are small and a 2-core machine runs only two at a time.
So the worker takes ``--runtime-api`` more than once: it asks each of its SuperNodes in turn for
a task and runs it with THAT task's context -- the node config (site name, data and cache dirs,
identity key, roster) comes with every task from its own SuperNode, so nothing here is tied to a
site. What the ClientApp keeps in memory between tasks is kept per site (``client/app.py``'s
trainer cache is keyed by the site's cache dir); everything else lives on each site's disk as
before. Tasks run one at a time per worker (as they would on a shared core); a site whose
SuperNode is down is skipped and asked again 2 s later, and a SuperNode lost mid-task fails only
that task (Flower's own HTTP retries would wait for it forever: :func:`_shared_retry_invoker`).
Measured (``bench/secagg.py --configs 1e6x30``, 2 cores): 30 sites in 6 workers peak at 11.5 GB
for the whole federation, of which the workers ~4.4 GB and the 30 SuperNodes ~5.5 GB (Flower's
own process, ~120 MB of imports each before any message).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import Message


def worker_argv(runtime_api: str | Sequence[str]) -> list[str]:
    """How supervisors (``fedseg-client``, ``fedseg simulate``) start a site's worker next to
    a SuperNode started with ``--isolation process`` and ``--port PORT``; several addresses:
    one worker for several simulated sites (module docstring)."""
    addresses = [runtime_api] if isinstance(runtime_api, str) else list(runtime_api)
    if not addresses:
        raise ValueError("a site worker needs at least one runtime API address")
    argv = [sys.executable, "-m", "fedseg.client.worker"]
    for address in addresses:
        argv += ["--runtime-api", address]
    return argv


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def warm_imports() -> None:
    """Pay the imports once at start, not during the first round: torch, MONAI, fedseg's
    training code, and ``torch._dynamo`` that the first ``torch.optim`` optimizer pulls in."""
    import torch

    import fedseg.client.app  # noqa: F401
    import fedseg.training.trainer  # noqa: F401
    import fedseg.training.validation  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


FEDSEG_CLIENTAPP = "fedseg.client.app:app"


def _check_fab(fab_content: bytes) -> None:
    """The site worker runs only fedseg's OWN installed ClientApp: the job's app bundle must
    name it (its code is never installed or imported here). Signatures of the bundle are checked
    by the SuperNode before the task exists (``--trusted-entities``)."""
    from flwr.common.config import get_fab_config

    comp = get_fab_config(fab_content).get("tool", {}).get("flwr", {}).get("app", {}).get(
        "components", {})
    if comp.get("clientapp") != FEDSEG_CLIENTAPP:
        raise PermissionError(
            f"the app bundle's clientapp is {comp.get('clientapp')!r}; this site runs only "
            f"{FEDSEG_CLIENTAPP!r} (fedseg's installed ClientApp)")


SHARED_TASK_RETRY_S = 30.0


def _shared_retry_invoker(max_tries: int | None, max_time: float | None) -> Any:
    """Flower's HTTP retry invoker, bounded, for a worker serving SEVERAL SuperNodes. Flower's
    retries a lost SuperNode forever and SIGINTs its own process on a 401 (what a task token
    from before a SuperNode restart gets): right for a worker of one site (its supervisor
    restarts both), but it would stall or end the worker for ALL its sites when ONE site's
    SuperNode is killed or restarted. With this one, that site's task fails and the others go
    on; a 401 gives up instead of interrupting the process."""
    import httpx
    from flwr.supercore.retry import make_simple_http_retry_invoker

    invoker = make_simple_http_retry_invoker()
    invoker.max_tries, invoker.max_time = max_tries, max_time
    flower_giveup = invoker.should_giveup

    def giveup(exc: Exception) -> bool:
        if (isinstance(exc, httpx.HTTPStatusError)
                and exc.response.status_code == httpx.codes.UNAUTHORIZED):
            return True
        return bool(flower_giveup(exc)) if flower_giveup is not None else False

    invoker.should_giveup = giveup
    return invoker


def _task_heartbeat(client: Any) -> Any:
    """Flower's task heartbeat (``flwr.supercore.heartbeat.make_task_heartbeat_fn_http``) minus
    the process kill: when the SuperNode refuses a heartbeat (it gave the task up, e.g. after a
    restart or a long stall) Flower's function raises SIGINT in the process — right for one
    ``flwr-clientapp`` process per task, fatal for a long-lived worker (seen under load: a worker
    that exited mid-round left its site out until the round timed out). Here the refusal is
    logged once; the task's reply then fails on its own and the worker takes the next task."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    req = SendTaskHeartbeatRequest()
    warned = [False]

    def refused(why: str) -> bool:
        if not warned[0]:
            warned[0] = True
            print(f"[fedseg-worker] {time.strftime('%H:%M:%S')} the SuperNode refused this task's "
                  f"heartbeat ({why}); its reply may be lost", flush=True)
        return True  # keep the sender's normal interval: nothing to retry

    def fn() -> bool:
        try:
            res = client.SendTaskHeartbeat(req)
        except httpx.TransportError:
            return False  # retried by the sender, as Flower's
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            return refused(f"HTTP {err.response.status_code}")
        return True if res.success else refused("task unknown")

    return fn


def run_task(runtime_address: str, token: str, shared: bool = False) -> None:
    """One ClientApp task in THIS process: what ``flwr-clientapp --token`` does (Flower 1.42's
    ``supernode/runtime/run_clientapp.py``), minus the process start, the bundle install and the
    ``sys.exit`` at the end. Kept close to Flower's code on purpose; flwr is pinned exactly.
    ``shared``: this worker serves several sites: the log lines name the site, and a lost
    SuperNode is retried for ``SHARED_TASK_RETRY_S`` at most (:func:`_shared_retry_invoker`)."""
    import httpx
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    from fedseg.client.app import app as client_app

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=(_shared_retry_invoker(None, SHARED_TASK_RETRY_S) if shared
                       else make_simple_http_retry_invoker()),
    )
    heartbeat = HeartbeatSender(_task_heartbeat(client))
    heartbeat.start()
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    t0 = t_pulled = t_ran = time.monotonic()
    t_done: float | None = None  # the reply went back
    try:
        message, context, _run, fab = pull_task_input(client)
        t_pulled = time.monotonic()
        _fault_hold(message.metadata.message_type)
        _check_fab(fab.content)
        reply = client_app(message=message, context=context)
        t_ran = time.monotonic()
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # as flwr-clientapp: an error reply, the task marked failed
        print(f"[fedseg-worker] task failed: {ex!r}", flush=True)
        details = f"{type(ex)}:<'{ex}'>"
        code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, PermissionError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, sub_status, details)
            t_done = time.monotonic()
        except httpx.HTTPError as err:
            where = f" to {runtime_address}" if shared else ""
            print(f"[fedseg-worker] could not return the reply{where}: {err}", flush=True)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    kind = message.metadata.message_type if message is not None else "?"
    if shared:
        kind = f"{context.node_config.get('site', '?') if context is not None else '?'} {kind}"
    if sub_status == SubStatus.COMPLETED and t_done is not None:
        print(f"[fedseg-worker] {time.strftime('%H:%M:%S')} {kind}: pull {t_pulled - t0:.2f} s, "
              f"run {t_ran - t_pulled:.2f} s, reply {t_done - t_ran:.2f} s", flush=True)


FAULT_HOLD_ENV = "FEDSEG_FAULT_HOLD"


def _fault_hold(message_type: str) -> None:
    """Test-only (OFF unless set, like ``FEDSEG_FAULT_INJECT`` in client/app.py):
    ``FEDSEG_FAULT_HOLD=TYPE:SECONDS`` makes the worker sit on a task of that message type
    (e.g. ``query.fingerprint:120``) after taking it, so that a test can kill the worker while it
    provably holds a task (tests/test_adversarial_process.py). Nothing sets it outside tests."""
    spec = os.environ.get(FAULT_HOLD_ENV, "")
    kind, _, seconds = spec.partition(":")
    if kind and kind == message_type:
        print(f"[fedseg-worker] {FAULT_HOLD_ENV}: holding the {kind} task for {seconds} s",
              flush=True)
        time.sleep(float(seconds or 60))


@dataclass
class _Site:
    """One SuperNode this worker takes tasks from: its runtime API and when to ask it next."""

    address: str
    client: Any  # flwr's RuntimeHttpClient for AcquireTask
    next_try: float = 0.0
    down: bool = False


UNREACHABLE_RETRY_S = 2.0
POLL_S = 0.1  # a hospital's worker, one SuperNode: a task is picked up within 0.1 s
# a worker serving several sites: each idle ask costs its SuperNode an HTTP request, and all
# sites wait idle most of a round (measured, 30 idle sites in 6 workers on 2 cores: asking every
# 0.1 s kept 0.6 cores busy in the SuperNodes and 0.2 in the workers, every 0.5 s 0.24 and 0.05).
# Only the first task after an idle spell waits longer: after a task the next site is asked at
# once, and the SuperNodes themselves poll the SuperLink every 0.5 s.
SHARED_POLL_S = 0.5


def run_executor(runtime_address: str | Sequence[str], poll_s: float | None = None) -> None:
    """Take the SuperNodes' ClientApp tasks and run them here, one at a time, until stopped.

    The SuperNodes run with ``--isolation process``: they then start no ``flower-superexec``
    and no ``flwr-clientapp`` process per message; this loop asks their runtime APIs for tasks
    (one after the other, then waits ``poll_s`` when none had one: ``POLL_S`` for one site,
    ``SHARED_POLL_S`` for several; Flower's superexec: every 1 s) and runs each in-process. One
    address: a hospital's site worker; several: one worker serving several simulated sites
    (module docstring)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    addresses = [runtime_address] if isinstance(runtime_address, str) else list(runtime_address)
    if not addresses:
        raise ValueError("a site worker needs at least one runtime API address")
    several = len(addresses) > 1
    sites = [_Site(address, RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        # several sites: one that is down must not hold up the others (asked again later)
        retry_invoker=(_shared_retry_invoker(1, None) if several
                       else make_simple_http_retry_invoker()),
    )) for address in addresses]
    if poll_s is None:
        poll_s = SHARED_POLL_S if several else POLL_S
    print(f"[fedseg-worker] taking ClientApp tasks from {', '.join(addresses)} "
          f"(pid {os.getpid()})", flush=True)
    try:
        while True:
            ran = False
            for site in sites:
                if time.monotonic() < site.next_try:
                    continue
                try:
                    res = site.client.AcquireTask(AcquireTaskRequest(
                        supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
                except Exception as err:  # the SuperNode (re)starts: ask again later
                    if not site.down:
                        print(f"[fedseg-worker] runtime API {site.address} not reachable "
                              f"({err}); retrying every {UNREACHABLE_RETRY_S:g} s", flush=True)
                    site.down, site.next_try = True, time.monotonic() + UNREACHABLE_RETRY_S
                    continue
                if site.down:
                    print(f"[fedseg-worker] runtime API {site.address} reachable", flush=True)
                    site.down = False
                if res.HasField("task") and res.token:
                    ran = True
                    if not several:
                        run_task(site.address, res.token)
                        continue
                    try:  # one site's failure (its SuperNode gone, its run stopped) is its own
                        run_task(site.address, res.token, shared=True)
                    except Exception as err:
                        print(f"[fedseg-worker] task from {site.address} abandoned: {err!r}",
                              flush=True)
            if not ran:
                waits = [s.next_try - time.monotonic() for s in sites]
                time.sleep(poll_s if min(waits) <= poll_s else min(min(waits), UNREACHABLE_RETRY_S))
    finally:
        for site in sites:
            site.client.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fedseg.client.worker",
                                 description="fedseg site worker (started by fedseg-client)")
    ap.add_argument("--runtime-api", metavar="HOST:PORT", required=True, action="append",
                    help="take ClientApp tasks from this SuperNode (started with "
                    "--isolation process --port PORT); given several times: one worker for "
                    "several simulated sites, asked in turn (fedseg simulate --sites-per-worker)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from fedseg.client import redact

    redact.install()  # no bulk-transfer token reaches worker.log (client/redact.py)
    from fedseg.runtime.flower_latency import fast_object_pulls

    fast_object_pulls()  # the task's arrays: retry after 50 ms, not 1-2-4-8 s (see that module)
    try:
        warm_imports()
        from fedseg.client.secure import enable_background_steps

        enable_background_steps()  # this process outlives its messages (client/secure.py)
        run_executor(args.runtime_api)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
