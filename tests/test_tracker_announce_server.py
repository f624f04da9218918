"""The lean BitTorrent endpoint (tracker.announce_server): the pure head parser, and a
real server on 127.0.0.1 next to the hypercorn one, both deciding through one app.

Threats covered: oversized, malformed and slow requests (refused or disconnected within
bounds, never buffered without limit), too many connections (503), a request body
smuggled into a GET (refused), a device not admitted to a release getting peers through
the faster door (the gate is the same), and answers that differ between the endpoints.
"""

from __future__ import annotations

import functools
import random
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from swarmota.infra.http_serve import ListenConfig
from swarmota.tracker.announce_server import (
    AnnounceServerLimits,
    Refusal,
    Request,
    parse_head,
    render_response,
    serve_announce,
)
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.registry import SwarmRegistry
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import TrackerUrls, serve_tracker_endpoints
from swarmota.tracker.sqlite_store import SqliteStore
from tests.test_tracker_announce import ANNOUNCE_HASH, announce_query, bdecode, build_manifest, q

TIMEOUT_S = 10


# --- the pure core ----------------------------------------------------------------------


def test_a_plain_get_is_accepted_with_keep_alive_by_version() -> None:
    assert parse_head(b"GET /announce?a=1&b=%20 HTTP/1.1\r\nHost: x\r\nAccept:  */* ") == \
        Request("/announce", b"a=1&b=%20", keep_alive=True, target=b"/announce?a=1&b=%20",
                headers=((b"host", b"x"), (b"accept", b"*/*")))
    assert parse_head(b"GET /scrape HTTP/1.0") == Request("/scrape", b"", keep_alive=False,
                                                          target=b"/scrape")
    assert parse_head(b"GET /scrape HTTP/1.0\r\nConnection: Keep-Alive").keep_alive  # type: ignore[union-attr]
    assert not parse_head(b"GET /scrape HTTP/1.1\r\nconnection: close").keep_alive  # type: ignore[union-attr]
    assert isinstance(parse_head(b"GET /scrape HTTP/1.1\r\ncontent-length: 0"), Request)


@pytest.mark.parametrize("head, status", [
    (b"GET /v1/checkin HTTP/1.1", 404),
    (b"GET /announce/../metrics HTTP/1.1", 404),
    (b"POST /announce HTTP/1.1", 405),
    (b"GET  /announce HTTP/1.1", 400),
    (b"GET /announce HTTP/2.0", 400),
    (b"GET announce HTTP/1.1", 400),
    (b"GET /annonce\xff HTTP/1.1", 400),
    (b"", 400),
    (b"GET /announce HTTP/1.1\r\nno colon here", 400),
    (b"GET /announce HTTP/1.1\r\n folded: header", 400),
    (b"GET /announce HTTP/1.1\r\ncontent-length: 5", 400),
    (b"GET /announce HTTP/1.1\r\ntransfer-encoding: chunked", 400),
])
def test_anything_else_is_refused(head: bytes, status: int) -> None:
    refusal = parse_head(head)
    assert isinstance(refusal, Refusal) and refusal.status == status
    if status == 405:
        assert refusal.headers == ((b"allow", b"GET"),)


def test_answers_carry_length_and_close_when_asked() -> None:
    assert render_response(200, b"d1:ai1ee") == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n"
        b"cache-control: no-store\r\n\r\nd1:ai1ee")
    assert b"connection: close\r\n\r\n" in render_response(404, b"", keep_alive=False)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        AnnounceServerLimits(max_connections=0)
    with pytest.raises(ValueError):
        AnnounceServerLimits(head_timeout_s=0)


# --- a real server ----------------------------------------------------------------------


async def read_answer(stream: trio.SocketStream, buffer: bytearray
                      ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer from ``stream`` (``buffer`` keeps what follows it)."""
    with trio.fail_after(TIMEOUT_S):
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            assert data, "the server closed the connection before answering"
            buffer += data
        end = buffer.index(b"\r\n\r\n")
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        del buffer[:end + 4]
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        length = int(headers["content-length"])
        while len(buffer) < length:
            data = await stream.receive_some(65536)
            assert data
            buffer += data
        body = bytes(buffer[:length])
        del buffer[:length]
    return int(lines[0].split(" ")[1]), headers, body


async def assert_closed(stream: trio.SocketStream) -> None:
    with trio.fail_after(TIMEOUT_S):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return


def get(path: str, query: bytes = b"", extra: bytes = b"") -> bytes:
    target = path.encode() + (b"?" + query if query else b"")
    return b"GET " + target + b" HTTP/1.1\r\nhost: tracker\r\n" + extra + b"\r\n"


@pytest.fixture
async def tracker(tmp_path: Path, nursery: trio.Nursery
                  ) -> AsyncIterator[tuple[TrackerUrls, SwarmRegistry]]:
    db = tmp_path / "tracker.db"
    with SqliteStore(db) as store:
        register_release(store, Release.from_manifest(build_manifest()),
                         RolloutPlan.everyone(), now=1.0)
    registry = SwarmRegistry(interval_s=120, rng=random.Random(0))
    config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0),
                           announce_listen=("127.0.0.1", 0),
                           announce_limits=AnnounceServerLimits(
                               max_connections=4,
                               idle_timeout_s=0.5, head_timeout_s=0.3))
    urls = await nursery.start(functools.partial(serve_tracker_endpoints, config,
                                                 registry=registry))
    yield urls, registry


def port_of(url: str | None) -> int:
    assert url is not None
    return int(url.rsplit(":", 1)[1])


async def test_both_endpoints_give_the_same_answers_and_the_same_gate(
        tracker: tuple[TrackerUrls, SwarmRegistry]) -> None:
    urls, registry = tracker
    assert urls.announce is not None and urls.announce != urls.api
    lean = await trio.open_tcp_stream("127.0.0.1", port_of(urls.announce))
    buffer = bytearray()

    async def via_lean(path: str, query: bytes) -> tuple[int, bytes]:
        await lean.send_all(get(path, query))
        status, headers, body = await read_answer(lean, buffer)
        assert headers["content-type"] == "text/plain"
        return status, body

    async with lean, httpx.AsyncClient(base_url=urls.api, timeout=TIMEOUT_S) as client:
        async def via_api(path: str, query: bytes) -> tuple[int, bytes]:
            response = await client.get(f"{path}?{query.decode()}")
            return response.status_code, response.content

        # A seed (anonymous) is stored through the lean endpoint ...
        status, body = await via_lean("/announce", announce_query(left=0, port=7000))
        assert status == 200 and bdecode(body)[b"complete"] == 1
        # ... and an anonymous leecher of an open rollout gets it through either door.
        for door in (via_lean, via_api):
            status, body = await door("/announce", announce_query(port=7001))
            assert status == 200
            assert bdecode(body)[b"peers"] == bytes([127, 0, 0, 1, 0x1B, 0x58])
        # A device that never checked in is not admitted: no peers through either door.
        for door in (via_lean, via_api):
            status, body = await door("/announce", announce_query(port=7002,
                                                                  device_id="stranger"))
            assert status == 200 and bdecode(body)[b"peers"] == b""
        # Bad queries: the same failure reasons, byte for byte.
        for query in (announce_query(port="x"), announce_query(info_hash=bytes(20)),
                      b"info_hash=%zz", b"x" * 9000):
            assert await via_lean("/announce", query) == await via_api("/announce", query)
        # Scrapes too.
        scrape = q(info_hash=ANNOUNCE_HASH)
        status, body = await via_lean("/scrape", scrape)
        assert (status, body) == await via_api("/scrape", scrape)
        assert bdecode(body)[b"files"][ANNOUNCE_HASH][b"complete"] == 1

        metrics = (await client.get("/metrics")).text
    assert "swarmota_tracker_announces_total 3" in metrics
    assert "swarmota_tracker_announces_refused_total 2" in metrics
    assert registry.statistics().peers == 2  # 7000 and 7001 (one entry), not the stranger


async def test_many_keep_alive_requests_on_one_connection_and_pipelined(
        tracker: tuple[TrackerUrls, SwarmRegistry]) -> None:
    urls, registry = tracker
    async with await trio.open_tcp_stream("127.0.0.1", port_of(urls.announce)) as stream:
        buffer = bytearray()
        for i in range(200):
            await stream.send_all(get("/announce", announce_query(port=1000 + i)))
            status, _, body = await read_answer(stream, buffer)
            assert status == 200 and bdecode(body)[b"incomplete"] == i + 1
        # Three requests in one write are answered in order.
        await stream.send_all(b"".join(get("/announce", announce_query(port=5000 + i))
                                       for i in range(3)))
        for i in range(3):
            _, _, body = await read_answer(stream, buffer)
            assert bdecode(body)[b"incomplete"] == 201 + i
        # Connection: close is honoured.
        await stream.send_all(get("/scrape", q(info_hash=ANNOUNCE_HASH),
                                  b"connection: close\r\n"))
        status, headers, _ = await read_answer(stream, buffer)
        assert status == 200 and headers["connection"] == "close"
        await assert_closed(stream)
    assert registry.statistics().peers == 203


async def test_a_client_pipelining_many_requests_does_not_hold_up_the_others(
        tracker: tuple[TrackerUrls, SwarmRegistry]) -> None:
    """Pipelined requests are read at once but answered one scheduler pass apart: the
    other tasks (here a ticker standing for the other connections) run between them,
    instead of waiting for the whole batch."""
    urls, registry = tracker
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    flood = socket.create_connection(("127.0.0.1", port_of(urls.announce)))
    # 30 requests in the socket's buffer before the tracker runs again (no await);
    # a batch is answered within one idle_timeout_s (0.5 s here)
    flood.sendall(b"".join(get("/announce", announce_query(port=1000 + i))
                           for i in range(30)))
    async with trio.SocketStream(trio.socket.from_stdlib_socket(flood)) as stream, \
            trio.open_nursery() as nursery:
        buffer = bytearray()
        status, _, body = await read_answer(stream, buffer)  # the gate's store read done
        assert status == 200 and bdecode(body)[b"incomplete"] == 1
        nursery.start_soon(ticker)
        for i in range(1, 30):
            status, _, body = await read_answer(stream, buffer)
            assert status == 200 and bdecode(body)[b"incomplete"] == i + 1
        nursery.cancel_scope.cancel()
    # about one tick per answer; none or one if the batch were answered in one go
    assert ticks >= 20
    assert registry.statistics().peers == 30


@pytest.mark.parametrize("request_bytes, status", [
    (get("/announce", b"a" * 17000), 413),  # over max_head_bytes (16 KiB)
    (get("/metrics"), 404),
    (b"POST /announce HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc", 405),
    (get("/announce", announce_query(), b"transfer-encoding: chunked\r\n"), 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to plain HTTP
])
async def test_bad_requests_are_refused_and_the_connection_closed(
        tracker: tuple[TrackerUrls, SwarmRegistry], request_bytes: bytes,
        status: int) -> None:
    urls, registry = tracker
    async with await trio.open_tcp_stream("127.0.0.1", port_of(urls.announce)) as stream:
        await stream.send_all(request_bytes)
        got, headers, body = await read_answer(stream, bytearray())
        assert got == status and headers["connection"] == "close"
        assert body.startswith(b"d14:failure reason") and body.endswith(b"e")  # bencoded
        await assert_closed(stream)
    assert registry.statistics().announces == 0


async def test_an_endless_head_is_cut_off_at_the_limit(
        tracker: tuple[TrackerUrls, SwarmRegistry]) -> None:
    urls, _ = tracker
    async with await trio.open_tcp_stream("127.0.0.1", port_of(urls.announce)) as stream:
        sent = 0
        with trio.move_on_after(TIMEOUT_S):
            try:
                while sent < 10 * 1024 * 1024:  # the server must stop reading long before
                    await stream.send_all(b"x-header: " + b"y" * 1000 + b"\r\n")
                    sent += 1012
            except trio.BrokenResourceError:
                pass
        assert sent < 10 * 1024 * 1024


async def test_slow_and_idle_clients_are_disconnected(
        tracker: tuple[TrackerUrls, SwarmRegistry]) -> None:
    urls, _ = tracker
    port = port_of(urls.announce)
    async with await trio.open_tcp_stream("127.0.0.1", port) as slow:
        started = trio.current_time()
        await slow.send_all(b"GET /announce?")  # and never the rest: head_timeout 0.3 s
        await assert_closed(slow)
        assert trio.current_time() - started < 3
    async with await trio.open_tcp_stream("127.0.0.1", port) as idle:
        started = trio.current_time()
        await assert_closed(idle)  # idle_timeout 0.5 s
        assert 0.3 < trio.current_time() - started < 3


async def test_connections_over_the_cap_get_503(
        tracker: tuple[TrackerUrls, SwarmRegistry]) -> None:
    urls, _ = tracker
    port = port_of(urls.announce)
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
    try:
        for stream in held:  # the four are served
            await stream.send_all(get("/scrape", q(info_hash=ANNOUNCE_HASH)))
            assert (await read_answer(stream, bytearray()))[0] == 200
        async with await trio.open_tcp_stream("127.0.0.1", port) as extra:
            status, headers, _ = await read_answer(extra, bytearray())
            assert status == 503 and headers["connection"] == "close"
    finally:
        for stream in held:
            await stream.aclose()
    with trio.fail_after(TIMEOUT_S):  # slots are given back
        while True:
            async with await trio.open_tcp_stream("127.0.0.1", port) as again:
                await again.send_all(get("/scrape", q(info_hash=ANNOUNCE_HASH)))
                if (await read_answer(again, bytearray()))[0] == 200:
                    break
            await trio.sleep(0.05)


async def test_shutdown_closes_the_listener_and_open_connections() -> None:
    async def answer(path: str, query: bytes, client: object,
                     **_: object) -> tuple[int, bytes]:
        return 200, b"de"

    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(serve_announce, answer, "127.0.0.1", 0))
        port = port_of(url)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(get("/announce"))
        assert (await read_answer(stream, bytearray()))[2] == b"de"
        nursery.cancel_scope.cancel()
    await assert_closed(stream)
    await stream.aclose()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_with_tls_on_the_main_listener_the_lean_endpoint_is_https_too(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    from tests.test_origin_tls import make_self_signed_cert

    cert, key = make_self_signed_cert(tmp_path)
    db = tmp_path / "tracker.db"
    with SqliteStore(db) as store:
        register_release(store, Release.from_manifest(build_manifest()),
                         RolloutPlan.everyone(), now=1.0)
    config = TrackerConfig(db_path=db, listen=ListenConfig(
        host="127.0.0.1", port=0, certfile=str(cert), keyfile=str(key)),
        announce_listen=("127.0.0.1", 0))
    urls = await nursery.start(functools.partial(serve_tracker_endpoints, config))
    assert urls.api.startswith("https://") and urls.announce.startswith("https://")
    query = announce_query(left=0).decode()
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert)),
                                 timeout=TIMEOUT_S) as client:
        for _ in range(3):  # keep-alive over TLS
            response = await client.get(f"{urls.announce}/announce?{query}")
            assert response.status_code == 200
            assert bdecode(response.content)[b"complete"] == 1
    # Plain HTTP to it gets nowhere; TLS below 1.3 is refused (the tracker's floor).
    async with await trio.open_tcp_stream("127.0.0.1", port_of(urls.announce)) as plain:
        await plain.send_all(get("/announce", announce_query()))
        with trio.fail_after(TIMEOUT_S):
            try:
                data = await plain.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
        assert b"HTTP/1.1 200" not in data
    old = ssl.create_default_context(cafile=str(cert))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    async with httpx.AsyncClient(verify=old, timeout=TIMEOUT_S) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{urls.announce}/announce?{query}")
    # with the server's alert, not a bare EOF: the client can tell why
    tcp = await trio.open_tcp_stream("127.0.0.1", port_of(urls.announce))
    tls = trio.SSLStream(tcp, old, server_hostname="127.0.0.1")
    with pytest.raises(trio.BrokenResourceError) as refused:
        await tls.do_handshake()
    await trio.aclose_forcefully(tls)
    assert "PROTOCOL_VERSION" in str(refused.value.__cause__).upper(), refused.value.__cause__


async def test_a_failing_answer_loses_one_connection_not_the_listener(
        caplog: pytest.LogCaptureFixture) -> None:
    async def answer(path: str, query: bytes, client: object,
                     **_: object) -> tuple[int, bytes]:
        if query == b"boom":
            raise RuntimeError("a bug")
        return 200, b"de"

    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(serve_announce, answer, "127.0.0.1", 0))
        async with await trio.open_tcp_stream("127.0.0.1", port_of(url)) as bad:
            await bad.send_all(get("/announce", b"boom"))
            await assert_closed(bad)
        async with await trio.open_tcp_stream("127.0.0.1", port_of(url)) as good:
            await good.send_all(get("/announce", b"fine"))
            assert (await read_answer(good, bytearray()))[2] == b"de"
        nursery.cancel_scope.cancel()
    assert "answering a request failed" in caplog.text


# --- the device API on the lean endpoint -----------------------------------------------


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: tracker\r\ncontent-type: "
            b"application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n"
            + extra + b"\r\n" + body)


def test_device_routes_parse_only_where_the_device_api_is_served() -> None:
    head = b"POST /v1/checkin HTTP/1.1\r\ncontent-length: 12"
    assert parse_head(head, device_api=True) == Request(
        "/v1/checkin", b"", True, b"/v1/checkin", ((b"content-length", b"12"),), "POST", 12)
    refused = parse_head(head)
    assert isinstance(refused, Refusal) and refused.status == 404
    for bad, status in ((b"GET /v1/checkin HTTP/1.1", 405),
                        (b"POST /v1/report HTTP/1.1", 400),  # no content-length
                        (b"POST /v1/report HTTP/1.1\r\ncontent-length: -1", 400),
                        (b"POST /v1/report HTTP/1.1\r\ncontent-length: 1\r\n"
                         b"content-length: 1", 400),
                        (b"POST /v1/report HTTP/1.1\r\ntransfer-encoding: chunked", 400),
                        (b"POST /v1/health HTTP/1.1\r\ncontent-length: 0", 405)):
        refusal = parse_head(bad, device_api=True)
        assert isinstance(refusal, Refusal) and refusal.status == status, bad


async def test_check_ins_and_reports_through_the_lean_endpoint_match_the_main_one(
        tracker: tuple[TrackerUrls, SwarmRegistry]) -> None:
    """Devices pointed at the lean endpoint get the main listener's answers: the same
    offer, the same errors, the report stored once."""
    urls, _ = tracker
    checkin = (b'{"device_id": "d1", "product": "acme-router", "hardware_id": "hw1", '
               b'"version": "1.0.0", "release_counter": 1}')
    async with await trio.open_tcp_stream("127.0.0.1", port_of(urls.announce)) as stream, \
            httpx.AsyncClient(base_url=urls.api, timeout=TIMEOUT_S) as client:
        buffer = bytearray()
        # two pipelined check-ins, then the health check
        await stream.send_all(post("/v1/checkin", checkin) * 2 + get("/v1/health"))
        for _ in range(2):
            status, headers, body = await read_answer(stream, buffer)
            assert status == 200 and headers["content-type"] == "application/json"
            lean = httpx.Response(200, content=body).json()
            assert lean["release"]["version"] == "2.0.0"
        assert (await read_answer(stream, buffer))[2] == b'{"ok":true}'
        main = (await client.post("/v1/checkin", content=checkin)).json()
        assert main["release"] == lean["release"]
        # a bad body: the same 400 and message through either door
        await stream.send_all(post("/v1/checkin", b'{"device_id": 5}'))
        status, _, body = await read_answer(stream, buffer)
        response = await client.post("/v1/checkin", content=b'{"device_id": 5}')
        assert (status, body) == (response.status_code, response.content) and status == 400
        report = (b'{"device_id": "d1", "product": "acme-router", "from_version": "1.0.0", '
                  b'"to_version": "2.0.0", "status": 0, "message": "", "bytes_origin": 1, '
                  b'"bytes_peers": 2, "timings_s": {}, "report_id": "attempt-0001"}')
        await stream.send_all(post("/v1/report", report))
        assert (await read_answer(stream, buffer))[:1] == (200,)
        assert (await client.post("/v1/report", content=report)).json() == {"ok": True}
        metrics = (await client.get("/metrics")).text
    assert 'swarmota_tracker_reports_total{status="ok"} 1' in metrics
    assert "swarmota_tracker_reports_duplicate_total 1" in metrics


async def test_a_device_body_over_the_limit_or_too_slow_is_refused(
        tracker: tuple[TrackerUrls, SwarmRegistry]) -> None:
    urls, _ = tracker
    async with await trio.open_tcp_stream("127.0.0.1", port_of(urls.announce)) as stream:
        await stream.send_all(b"POST /v1/report HTTP/1.1\r\ncontent-length: 999999999\r\n\r\n")
        status, _, body = await read_answer(stream, bytearray())
        assert status == 413 and b"over the limit" in body
        await assert_closed(stream)
    async with await trio.open_tcp_stream("127.0.0.1", port_of(urls.announce)) as stream:
        await stream.send_all(b"POST /v1/report HTTP/1.1\r\ncontent-length: 100\r\n\r\n{")
        await assert_closed(stream)  # the body never came: cut after head_timeout_s
