"""Tracker load benchmark: many simulated devices checking in and announcing at once.

One run starts a fresh tracker (SQLite in a temporary directory) with one release whose
rollout admits every device, then for each phase sends a bounded number of requests
from ``--concurrency`` concurrent clients and measures requests per second and the
latency of each request (p50, p99, max):

* ``checkin``: ``POST /v1/checkin`` of ``--devices`` distinct devices, round robin
  (each records the device, runs the rollout, answers the offer);
* ``announce``: ``GET /announce`` with the device's id (the swarm gate looks up the
  rollout and the admission, then the registry hands out up to 50 peers).

Two transports: ``asgi`` calls the application directly (the tracker's own cost: the
parsing, the decisions, the SQLite worker thread), ``http`` goes through hypercorn on
127.0.0.1 with an httpx client in the same process (the client's CPU time counts too,
so this is a lower bound of what the server alone sustains).

Run: ``.venv/bin/python -m bench.tracker [--devices 1000] [--requests 5000]
[--concurrency 64] [--transport asgi http] [--out bench/results]``. Writes
``tracker.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import trio

from bench.delta import machine_info
from infra.http_serve import ListenConfig
from tracker.app import TrackerApp
from tracker.bittorrent import SwarmInfo
from tracker.catalogue import register_release
from tracker.config import TrackerConfig
from tracker.protocol import Release, encode_json
from tracker.rollout import RolloutPlan
from tracker.server import serve_tracker
from tracker.store import SqliteStore

INFO_HASH = "5a" * 32
PRODUCT = "bench-router"

Request = Callable[[int], Awaitable[int]]


def _checkin_body(i: int) -> bytes:
    return encode_json({"device_id": f"dev-{i:06d}", "product": PRODUCT,
                        "hardware_id": "hw1", "version": "1.0.0", "release_counter": 1,
                        "network_id": f"net-{i // 4}"})


def _announce_query(i: int) -> bytes:
    peer_id = quote_from_bytes(f"-BT0001-{i:012d}".encode()).encode()
    return (b"info_hash=" + quote_from_bytes(bytes.fromhex(INFO_HASH)[:20]).encode()
            + b"&peer_id=" + peer_id + f"&port={10000 + i % 50000}&left=1000&compact=1"
            f"&device_id=dev-{i:06d}".encode())


async def _drive(request: Request, total: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            started = time.perf_counter()
            status = await request(i)
            latencies.append(time.perf_counter() - started)
            errors += status != 200

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": total, "errors": errors, "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(total / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 3),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1,
                                                 int(0.99 * len(latencies)))], 3),
            "max_ms": round(1000 * latencies[-1], 3)}


def _asgi_requests(app: TrackerApp, devices: int) -> dict[str, Request]:
    async def call(method: str, path: str, body: bytes, query: bytes, i: int) -> int:
        status = 0

        async def receive() -> MutableMapping[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])

        scope = {"type": "http", "method": method, "path": path, "query_string": query,
                 "headers": [(b"content-length", str(len(body)).encode())],
                 "client": (f"127.0.{(i % devices) // 250}.{(i % devices) % 250 + 1}",
                            40000)}
        await app(scope, receive, send)
        return status

    return {
        "checkin": lambda i: call("POST", "/v1/checkin", _checkin_body(i % devices), b"", i),
        "announce": lambda i: call("GET", "/announce", b"", _announce_query(i % devices), i),
    }


def _http_requests(client: httpx.AsyncClient, devices: int) -> dict[str, Request]:
    async def checkin(i: int) -> int:
        response = await client.post("/v1/checkin", content=_checkin_body(i % devices),
                                     headers={"content-type": "application/json"})
        return response.status_code

    async def announce(i: int) -> int:
        response = await client.get("/announce?" + _announce_query(i % devices).decode())
        return response.status_code

    return {"checkin": checkin, "announce": announce}


def _prepare(db: Path) -> None:
    base = Release.create(PRODUCT, "2.0.0", 2)
    release = Release(base.product, base.version, base.release_counter, base.target,
                      (SwarmInfo(INFO_HASH, PRODUCT, "2.0.0", "full"),))
    with SqliteStore(db) as store:
        register_release(store, release, RolloutPlan.everyone(), actor="bench")


async def run_bench(workdir: Path, *, devices: int, requests: int, concurrency: int,
                    transports: Sequence[str]) -> dict[str, Any]:
    """Every transport, check-ins then announces; the result as a JSON-ready dict."""
    results: dict[str, Any] = {"devices": devices, "requests_per_phase": requests,
                               "concurrency": concurrency, "machine": machine_info({}),
                               "transports": {}}
    for transport in transports:
        db = workdir / f"{transport}.sqlite"
        _prepare(db)
        config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0),
                               max_peers_per_swarm=max(2000, devices))
        phases: dict[str, Any] = {}
        if transport == "asgi":
            with SqliteStore(db) as store:
                app = TrackerApp(store, config)
                calls = _asgi_requests(app, devices)
                for phase in ("checkin", "announce"):
                    phases[phase] = await _drive(calls[phase], requests, concurrency)
        else:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(functools.partial(serve_tracker, config))
                limits = httpx.Limits(max_connections=concurrency,
                                      max_keepalive_connections=concurrency)
                async with httpx.AsyncClient(base_url=url, limits=limits,
                                             timeout=30) as client:
                    calls = _http_requests(client, devices)
                    for phase in ("checkin", "announce"):
                        phases[phase] = await _drive(calls[phase], requests, concurrency)
                nursery.cancel_scope.cancel()
        results["transports"][transport] = phases
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=_positive, default=1000)
    parser.add_argument("--requests", type=_positive, default=5000)
    parser.add_argument("--concurrency", type=_positive, default=64)
    parser.add_argument("--transport", nargs="+", choices=("asgi", "http"),
                        default=["asgi", "http"])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="swarmota-bench-tracker-") as tmp:
        result = trio.run(functools.partial(
            run_bench, Path(tmp), devices=args.devices, requests=args.requests,
            concurrency=args.concurrency, transports=args.transport))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracker.json").write_text(json.dumps(result, indent=2) + "\n")
    for transport, phases in result["transports"].items():
        for phase, r in phases.items():
            print(f"{transport:5} {phase:8} {r['requests_per_s']:8.0f} req/s  "
                  f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                  f"errors {r['errors']}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
