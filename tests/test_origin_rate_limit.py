"""The origin's egress rate limit: one budget for all connections of an app.

Benchmarks use it to emulate a slow CDN-to-home link, so it must hold across parallel
clients, and a client that goes away must not keep a response (and its share of the
budget) alive. Timing assertions are lower bounds only: shared machines are noisy.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from swarmota.infra.http_serve import ListenConfig, Receive, Scope, Send, serve_asgi
from swarmota.seeder import OriginApp, OriginConfig, serve_origin
from swarmota.seeder.origin import TokenBucket

KiB = 1024
RATE = 256 * KiB


def make_root(tmp_path: Path, sizes: dict[str, int]) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "origin"
    (root / "payloads").mkdir(parents=True)
    rng = random.Random(7)
    files = {}
    for name, size in sizes.items():
        files[name] = rng.randbytes(size)
        (root / "payloads" / name).write_bytes(files[name])
    return root, files


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[tuple[OriginApp, str, dict[str, bytes]]]:
    root, files = make_root(tmp_path, {"a.zst": 512 * KiB, "b.zst": 256 * KiB,
                                       "c.zst": 256 * KiB})
    app = OriginApp(root, OriginConfig(rate_limit_bytes_per_s=RATE))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_origin, app, ListenConfig())
        yield app, url, files
        nursery.cancel_scope.cancel()


async def test_one_download_is_held_to_the_rate(
    limited: tuple[OriginApp, str, dict[str, bytes]]
) -> None:
    app, url, files = limited
    async with httpx.AsyncClient(timeout=30) as client:
        started = trio.current_time()
        response = await client.get(f"{url}/payloads/a.zst")
        elapsed = trio.current_time() - started
    assert response.content == files["a.zst"]
    # 512 KiB at 256 KiB/s with a 64 KiB burst: 1.75 s ideally.
    assert elapsed >= 1.5
    assert app.statistics().bytes_payloads == 512 * KiB


async def test_parallel_downloads_share_one_budget(
    limited: tuple[OriginApp, str, dict[str, bytes]]
) -> None:
    _, url, files = limited
    results: dict[str, bytes] = {}

    async def fetch(client: httpx.AsyncClient, name: str) -> None:
        results[name] = (await client.get(f"{url}/payloads/{name}")).content

    # Two clients, two connections: the budget is the app's, not the connection's.
    async with httpx.AsyncClient(timeout=30) as first, httpx.AsyncClient(timeout=30) as second:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, first, "b.zst")
            nursery.start_soon(fetch, second, "c.zst")
        elapsed = trio.current_time() - started
    assert results == {"b.zst": files["b.zst"], "c.zst": files["c.zst"]}
    assert elapsed >= 1.5  # 512 KiB together at 256 KiB/s, 64 KiB burst: 1.75 s ideally


async def test_ranges_are_limited_too(
    limited: tuple[OriginApp, str, dict[str, bytes]]
) -> None:
    app, url, files = limited
    async with httpx.AsyncClient(timeout=30) as client:
        started = trio.current_time()
        response = await client.get(f"{url}/payloads/a.zst",
                                    headers={"range": f"bytes=0-{448 * KiB - 1}"})
        elapsed = trio.current_time() - started
    assert response.status_code == 206
    assert response.content == files["a.zst"][:448 * KiB]
    assert elapsed >= 1.2  # 448 KiB - 64 KiB burst at 256 KiB/s = 1.5 s ideally
    assert app.statistics().responses_206 == 1


async def test_a_client_that_disconnects_does_not_keep_the_server_busy(
    tmp_path: Path,
) -> None:
    root, files = make_root(tmp_path, {"big.zst": 8 * 1024 * KiB, "small.zst": 32 * KiB})
    app = OriginApp(root, OriginConfig(rate_limit_bytes_per_s=64 * KiB))
    in_flight = 0

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        # A thin wrapper (not a mock): counts requests the app is still handling.
        nonlocal in_flight
        in_flight += 1
        try:
            await app(scope, receive, send)
        finally:
            in_flight -= 1

    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, counting, ListenConfig())
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /payloads/big.zst HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        while received < 96 * KiB:
            received += len(await stream.receive_some(65536))
        assert in_flight == 1
        await stream.aclose()
        # The app notices the disconnect and returns, even while waiting for budget.
        with trio.fail_after(10):
            while in_flight:
                await trio.sleep(0.05)
        sent = app.statistics().bytes_payloads
        assert sent < 512 * KiB
        # The budget it no longer uses goes to the next client.
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"{url}/payloads/small.zst")
        assert response.content == files["small.zst"]
        assert app.statistics().bytes_payloads == sent + 32 * KiB
        nursery.cancel_scope.cancel()


# --- the bucket itself, on trio's mock clock -------------------------------------------------


async def test_token_bucket_on_a_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=500)
    start = trio.current_time()
    await bucket.acquire(500)  # the bucket starts full
    assert trio.current_time() == start
    await bucket.acquire(250)
    assert trio.current_time() - start == pytest.approx(0.25)
    await trio.sleep(10)  # idle time refills at most the burst
    start = trio.current_time()
    await bucket.acquire(500)
    await bucket.acquire(500)
    assert trio.current_time() - start == pytest.approx(0.5)
    with pytest.raises(ValueError):
        await bucket.acquire(501)


async def test_token_bucket_shares_fairly_and_cancelled_waiters_take_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate_bytes_per_s=100, burst_bytes=100)
    await bucket.acquire(100)
    finished: list[tuple[str, float]] = []
    start = trio.current_time()

    async def take(name: str) -> None:
        for _ in range(3):
            await bucket.acquire(100)
        finished.append((name, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "a")
        nursery.start_soon(take, "b")
        with trio.move_on_after(0.5):
            await bucket.acquire(100)  # cancelled while queued: takes nothing
    # Six acquisitions of a full second's budget each, FIFO: both finish near the end.
    assert sorted(t for _, t in finished) == [pytest.approx(5.0), pytest.approx(6.0)]


async def test_token_bucket_keeps_the_rate_when_sleeps_wake_late(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy event loop wakes sleepers late; the budget must not shrink by that much
    (with the burst equal to each acquisition, a token count capped at the burst lost
    every late millisecond: ~6% of a busy origin's rate)."""
    real_sleep = trio.sleep

    async def late_sleep(seconds: float) -> None:
        await real_sleep(seconds + 0.005)

    monkeypatch.setattr(trio, "sleep", late_sleep)
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=100)
    start = trio.current_time()
    for _ in range(101):
        await bucket.acquire(100)
    # 10,100 bytes at 1000 B/s with 100 B up front: 10 s, plus one late wake-up
    assert trio.current_time() - start == pytest.approx(10.0, abs=0.01)


def test_rate_limit_config_is_checked() -> None:
    with pytest.raises(ValueError):
        OriginConfig(rate_limit_bytes_per_s=0)
    with pytest.raises(ValueError):
        OriginConfig(rate_limit_burst_bytes=0)
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
