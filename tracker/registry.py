"""The in-memory peer registry of the BitTorrent tracker: :class:`SwarmRegistry`. Pure.

One object owns every swarm's peers (the app holds one). Entries are keyed by
``(announce_hash, ip, port)`` and expire ``2 * interval_s`` after their last announce;
time comes from the ``clock`` passed in, randomness from the ``rng`` passed in, so
tests control both. Memory is bounded: at most ``max_peers_per_swarm`` peers per swarm
and ``max_peers_total`` overall; a new peer over either limit is answered (it still gets
peers) but not remembered, and counted in ``refused``. Only swarms the caller has
checked against the release catalogue should reach :meth:`SwarmRegistry.announce`;
completion counters are kept for those swarms only.

Hand-out policy, LAN first: peers of the requester's network (same ``network_id``)
come first, then peers of its region (same ``region``), then anyone; within each of
these groups a leecher gets seeds before leechers, and a seed gets leechers only; each
group is shuffled; the requester never gets itself. The caller supplies ``network_id``
and ``region`` (what the device declared at check-in); unknown ones match nobody.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tracker.bittorrent import AnnounceRequest, HandedPeer, PeerAddress, ScrapeCounts

__all__ = [
    "DEFAULT_MAX_PEERS_PER_SWARM",
    "DEFAULT_MAX_PEERS_TOTAL",
    "AnnounceResult",
    "RegistryStatistics",
    "SwarmRegistry",
]

DEFAULT_MAX_PEERS_PER_SWARM: Final = 2000
DEFAULT_MAX_PEERS_TOTAL: Final = 200_000


@dataclass
class _Peer:
    address: PeerAddress
    peer_id: bytes
    left: int
    last_seen: float
    network_id: str | None
    completed: bool
    region: str | None = None


@dataclass(frozen=True)
class AnnounceResult:
    """What an announce gets: peers to try and the swarm's counts (requester included)."""

    peers: tuple[HandedPeer, ...]
    complete: int
    incomplete: int
    stored: bool


@dataclass(frozen=True)
class RegistryStatistics:
    """Counters of a :class:`SwarmRegistry`.

    Attributes:
        swarms: swarms with at least one live peer.
        peers / seeds / leechers: live entries now (expired ones may linger until the
            next sweep).
        announces: announces handled (``stopped`` included).
        refused: new peers not remembered because a limit was reached.
        expired: entries dropped because they stopped announcing.
        downloads: ``completed`` events counted (at most once per entry).
    """

    swarms: int
    peers: int
    seeds: int
    leechers: int
    announces: int
    refused: int
    expired: int
    downloads: int


class SwarmRegistry:
    """Peers of every swarm, in memory, bounded, with expiry.

    ``clock`` returns seconds (monotonic is best). ``rng`` shuffles hand-outs.

    Raises:
        ValueError: a non-positive interval or limit (programming error).
    """

    def __init__(
        self,
        *,
        interval_s: float = 300,
        max_peers_per_swarm: int = DEFAULT_MAX_PEERS_PER_SWARM,
        max_peers_total: int = DEFAULT_MAX_PEERS_TOTAL,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if max_peers_per_swarm < 1 or max_peers_total < 1:
            raise ValueError("peer limits must be at least 1")
        self.interval_s = interval_s
        self.ttl_s = 2 * interval_s
        self.max_peers_per_swarm = max_peers_per_swarm
        self.max_peers_total = max_peers_total
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._swarms: dict[bytes, dict[tuple[str, int], _Peer]] = {}
        self._downloads: dict[bytes, int] = {}
        self._total = 0
        self._last_sweep = clock()
        self._announces = 0
        self._refused = 0
        self._expired = 0
        self._downloads_total = 0

    def announce(self, request: AnnounceRequest, ip: str,
                 network_id: str | None = None, region: str | None = None) -> AnnounceResult:
        """Record ``request`` from a peer at ``ip`` and choose peers for it.

        ``ip`` is the connection's remote address (normalised, see
        :func:`tracker.bittorrent.peer_address`), never what the client claims.
        ``stopped`` removes the entry and hands out nobody.
        """
        now = self._clock()
        self._announces += 1
        self._maybe_sweep(now)
        key = (ip, request.port)
        swarm = self._swarms.get(request.announce_hash)
        if swarm is not None:
            self._purge(request.announce_hash, swarm, now)
            swarm = self._swarms.get(request.announce_hash)
        if request.event == "stopped":
            if swarm is not None and swarm.pop(key, None) is not None:
                self._total -= 1
                if not swarm:
                    del self._swarms[request.announce_hash]
            complete, incomplete = _counts(swarm or {})
            return AnnounceResult((), complete, incomplete, stored=False)

        entry = swarm.get(key) if swarm is not None else None
        stored = True
        if entry is None:
            size = len(swarm) if swarm is not None else 0
            if size >= self.max_peers_per_swarm or self._total >= self.max_peers_total:
                self._refused += 1
                stored = False
            else:
                entry = _Peer(PeerAddress(ip, request.port), request.peer_id, request.left,
                              now, network_id, completed=False, region=region)
                if swarm is None:
                    swarm = self._swarms[request.announce_hash] = {}
                swarm[key] = entry
                self._total += 1
        else:
            entry.peer_id = request.peer_id
            entry.left = request.left
            entry.last_seen = now
            entry.network_id = network_id
            entry.region = region
        if request.event == "completed" and entry is not None and not entry.completed:
            entry.completed = True
            self._downloads[request.announce_hash] = (
                self._downloads.get(request.announce_hash, 0) + 1)
            self._downloads_total += 1

        others = [] if swarm is None else [p for k, p in swarm.items() if k != key]
        if request.is_seed:
            others = [p for p in others if p.left != 0]
        groups: list[list[_Peer]] = [[] for _ in range(6)]
        for p in others:
            if network_id is not None and p.network_id == network_id:
                place = 0
            elif region is not None and p.region == region:
                place = 2
            else:
                place = 4
            groups[place + (p.left != 0)].append(p)
        chosen: list[_Peer] = []
        for group in groups:  # random within a group; sample only what is handed out
            need = request.numwant - len(chosen)
            if need <= 0:
                break
            if need < len(group):
                chosen.extend(self._rng.sample(group, need))
            else:
                self._rng.shuffle(group)
                chosen.extend(group)
        peers = tuple(HandedPeer(p.address, p.peer_id) for p in chosen)
        complete, incomplete = _counts(swarm or {})
        return AnnounceResult(peers, complete, incomplete, stored)

    def scrape(self, announce_hash: bytes) -> ScrapeCounts:
        """BEP 48 counts of one swarm (zeros for a swarm nobody announced)."""
        now = self._clock()
        swarm = self._swarms.get(announce_hash)
        if swarm is not None:
            self._purge(announce_hash, swarm, now)
        complete, incomplete = _counts(self._swarms.get(announce_hash, {}))
        return ScrapeCounts(complete=complete, downloaded=self._downloads.get(announce_hash, 0),
                            incomplete=incomplete)

    def expire(self) -> int:
        """Drop every entry not seen for ``2 * interval_s``; return how many."""
        now = self._clock()
        self._last_sweep = now
        before = self._expired
        for announce_hash, swarm in list(self._swarms.items()):
            self._purge(announce_hash, swarm, now)
        return self._expired - before

    def network_of(self, announce_hash: bytes, ip: str, port: int) -> str | None:
        """The network id stored for a peer (the LAN-first hook), ``None`` if unknown."""
        entry = self._swarms.get(announce_hash, {}).get((ip, port))
        return None if entry is None else entry.network_id

    def statistics(self) -> RegistryStatistics:
        """A snapshot of the counters."""
        seeds = sum(1 for swarm in self._swarms.values() for p in swarm.values()
                    if p.left == 0)
        return RegistryStatistics(swarms=len(self._swarms), peers=self._total, seeds=seeds,
                                  leechers=self._total - seeds, announces=self._announces,
                                  refused=self._refused, expired=self._expired,
                                  downloads=self._downloads_total)

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep >= self.interval_s:
            self._last_sweep = now
            for announce_hash, swarm in list(self._swarms.items()):
                self._purge(announce_hash, swarm, now)

    def _purge(self, announce_hash: bytes, swarm: dict[tuple[str, int], _Peer],
               now: float) -> None:
        stale = [k for k, p in swarm.items() if now - p.last_seen > self.ttl_s]
        for k in stale:
            del swarm[k]
        self._total -= len(stale)
        self._expired += len(stale)
        if not swarm:
            del self._swarms[announce_hash]


def _counts(swarm: dict[tuple[str, int], _Peer]) -> tuple[int, int]:
    seeds = sum(1 for p in swarm.values() if p.left == 0)
    return seeds, len(swarm) - seeds
