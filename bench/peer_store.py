"""Where should the peers of every tracker process live: Redis or PostgreSQL?

The same announce (record the peer with its expiry, hand out up to 50 others of the
swarm at random, count seeds and leechers) against:

- ``redis``: the product's :class:`tracker.redis_state.RedisState` (sorted sets per
  swarm, one Lua script per announce, pipelined);
- ``postgresql``: the best plain-SQL equivalent we could write: an UNLOGGED table
  (no WAL: peers are soft state) with the swarm and member as its key and an index on
  the last announce; per announce one upsert, one random sample of the live peers
  (``TABLESAMPLE`` is not uniform over a filtered swarm, so ``ORDER BY random()``
  over the swarm's live rows) and one count, in one transaction.

Both throwaway servers (:mod:`bench.servers`) run on this machine; the client is this
process. Reported per announce: the client's CPU (what a tracker process pays), the
server's CPU (what the shared service pays), and the wall time, for a swarm of
``--peers`` peers. Run: ``.venv/bin/python -m bench.peer_store [--peers 2000]
[--announces 5000]``; writes ``peer-store.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench.delta import machine_info
from bench.servers import run_postgres, run_redis
from bench.tracker_scale import _cpu_of, _pids_of
from swarmota.tracker.bittorrent import AnnounceRequest
from swarmota.tracker.redis_state import RedisState

HASH = bytes.fromhex("5a" * 20)

_PG_SCHEMA = """
CREATE UNLOGGED TABLE peers (
    swarm BYTEA NOT NULL, member TEXT NOT NULL, peer_id BYTEA NOT NULL,
    seed BOOLEAN NOT NULL, network TEXT, last_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (swarm, member));
CREATE INDEX peers_by_time ON peers (swarm, last_seen)
"""


def _request(i: int) -> AnnounceRequest:
    return AnnounceRequest(HASH, f"-XX0001-{i:012d}".encode(), 6000 + i % 50000, 0, 0,
                           0 if i % 5 == 0 else 100, "", True, False, 50, None, None)


def _measure(announce: Callable[[int], None], count: int, peers: int,
             server: list[int]) -> dict[str, float]:
    """Per announce: client and server CPU, wall (after every peer announced once)."""
    for i in range(peers):  # the swarm, every peer once
        announce(i)
    client0, server0, wall0 = time.process_time(), _cpu_of(server), time.perf_counter()
    for i in range(count):
        announce(i % peers)
    client = time.process_time() - client0
    return {"client_cpu_us": round(1e6 * client / count, 1),
            "server_cpu_us": round(1e6 * (_cpu_of(server) - server0) / count, 1),
            "wall_us": round(1e6 * (time.perf_counter() - wall0) / count, 1)}


def _postgres(count: int, peers: int) -> dict[str, float]:
    with run_postgres(fsync=True) as pg:
        conn = psycopg.connect(pg.url(), autocommit=True)
        for statement in _PG_SCHEMA.split(";"):
            conn.execute(statement)

        def announce(i: int) -> None:
            request = _request(i)
            now = time.time()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO peers VALUES (%s, %s, %s, %s, NULL, %s) ON CONFLICT "
                    "(swarm, member) DO UPDATE SET peer_id = excluded.peer_id, seed = "
                    "excluded.seed, last_seen = excluded.last_seen",
                    (HASH, f"127.0.0.1|{request.port}", request.peer_id, request.is_seed,
                     now))
                conn.execute("SELECT member, peer_id FROM peers WHERE swarm = %s AND "
                             "last_seen > %s AND member <> %s ORDER BY random() LIMIT 50",
                             (HASH, now - 600, f"127.0.0.1|{request.port}")).fetchall()
                conn.execute("SELECT count(*) FILTER (WHERE seed), count(*) FILTER "
                             "(WHERE NOT seed) FROM peers WHERE swarm = %s AND "
                             "last_seen > %s", (HASH, now - 600)).fetchone()

        try:
            result = _measure(announce, count, peers, _pids_of("postgres"))
            row = conn.execute("SELECT pg_total_relation_size('peers')").fetchone()
            assert row is not None
            result["bytes_per_peer"] = round(int(row[0]) / peers)
            return result
        finally:
            conn.close()


def _redis(count: int, peers: int) -> dict[str, float]:
    with run_redis() as server:
        state = RedisState(server.url, interval_s=300, max_peers_per_swarm=100_000)
        state.ping()
        key = f"swarmota:sw:{{{HASH.hex()}}}:"

        def announce(i: int) -> None:
            request = _request(i)
            args = (time.time(), 600, f"127.0.0.1|{request.port}", request.peer_id.hex(),
                    "1" if request.is_seed else "0", "", "", "", 50, 100_000, 64)
            # the command the tracker's worker sends, without the thread hand-over
            result = state._pipeline([(("script", "announce", [key], args),)])
            result[0].unwrap()

        info = redis.Redis(unix_socket_path=str(server.socket))
        before = int(info.info("memory")["used_memory"])
        try:
            result = _measure(announce, count, peers, _pids_of("redis-server"))
            used = int(info.info("memory")["used_memory"]) - before
            result["bytes_per_peer"] = round(used / peers)
            return result
        finally:
            info.close()
            state.close()


def run(count: int, peers: int) -> dict[str, Any]:
    return {"announces": count, "swarm_peers": peers, "numwant": 50,
            "redis": _redis(count, peers), "postgresql": _postgres(count, peers),
            "machine": machine_info({}), "loadavg_after": os.getloadavg()}


def render(result: dict[str, Any]) -> str:
    lines = ["# Peer store: Redis against PostgreSQL", "",
             f"`python -m bench.peer_store`: {result['announces']} announces to one swarm "
             f"of {result['swarm_peers']} peers, 50 handed out each, one client process "
             "(one announce at a time, the command the tracker sends, without its "
             "thread hand-over; the PostgreSQL client with psycopg 3). "
             "Per announce, microseconds. Load average after: "
             f"{', '.join(f'{x:.2f}' for x in result['loadavg_after'])}.", "",
             "| store | client CPU µs | server CPU µs | wall µs | bytes per peer |",
             "|---|---:|---:|---:|---:|"]
    for name in ("redis", "postgresql"):
        m = result[name]
        lines.append(f"| {name} | {m['client_cpu_us']} | {m['server_cpu_us']} | "
                     f"{m['wall_us']} | {m['bytes_per_peer']} |")
    lines += ["", f"Machine: `{result['machine']}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_store",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--announces", type=int, default=5000)
    parser.add_argument("--peers", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    result = run(args.announces, args.peers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer-store.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "peer-store.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
