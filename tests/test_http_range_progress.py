"""A range answer is handed over as it arrives (``HttpClient.get_range(on_data=...)``):
the swarm download verifies and shares the first chunks of a long origin run while the
rest is still on the link, instead of after the whole answer."""

from __future__ import annotations

import random
from functools import partial

import pytest
import trio

from swarmota.peer.errors import PartialResponse
from swarmota.peer.http import HttpClient

BODY = random.Random(5).randbytes(256 * 1024)
HALF = 128 * 1024


async def _serve_in_two_halves(nursery: trio.Nursery, first_half_seen: trio.Event, *,
                               cut: bool = False) -> str:
    """A raw HTTP server: answers one range GET with 206, sends the first half of the
    range, then sends the rest only once ``first_half_seen`` is set (or, ``cut``,
    closes the connection instead)."""

    async def handle(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        wanted = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"range:"))
        start, end = (int(x) for x in wanted.split(b"=")[1].split(b"-"))
        body = BODY[start:end + 1]
        await stream.send_all(b"HTTP/1.1 206 Partial Content\r\ncontent-length: %d\r\n"
                              b"content-range: bytes %d-%d/%d\r\n\r\n"
                              % (len(body), start, end, len(BODY)) + body[:HALF])
        if cut:
            await stream.aclose()
            return
        with trio.fail_after(10):  # the client must hand over the first half by itself
            await first_half_seen.wait()
        await stream.send_all(body[HALF:])

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/payloads/x.zst"


async def test_a_range_answer_is_handed_over_before_it_ends(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []
    first_half_seen = trio.Event()

    def on_data(data: bytearray) -> None:
        seen.append(bytes(data))
        if len(data) >= HALF:
            first_half_seen.set()

    url = await _serve_in_two_halves(nursery, first_half_seen)
    with trio.fail_after(20):  # without the hand-over the server waits for ever
        async with HttpClient(timeout_s=10) as http:
            data = await http.get_range(url, 0, len(BODY), on_data=on_data)
    assert data == BODY
    lengths = [len(s) for s in seen]
    assert lengths == sorted(lengths) and lengths[-1] == len(BODY)
    assert any(HALF <= n < len(BODY) for n in lengths), "the first half came on its own"
    assert all(s == BODY[:len(s)] for s in seen), "each hand-over is a prefix of the range"


async def test_a_cut_range_answer_has_handed_over_what_did_arrive(
        nursery: trio.Nursery) -> None:
    seen: list[int] = []
    url = await _serve_in_two_halves(nursery, trio.Event(), cut=True)
    with trio.fail_after(20):
        async with HttpClient(timeout_s=10) as http:
            with pytest.raises(PartialResponse):
                await http.get_range(url, 0, len(BODY), on_data=lambda d: seen.append(len(d)))
    assert seen and seen[-1] == HALF
