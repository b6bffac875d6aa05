"""Bulk array transfer (fedseg/protocol/bulk.py): the server's HTTP end and the site's, for real
on 127.0.0.1 — round trips are bit-exact, tokens are capabilities (unknown, reused, oversized and
foreign uploads are refused), uploads are read back lazily, and nothing is left on disk."""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, Metadata, RecordDict

from fedseg.client.bulk_client import BulkEndpoint, receive, reply_content
from fedseg.errors import FedsegError
from fedseg.protocol import messages as pm
from fedseg.protocol.bulk import BulkUploaded, get_envelope, layout_of
from fedseg.protocol.records import payload_bytes
from fedseg.server.bulk_server import BulkServer
from fedseg.server.outbox import Outbox, strip_prefix


@pytest.fixture
def bulk(tmp_path: Path):
    srv = BulkServer(tmp_path / "spool").start()
    yield srv
    srv.stop()
    assert not (tmp_path / "spool").exists()


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"enc.w": rng.standard_normal((8, 4, 3, 3, 3)).astype(np.float32),
            "enc.b": rng.standard_normal(8).astype(np.float32),
            "steps": np.array(7, dtype=np.int64),
            "big": rng.standard_normal(3_000_000).astype(np.float32)}  # > one 4 MB chunk


def _msg(content: RecordDict, nid: int = 1, reply_to: str = "") -> Message:
    md = Metadata(run_id=1, message_id=f"m{nid}{reply_to}", src_node_id=0, dst_node_id=nid,
                  reply_to_message_id=reply_to, group_id="", created_at=0.0, ttl=600.0,
                  message_type=pm.EVALUATE)
    return Message(content, metadata=md)


def _put(srv: BulkServer, token: str, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("PUT", f"/fedseg/bulk/{token}", body=body)
    status = conn.getresponse().status
    conn.close()
    return status


def test_download_is_bit_exact_and_by_reference(bulk: BulkServer) -> None:
    m = _model()
    down = bulk.offer(m)
    got = BulkEndpoint().fetch(down)
    assert list(got) == list(m)
    for k, v in m.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert np.array_equal(got[k], v)
    bulk.withdraw(down)
    with pytest.raises(FedsegError, match="404"):
        BulkEndpoint().fetch(down)


def test_upload_is_read_back_lazily_and_deleted(bulk: BulkServer, tmp_path: Path) -> None:
    m = {f"d/{k}": v for k, v in _model(1).items()}
    slot = bulk.slot(10 << 20 + 1)
    up = BulkEndpoint().upload(slot, m)
    arrays = bulk.take(up)
    files = list((tmp_path / "spool").iterdir())
    assert len(files) == 1 and files[0].stat().st_size == up.nbytes
    delta = strip_prefix(arrays, "d/")
    assert not isinstance(delta, dict)  # tensors are read on access, not all at once
    for k, v in m.items():
        assert np.array_equal(delta[k[2:]], v)
    bulk.close_slot(slot.token)
    assert not list((tmp_path / "spool").iterdir())


def test_tokens_are_capabilities(bulk: BulkServer) -> None:
    m = _model(2)
    n = sum(v.nbytes for v in m.values())
    slot = bulk.slot(n)
    assert len(slot.token) >= 43  # 256 random bits, urlsafe base64
    assert _put(bulk, "x" * 43, b"abc") == 409  # nobody issued it
    assert _put(bulk, "../../etc/passwd", b"abc") == 404
    big = bulk.slot(16)
    assert _put(bulk, big.token, b"x" * 17) == 413  # beyond the slot's limit
    up = BulkEndpoint().upload(slot, m)
    with pytest.raises(FedsegError, match="409"):  # single use
        BulkEndpoint().upload(slot, m)
    # the reply must describe exactly what arrived
    lying = BulkUploaded(token=up.token, layout=layout_of({"a": np.zeros(3, np.float32)}), nbytes=12)
    with pytest.raises(pm.ProtocolError, match="bytes arrived"):
        bulk.take(lying)
    with pytest.raises(pm.ProtocolError, match="not complete"):
        bulk.take(BulkUploaded(token=big.token, layout=[], nbytes=0))
    with pytest.raises(pm.ProtocolError, match="unknown"):
        bulk.take(BulkUploaded(token="y" * 43, layout=[], nbytes=0))


def test_unreachable_server_is_one_clear_error(bulk: BulkServer) -> None:
    down = bulk.offer(_model())
    bulk.stop()
    with pytest.raises(FedsegError, match="bulk download: .*failed after 3 attempts.*/fedseg/bulk/"):
        BulkEndpoint().fetch(down)


def test_outbox_round_trip_through_flower_messages(bulk: BulkServer) -> None:
    """Server message -> site handler helpers -> reply -> server, as the train phase does it."""
    model = _model(3)
    box = Outbox(bulk, model, upload_bytes=sum(v.nbytes for v in model.values()) + 1024)
    req = pm.EvalRequest(round=1, plan_hash="p")
    sent = {nid: _msg(box.content(nid, req), nid) for nid in (1, 2)}
    assert not sent[1].content.array_records  # the model is not in the Flower message
    assert payload_bytes(sent[1].content) >= sum(v.nbytes for v in model.values())
    site = BulkEndpoint()
    got_req, weights = receive(sent[1], pm.EvalRequest, site)
    assert got_req == req and np.array_equal(weights["big"], model["big"])
    delta = {f"d/{k}": (v + 1).astype(v.dtype) for k, v in weights.items()}
    reply = pm.EvalReply(site="siteA", num_cases=1, dice_per_class={}, hd95_per_class={}, seconds=0)
    rd = reply_content(sent[1], reply, delta, site)
    assert get_envelope(rd).uploaded is not None and not rd.array_records
    answer = _msg(rd, 0, reply_to="m1")
    # site 2 cannot pass site 1's upload off as its own
    with pytest.raises(pm.ProtocolError, match="not this site's"):
        box.unpack(2, answer, pm.EvalReply)
    rep, arrays = box.unpack(1, answer, pm.EvalReply)
    assert rep.site == "siteA" and np.array_equal(arrays["d/big"], model["big"] + 1)
    box.close()
    assert not list(bulk.spool.iterdir())
    with pytest.raises(FedsegError, match="404"):
        receive(sent[2], pm.EvalRequest, site)  # the offer ended with the exchange


def _get(srv: BulkServer, token: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("GET", f"/fedseg/bulk/{token}")
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_rendezvous_long_polls_and_takes_one_answer(bulk: BulkServer, monkeypatch) -> None:
    """The unmask step's mailbox (BulkRendezvous): a GET waits for the posted request (204 'ask
    again' after the long-poll time), the answer is taken once, only after a request, within
    its size limit; a closed mailbox answers 404 and the server's wait ends with what came."""
    from fedseg.server import bulk_server

    monkeypatch.setattr(bulk_server, "LONG_POLL_S", 0.3)
    rv = bulk.rendezvous(max_bytes=64)
    assert len(rv.token) >= 43 and rv.url == bulk.url
    assert _get(bulk, rv.token) == (204, b"")  # nothing asked yet
    assert _put(bulk, rv.token, b"early") == 409  # no answer before a question
    site = BulkEndpoint()
    got: list[bytes | None] = []
    t = threading.Thread(target=lambda: got.append(site.await_step(rv, time.monotonic() + 30)))
    t.start()
    time.sleep(0.5)  # the site is long-polling (one 204 already)
    t0 = time.monotonic()
    assert bulk.post(rv.token, b'{"q": 1}') and not bulk.post(rv.token, b"again")
    t.join(10)
    assert got == [b'{"q": 1}'] and time.monotonic() - t0 < 2  # answered at once, not polled
    assert bulk.answers([rv.token], timeout=0.2) == {}  # nothing yet: waits, then what came
    assert _put(bulk, rv.token, b"x" * 65) == 413
    site.answer_step(rv, b'{"a": 2}')
    with pytest.raises(FedsegError, match="409"):  # once
        site.answer_step(rv, b'{"a": 3}')
    assert bulk.answers([rv.token], timeout=5) == {rv.token: b'{"a": 2}'}
    bulk.close_rendezvous(rv.token)
    assert _get(bulk, rv.token)[0] == 404
    assert site.await_step(rv, time.monotonic() + 5) is None  # closed: the listener stops
    # a listener waiting when the mailbox closes is told at once
    rv2 = bulk.rendezvous()
    done: list[bytes | None] = []
    t = threading.Thread(target=lambda: done.append(site.await_step(rv2, time.monotonic() + 30)))
    t.start()
    time.sleep(0.1)
    bulk.close_rendezvous(rv2.token)
    t.join(5)
    assert done == [None]


def test_without_a_slot_arrays_stay_in_the_reply() -> None:
    """Flower transport (``bulk_transport = "flower"``): nothing leaves the Flower message."""
    model = _model(4)
    box = Outbox(None, model, upload_bytes=None)
    msg = _msg(box.content(1, pm.EvalRequest(round=1, plan_hash="p")))
    _, weights = receive(msg, pm.EvalRequest, BulkEndpoint())
    assert np.array_equal(weights["enc.w"], model["enc.w"])
    rd = reply_content(msg, pm.Empty(), {"x": np.ones(3, np.float32)}, BulkEndpoint())
    assert isinstance(rd, RecordDict) and "arrays" in rd.array_records


def test_through_the_public_tls_port(tmp_path: Path) -> None:
    """fedseg-server's set-up: the ServerApp's bulk server on loopback, the fleet proxy's public
    TLS port forwarding /fedseg/bulk/, the sites told only the path and verifying the CA."""
    from fedseg.privacy.provision import provision
    from fedseg.runtime.fleet_proxy import FleetProxy
    from fedseg.runtime.processes import free_port

    pki, other = tmp_path / "pki", tmp_path / "other"
    provision(pki, ["hospitalA"], ["127.0.0.1", "localhost"], days=2, consortium="bulk")
    provision(other, ["x"], ["127.0.0.1", "localhost"], days=2, consortium="others")
    srv = BulkServer(tmp_path / "spool", public_url="/fedseg/bulk").start()
    port = free_port()
    proxy = FleetProxy(f"127.0.0.1:{port}", f"https://127.0.0.1:{free_port()}", pki / "server.pem",
                       pki / "server.key", pki / "ca.pem",
                       bulk_upstream=f"http://127.0.0.1:{srv.port}").start()
    try:
        model = _model(5)
        down = srv.offer(model)
        assert down.url == ""  # relative: the site uses its own server address
        site = BulkEndpoint(server=f"127.0.0.1:{port}", ca_file=str(pki / "ca.pem"))
        got = site.fetch(down)
        assert all(np.array_equal(got[k], v) for k, v in model.items())
        slot = srv.slot(sum(v.nbytes for v in model.values()))
        up = site.upload(slot, got)
        assert np.array_equal(srv.take(up)["big"], model["big"])
        rv = srv.rendezvous()  # the unmask step's mailbox, through the same port
        assert srv.post(rv.token, b"{}")
        assert site.await_step(rv, time.monotonic() + 30) == b"{}"
        site.answer_step(rv, b'{"ok": true}')
        assert srv.answers([rv.token], 5) == {rv.token: b'{"ok": true}'}
        with pytest.raises(FedsegError, match="TLS verification failed"):
            BulkEndpoint(server=f"127.0.0.1:{port}", ca_file=str(other / "ca.pem")).fetch(down)
        with pytest.raises(FedsegError, match="no 'server' address"):
            BulkEndpoint().fetch(down)
        import ssl

        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        for method, path, code in (("GET", "/fedseg/other", 404), ("POST", f"/fedseg/bulk/{down.token}", 405),
                                   ("GET", f"/fedseg/bulk/a/{down.token}", 404)):
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
            conn.request(method, path)
            assert conn.getresponse().status == code, path
            conn.close()
    finally:
        proxy.stop()
        srv.stop()
