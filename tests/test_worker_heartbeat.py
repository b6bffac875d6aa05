"""The site worker outlives a task the SuperNode gave up: Flower's own heartbeat function raises
SIGINT in the process (right for one flwr-clientapp per task); the worker's logs and goes on.
(A SuperNode that refuses a live task's heartbeat cannot be arranged on demand, so the runtime
client is a stand-in answering what Flower's runtime API answers.)"""

from __future__ import annotations

import signal

import httpx
import pytest

from fedseg.client.worker import _task_heartbeat


class _Runtime:
    def __init__(self, answer: object) -> None:
        self.answer = answer

    def SendTaskHeartbeat(self, _req):  # noqa: N802 - Flower's name
        if isinstance(self.answer, Exception):
            raise self.answer
        return type("Res", (), {"success": self.answer})()


def _status(code: int) -> httpx.HTTPStatusError:
    req = httpx.Request("POST", "http://127.0.0.1/v1/runtime/send-task-heartbeat")
    return httpx.HTTPStatusError("x", request=req, response=httpx.Response(code, request=req))


@pytest.mark.parametrize("answer", [False, _status(401), _status(403)])
def test_refused_heartbeat_does_not_interrupt_the_worker(answer, capsys, monkeypatch) -> None:
    raised: list[int] = []
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    fn = _task_heartbeat(_Runtime(answer))
    assert fn() is True and fn() is True  # no retry storm, no SIGINT
    assert raised == []
    assert capsys.readouterr().out.count("refused this task's heartbeat") == 1


@pytest.mark.parametrize("answer", [httpx.ConnectError("down"), _status(503)])
def test_transient_failures_are_retried(answer) -> None:
    assert _task_heartbeat(_Runtime(answer))() is False


def test_accepted_heartbeat() -> None:
    assert _task_heartbeat(_Runtime(True))() is True
