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
"""

from __future__ import annotations

import os
import signal
import sys
import time

from flwr.app import Message


def worker_argv(runtime_api: str) -> list[str]:
    """How supervisors (``fedseg-client``, ``fedseg simulate``) start a site's worker next to
    a SuperNode started with ``--isolation process`` and ``--port PORT``."""
    return [sys.executable, "-m", "fedseg.client.worker", "--runtime-api", runtime_api]


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


def run_task(runtime_address: str, token: str) -> None:
    """One ClientApp task in THIS process: what ``flwr-clientapp --token`` does (Flower 1.42's
    ``supernode/runtime/run_clientapp.py``), minus the process start, the bundle install and the
    ``sys.exit`` at the end. Kept close to Flower's code on purpose; flwr is pinned exactly."""
    import httpx
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
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
        retry_invoker=make_simple_http_retry_invoker(),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    t0 = t_pulled = t_ran = t_done = time.monotonic()
    try:
        message, context, _run, fab = pull_task_input(client)
        t_pulled = time.monotonic()
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
            print(f"[fedseg-worker] could not return the reply: {err}", flush=True)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    kind = message.metadata.message_type if message is not None else "?"
    if sub_status == SubStatus.COMPLETED:
        print(f"[fedseg-worker] {kind}: pull {t_pulled - t0:.2f} s, run {t_ran - t_pulled:.2f} s, "
              f"reply {t_done - t_ran:.2f} s", flush=True)


def run_executor(runtime_address: str, poll_s: float = 0.1) -> None:
    """Take the SuperNode's ClientApp tasks and run them here, one at a time, until stopped.

    The SuperNode runs with ``--isolation process``: it then starts no ``flower-superexec``
    and no ``flwr-clientapp`` process per message; this loop asks its runtime API for tasks
    every ``poll_s`` (Flower's superexec: every 1 s) and runs each in-process."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    acq = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    print(f"[fedseg-worker] taking ClientApp tasks from {runtime_address} (pid {os.getpid()})",
          flush=True)
    try:
        while True:
            try:
                res = acq.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
            except Exception as err:  # the SuperNode restarts: wait for it
                print(f"[fedseg-worker] runtime API not reachable ({err}); retrying", flush=True)
                time.sleep(2.0)
                continue
            if res.HasField("task") and res.token:
                run_task(runtime_address, res.token)
            else:
                time.sleep(poll_s)
    finally:
        acq.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fedseg.client.worker",
                                 description="fedseg site worker (started by fedseg-client)")
    ap.add_argument("--runtime-api", metavar="HOST:PORT", required=True,
                    help="take ClientApp tasks from this SuperNode (started with "
                    "--isolation process --port PORT)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from fedseg.runtime.flower_latency import fast_object_pulls

    fast_object_pulls()  # the task's arrays: retry after 50 ms, not 1-2-4-8 s (see that module)
    try:
        warm_imports()
        run_executor(args.runtime_api)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
