"""Swarm benchmark with adversaries: a fleet on loopback shares a payload while peers
that lie or stay silent sit in its swarm.

Each run is :func:`bench.swarm.run_fleet` (a fresh rate-limited origin and tracker,
``--devices`` devices updating at once in swarm mode through the real agent, no seeder)
with adversarial peers started first and announced to the tracker as seeds, so that
the tracker hands them to every device:

* ``honest``: none (the reference run);
* ``liar``: one peer that claims every piece, unchokes, and answers every request with
  garbage (``tests.fake_bt_peer``, mode ``LIAR``);
* ``liars4``: four such peers;
* ``silent``: one peer that claims every piece, unchokes, takes requests and never
  answers (mode ``TEASE``).

Measured per run, medians over ``--repeat`` runs, all scenarios side by side in one
invocation: origin egress (every byte the origin sent, and the part under
``payloads/``) over the payload size; the slowest device's delivery time (check-in,
metadata and transfer, as in :mod:`bench.swarm`) and that time over the honest
run's; whether every device ended on the new image; honest devices banned by another
device (must be none); adversaries banned; garbage bytes the liars sent.

Targets (issue 15): one liar costs at most the bytes it sent and their re-fetch:
origin egress <= 1.2x the payload and completion <= 1.5x the honest run; with four
liars every honest device ends on the right image and no honest peer is banned.

``--chunk-kib 16`` publishes the payload in 16 KiB chunks, as releases were published
before chunks were at least 32 KiB (one-block pieces: see
:data:`manifest.MIN_CHOSEN_CHUNK_SIZE_BYTES`), to measure how devices cope with them.

Run: ``.venv/bin/python -m bench.swarm_adversaries [--devices 8] [--repeat 3]
[--image-mib 24] [--origin-mib-s 4] [--chunk-kib N] [--out bench/results]``. Writes
``swarm-adversaries.json`` and ``swarm-adversaries.md`` (``swarm-adversaries-16k.*``
with ``--chunk-kib 16``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import trio

import swarmota.seeder.publish
from bench.delta import machine_info
from bench.swarm import DEFAULT_OUT, RunResult, device_host, publish, run_fleet
from swarmota.infra.fsio import atomic_write_bytes
from swarmota.manifest import Payload
from swarmota.peer.http import HttpClient
from tests.fake_bt_peer import FakeBtPeer, Mode

__all__ = ["SCENARIOS", "main", "render_markdown", "run_bench"]

SCENARIOS: dict[str, tuple[Mode, int]] = {
    "honest": (Mode.LIAR, 0),
    "liar": (Mode.LIAR, 1),
    "liars4": (Mode.LIAR, 4),
    "silent": (Mode.TEASE, 1),
}
TARGETS = {"liar_origin_egress_x_payload": 1.2, "liar_completion_x_honest": 1.5}
ADVERSARY_HOSTS = tuple(f"127.0.0.{4 + i}" for i in range(6))


@dataclass(frozen=True)
class AdversaryRun:
    """One fleet run with adversaries."""

    scenario: str
    fleet: RunResult
    adversaries: list[str]  # host:port
    garbage_bytes_sent: int
    adversary_connections: int

    def honest_banned(self) -> list[str]:
        """Honest devices that some device banned."""
        devices = {device_host(n) for n in range(self.fleet.devices)}
        return sorted({peer for banned in self.fleet.banned_peers for peer in banned
                       if peer.rsplit(":", 1)[0] in devices})

    def adversaries_banned(self) -> int:
        """Bans of adversaries, over all devices."""
        hosts = {a.rsplit(":", 1)[0] for a in self.adversaries}
        return sum(1 for banned in self.fleet.banned_peers for peer in banned
                   if peer.rsplit(":", 1)[0] in hosts)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "fleet": self.fleet.to_json(),
                "adversaries": self.adversaries,
                "garbage_bytes_sent": self.garbage_bytes_sent,
                "adversary_connections": self.adversary_connections,
                "honest_banned": self.honest_banned(),
                "adversaries_banned": self.adversaries_banned()}


@contextlib.contextmanager
def adversaries(payload: Payload, mode: Mode, count: int) -> Iterator[list[FakeBtPeer]]:
    """``count`` fake peers of ``payload``'s swarm, listening until the block ends."""
    assert payload.info_hash is not None
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(FakeBtPeer(bytes.fromhex(payload.info_hash)[:20],
                                              payload.chunk_count, mode=mode,
                                              host=ADVERSARY_HOSTS[i]))
               for i in range(count)]


async def announce(tracker_url: str, payload: Payload, fake: FakeBtPeer) -> None:
    """Announce ``fake`` to the tracker as a seed, from its own address."""
    assert payload.info_hash is not None
    info_hash = bytes.fromhex(payload.info_hash)[:20]
    query = (f"info_hash={quote_from_bytes(info_hash)}&peer_id={quote_from_bytes(fake.peer_id)}"
             f"&port={fake.port}&uploaded=0&downloaded=0&left=0&compact=1&event=started")
    async with HttpClient(timeout_s=10, local_address=fake.host) as http:
        status, body = await http.get_tracker(f"{tracker_url}/announce?{query}",
                                              max_bytes=64 * 1024)
    if status != 200 or b"failure reason" in body:
        raise RuntimeError(f"the tracker refused the adversary's announce: {body[:200]!r}")


async def run_scenario(workdir: Path, scenario: str, *, devices: int, image_bytes: int,
                       origin_rate_bytes_per_s: int, published: Any) -> AdversaryRun:
    repo, m1, m2, base_image = published
    payload = m2.full_payload
    mode, count = SCENARIOS[scenario]
    with adversaries(payload, mode, count) as fakes:

        async def on_servers(tracker_url: str) -> None:
            for fake in fakes:
                await announce(tracker_url, payload, fake)

        fleet = await run_fleet(workdir, repo, [m1, m2], base_image, devices=devices,
                                mode="swarm", origin_rate_bytes_per_s=origin_rate_bytes_per_s,
                                on_servers=on_servers)
        stats = [fake.stats() for fake in fakes]
    return AdversaryRun(scenario=scenario, fleet=fleet,
                        adversaries=[f"{f.host}:{f.port}" for f in fakes],
                        garbage_bytes_sent=sum(s.piece_bytes_sent for s in stats),
                        adversary_connections=sum(s.connections for s in stats))


def summarize(runs: Sequence[AdversaryRun], honest_slowest_s: float | None,
              origin_rate_bytes_per_s: int) -> dict[str, Any]:
    """Medians over the repetitions of one scenario."""
    payload = runs[0].fleet.payload_bytes

    def med(values: Callable[[AdversaryRun], float]) -> float:
        return float(statistics.median(values(r) for r in runs))

    slowest = med(lambda r: max(r.fleet.delivered_s, default=0.0))
    return {
        "scenario": runs[0].scenario, "runs": len(runs),
        "devices": runs[0].fleet.devices, "adversaries": len(runs[0].adversaries),
        "all_ok": all(r.fleet.ok for r in runs),
        "origin_egress_x_payload": round(med(
            lambda r: r.fleet.origin_bytes_total / payload), 3),
        "origin_payload_egress_x_payload": round(med(
            lambda r: r.fleet.origin_bytes_payloads / payload), 3),
        "delivered_slowest_s": round(slowest, 3),
        "completion_x_lower_bound": round(slowest / (payload / origin_rate_bytes_per_s), 3),
        "completion_x_honest": (round(slowest / honest_slowest_s, 3)
                                if honest_slowest_s else None),
        "honest_banned": sorted({p for r in runs for p in r.honest_banned()}),
        "adversaries_banned_median": med(lambda r: r.adversaries_banned()),
        "garbage_bytes_sent_median": int(med(lambda r: r.garbage_bytes_sent)),
        "device_bytes_peers_median": int(med(
            lambda r: statistics.median(r.fleet.bytes_peers))),
    }


@contextlib.contextmanager
def chunk_size_of_older_releases(chunk_size: int | None) -> Iterator[None]:
    """Within the block, publishing cuts payloads into ``chunk_size`` chunks (``None``:
    today's choice), as an older publisher did."""
    if chunk_size is None:
        yield
        return
    module: Any = swarmota.seeder.publish  # the name publish_release calls
    chosen = module.choose_chunk_size
    module.choose_chunk_size = lambda payload_size_bytes: chunk_size
    try:
        yield
    finally:
        module.choose_chunk_size = chosen


async def run_bench(workdir: Path, *, devices: int, repeat: int, image_bytes: int,
                    origin_rate_bytes_per_s: int,
                    scenarios: Sequence[str] = tuple(SCENARIOS),
                    chunk_size: int | None = None,
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark; returns a JSON-ready result. Scenarios are interleaved per
    repetition, so that a slow spell of the machine hits them all alike."""
    with chunk_size_of_older_releases(chunk_size):
        published = await trio.to_thread.run_sync(publish, workdir, image_bytes)
    payload = published[2].full_payload
    progress(f"payload {payload.size:,} bytes ({payload.chunk_count} chunks of "
             f"{payload.chunk_size // 1024} KiB); origin {origin_rate_bytes_per_s:,} B/s; "
             f"{devices} devices")
    runs: dict[str, list[AdversaryRun]] = {s: [] for s in scenarios}
    for rep in range(repeat):
        for scenario in scenarios:
            run_dir = workdir / f"run-{scenario}-{rep}"
            run_dir.mkdir()
            run = await run_scenario(run_dir, scenario, devices=devices,
                                     image_bytes=image_bytes,
                                     origin_rate_bytes_per_s=origin_rate_bytes_per_s,
                                     published=published)
            runs[scenario].append(run)
            fleet = run.fleet
            progress(f"  {scenario:<7} run {rep + 1}/{repeat}: "
                     f"{'ok' if fleet.ok else 'FAILED'}, slowest delivered "
                     f"{max(fleet.delivered_s, default=0):.2f} s, origin "
                     f"{fleet.origin_bytes_total / payload.size:.2f}x payload, honest banned "
                     f"{run.honest_banned() or 'none'}, garbage {run.garbage_bytes_sent:,} B")
    honest = runs.get("honest")
    honest_slowest = (statistics.median(max(r.fleet.delivered_s, default=0.0) for r in honest)
                      if honest else None)
    cells = [summarize(cell, honest_slowest, origin_rate_bytes_per_s)
             for cell in runs.values()]
    return {
        "benchmark": "swarm-adversaries", "repeat": repeat, "devices": devices,
        "image_bytes": image_bytes, "payload_bytes": payload.size,
        "chunk_size": payload.chunk_size, "origin_rate_bytes_per_s": origin_rate_bytes_per_s,
        "lower_bound_s": round(payload.size / origin_rate_bytes_per_s, 3),
        "targets": TARGETS, "cells": cells,
        "runs": [r.to_json() for cell in runs.values() for r in cell],
        "notes": [
            "one process: devices, adversaries and servers share this machine's 2 cores",
            "no seeder: the rate-limited origin is the only honest source of the payload",
            "adversaries are announced to the tracker as seeds before the devices start",
            "delivered: start of the fleet update until a device has every chunk, each "
            "verified (check-in, metadata, transfer)",
        ],
    }


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Swarm benchmark with adversaries", "",
        f"{result['devices']} devices, swarm mode, payload {result['payload_bytes']:,} bytes "
        f"(chunks of {result['chunk_size'] // 1024} KiB), origin limited to "
        f"{result['origin_rate_bytes_per_s'] / (1 << 20):g} MiB/s (lower bound "
        f"{result['lower_bound_s']:.2f} s), no seeder. Medians of {result['repeat']} runs, "
        "scenarios interleaved. Targets with one liar: origin egress <= "
        f"{TARGETS['liar_origin_egress_x_payload']}x the payload, completion <= "
        f"{TARGETS['liar_completion_x_honest']}x the honest run; with four liars every "
        "device updated and no honest peer banned.", "",
        "| scenario | adversaries | origin egress / payload | of it payloads/ "
        "| slowest delivered s | / honest | / lower bound | honest peers banned "
        "| adversary bans | garbage bytes sent | per device from peers | all updated |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for c in result["cells"]:
        vs_honest = "-" if c["completion_x_honest"] is None else f"{c['completion_x_honest']:.2f}"
        lines.append(
            f"| {c['scenario']} | {c['adversaries']} | {c['origin_egress_x_payload']:.3f} "
            f"| {c['origin_payload_egress_x_payload']:.3f} | {c['delivered_slowest_s']:.2f} "
            f"| {vs_honest} | {c['completion_x_lower_bound']:.2f} "
            f"| {', '.join(c['honest_banned']) or 'none'} "
            f"| {c['adversaries_banned_median']:g} | {c['garbage_bytes_sent_median']:,} "
            f"| {c['device_bytes_peers_median']:,} | {'yes' if c['all_ok'] else 'NO'} |")
    lines += ["", "Notes: " + "; ".join(result["notes"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.swarm_adversaries",
        description="Update a fleet on loopback in swarm mode with lying and silent peers "
                    "in the swarm, against an honest run, side by side. Writes "
                    "swarm-adversaries.json and swarm-adversaries.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario; medians")
    parser.add_argument("--image-mib", type=int, default=24,
                        help="image size (the v2 full payload is ~65%% of it)")
    parser.add_argument("--origin-mib-s", type=float, default=4.0,
                        help="origin egress limit (all responses together), MiB/s")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS),
                        default=list(SCENARIOS))
    parser.add_argument("--chunk-kib", type=int, default=None, choices=[16, 32, 64, 128],
                        help="chunk size of the payload, as an older publisher chose it "
                             "(default: today's choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for swarm-adversaries.json and .md")
    args = parser.parse_args(argv)
    if args.repeat < 1 or not 1 <= args.devices <= 100:
        parser.error("--repeat must be >= 1 and --devices within 1..100")
    if not 1 <= args.image_mib <= 1024 or args.origin_mib_s <= 0:
        parser.error("--image-mib must be 1..1024 and --origin-mib-s positive")
    rate = int(args.origin_mib_s * (1 << 20))
    with tempfile.TemporaryDirectory(prefix="bench-adversaries-") as tmp:
        result = trio.run(lambda: run_bench(
            Path(tmp), devices=args.devices, repeat=args.repeat,
            image_bytes=args.image_mib << 20, origin_rate_bytes_per_s=rate,
            scenarios=args.scenarios,
            chunk_size=None if args.chunk_kib is None else args.chunk_kib << 10))
    result["machine"] = machine_info({})
    markdown = render_markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "swarm-adversaries" + ("" if args.chunk_kib is None else f"-{args.chunk_kib}k")
    atomic_write_bytes(args.out / f"{name}.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(args.out / f"{name}.md", markdown.encode())
    print()
    print(markdown)
    return 0 if all(c["all_ok"] for c in result["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
