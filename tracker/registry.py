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

Cost: an announce costs O(numwant) in the common case, not O(swarm size): each swarm
keeps its entries in last-announce order (expiry pops from the front), its seed count,
and indexed pools per (everyone | network | region) x (seed | leecher), each holding
its entries, what a hand-out gives of them (:class:`~tracker.bittorrent.HandedPeer`)
and their compact forms side by side. A group larger than twice what is still wanted
is sampled by drawing positions uniformly (:func:`draw_positions`, all of a batch at
once) and rejecting the requester, duplicates and peers of an earlier group (their
positions, found once per sample). When too many draws are rejected (e.g. most of the
swarm is on the requester's LAN) the group is scanned exactly instead. Either way each
group's hand-out is a uniform random sample, and the answer is joined from the compact
forms taken at the chosen positions: the per-peer work of an announce is done in C.
"""

from __future__ import annotations

import itertools
import operator
import random
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Final

from swarmota.tracker.bittorrent import AnnounceRequest, HandedPeer, PeerAddress, ScrapeCounts

__all__ = [
    "DEFAULT_MAX_PEERS_PER_SWARM",
    "DEFAULT_MAX_PEERS_TOTAL",
    "AnnounceResult",
    "RegistryStatistics",
    "SwarmRegistry",
    "draw_positions",
]

DEFAULT_MAX_PEERS_PER_SWARM: Final = 2000
DEFAULT_MAX_PEERS_TOTAL: Final = 200_000


@dataclass(eq=False)  # hashed by identity: pools index entries themselves
class _Peer:
    address: PeerAddress
    peer_id: bytes
    left: int
    last_seen: float
    network_id: str | None
    completed: bool
    handed: HandedPeer  # what hand-outs return, built again only for a new peer id
    region: str | None = None


_Key = tuple[str, int]
_PoolId = tuple[int, str | None, bool]  # (_EVERYONE | _NETWORK | _REGION, value, seed)
_EVERYONE, _NETWORK, _REGION = 0, 1, 2


class _Pool:
    """A set of entries with O(1) add, discard, membership and uniform random pick:
    ``members[i]`` is an entry, ``handed[i]`` what a hand-out gives of it,
    ``compact[i]`` its address in compact form (what an answer is made of), and
    ``index`` maps an entry to its ``i``."""

    __slots__ = ("compact", "handed", "index", "members")

    def __init__(self) -> None:
        self.members: list[_Peer] = []
        self.handed: list[HandedPeer] = []
        self.compact: list[bytes] = []
        self.index: dict[_Peer, int] = {}

    def add(self, peer: _Peer) -> None:
        if peer not in self.index:
            self.index[peer] = len(self.members)
            self.members.append(peer)
            self.handed.append(peer.handed)
            self.compact.append(peer.handed.compact)

    def discard(self, peer: _Peer) -> None:
        i = self.index.pop(peer, None)
        if i is None:
            return
        last = self.members.pop()
        handed = self.handed.pop()
        compact = self.compact.pop()
        if i < len(self.members):
            self.members[i] = last
            self.handed[i] = handed
            self.compact[i] = compact
            self.index[last] = i

    def handed_changed(self, peer: _Peer) -> None:
        """``peer.handed`` is new (another peer id)."""
        self.handed[self.index[peer]] = peer.handed


class _Swarm:
    """One swarm's entries (oldest announce first), seed count and pools."""

    __slots__ = ("peers", "pools", "seeds")

    def __init__(self) -> None:
        self.peers: OrderedDict[_Key, _Peer] = OrderedDict()
        self.pools: dict[_PoolId, _Pool] = {}
        self.seeds = 0

    def __len__(self) -> int:
        return len(self.peers)

    def add(self, key: _Key, peer: _Peer) -> None:
        self.peers[key] = peer
        self._index(peer)

    def remove(self, key: _Key) -> _Peer | None:
        peer = self.peers.pop(key, None)
        if peer is not None:
            self._unindex(peer)
        return peer

    def update(self, key: _Key, peer: _Peer, request: AnnounceRequest, now: float,
               network_id: str | None, region: str | None) -> None:
        reindex = ((peer.left == 0) != (request.left == 0) or peer.network_id != network_id
                   or peer.region != region)
        if reindex:
            self._unindex(peer)
        new_id = peer.peer_id != request.peer_id
        if new_id:
            peer.peer_id = request.peer_id
            peer.handed = HandedPeer(peer.address, request.peer_id)
        peer.left = request.left
        peer.last_seen = now
        peer.network_id = network_id
        peer.region = region
        if reindex:
            self._index(peer)
        elif new_id:
            for pool_id in self._pool_ids(peer):
                self.pools[pool_id].handed_changed(peer)
        self.peers.move_to_end(key)

    def _pool_ids(self, peer: _Peer) -> list[_PoolId]:
        seed = peer.left == 0
        ids: list[_PoolId] = [(_EVERYONE, None, seed)]
        if peer.network_id is not None:
            ids.append((_NETWORK, peer.network_id, seed))
        if peer.region is not None:
            ids.append((_REGION, peer.region, seed))
        return ids

    def _index(self, peer: _Peer) -> None:
        self.seeds += peer.left == 0
        for pool_id in self._pool_ids(peer):
            pool = self.pools.get(pool_id)
            if pool is None:
                pool = self.pools[pool_id] = _Pool()
            pool.add(peer)

    def _unindex(self, peer: _Peer) -> None:
        self.seeds -= peer.left == 0
        for pool_id in self._pool_ids(peer):
            pool = self.pools.get(pool_id)
            if pool is not None:
                pool.discard(peer)
                if not pool.members:
                    del self.pools[pool_id]


@dataclass(frozen=True)
class AnnounceResult:
    """What an announce gets: peers to try and the swarm's counts (requester included).
    ``compact_peers``: each peer's :attr:`~tracker.bittorrent.HandedPeer.compact`, in
    the same order, when the registry keeps them at hand (the answer is made of them);
    ``None``: read them from ``peers``."""

    peers: tuple[HandedPeer, ...]
    complete: int
    incomplete: int
    stored: bool
    compact_peers: tuple[bytes, ...] | None = dataclass_field(default=None, compare=False,
                                                              repr=False)


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
        self._swarms: dict[bytes, _Swarm] = {}
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
            if swarm is not None and swarm.remove(key) is not None:
                self._total -= 1
                if not swarm:
                    del self._swarms[request.announce_hash]
            return AnnounceResult((), *_counts(swarm), stored=False)

        entry = swarm.peers.get(key) if swarm is not None else None
        stored = True
        if entry is None:
            size = len(swarm) if swarm is not None else 0
            if size >= self.max_peers_per_swarm or self._total >= self.max_peers_total:
                self._refused += 1
                stored = False
            else:
                address = PeerAddress(ip, request.port)
                entry = _Peer(address, request.peer_id, request.left, now, network_id,
                              completed=False, handed=HandedPeer(address, request.peer_id),
                              region=region)
                if swarm is None:
                    swarm = self._swarms[request.announce_hash] = _Swarm()
                swarm.add(key, entry)
                self._total += 1
        else:
            assert swarm is not None
            swarm.update(key, entry, request, now, network_id, region)
        if request.event == "completed" and entry is not None and not entry.completed:
            entry.completed = True
            self._downloads[request.announce_hash] = (
                self._downloads.get(request.announce_hash, 0) + 1)
            self._downloads_total += 1

        if swarm is None:
            return AnnounceResult((), 0, 0, stored, compact_peers=())
        peers, compact = self._hand_out(swarm, entry, request.numwant, request.is_seed,
                                        network_id, region)
        return AnnounceResult(tuple(peers), *_counts(swarm), stored,
                              compact_peers=tuple(compact))

    def _hand_out(self, swarm: _Swarm, me: _Peer | None, numwant: int, is_seed: bool,
                  network_id: str | None, region: str | None
                  ) -> tuple[list[HandedPeer], list[bytes]]:
        """LAN first, then region, then anyone; seeds before leechers in each (a seed
        gets leechers only); uniform random within each group; never ``me``. The peers
        chosen, and their compact forms."""
        chosen: list[HandedPeer] = []
        compact: list[bytes] = []
        roles = (False,) if is_seed else (True, False)
        pools = swarm.pools
        levels: list[tuple[int, str | None]] = []
        if network_id is not None:
            levels.append((_NETWORK, network_id))
        if region is not None:
            levels.append((_REGION, region))
        levels.append((_EVERYONE, None))
        earlier: list[_Pool] = []  # a peer of an earlier group is not handed out again
        for level, value in levels:
            for seed in roles:
                need = numwant - len(chosen)
                if need <= 0:
                    return chosen, compact
                pool = pools.get((level, value, seed))
                if pool is None:
                    continue
                positions = self._sample(pool, need, me, earlier)
                if len(positions) > 1:
                    take = operator.itemgetter(*positions)
                    chosen += take(pool.handed)
                    compact += take(pool.compact)
                elif positions:
                    chosen.append(pool.handed[positions[0]])
                    compact.append(pool.compact[positions[0]])
            if level != _EVERYONE:
                earlier += [pool for seed in (True, False)
                            if (pool := pools.get((level, value, seed))) is not None]
        return chosen, compact

    def _sample(self, pool: _Pool, need: int, me: _Peer | None,
                excluded: list[_Pool]) -> list[int]:
        """The positions in ``pool`` of up to ``need`` peers, a uniform random sample,
        leaving out ``me`` and the members of the ``excluded`` pools (positions: small
        integers, cheap to hash)."""
        members, rng = pool.members, self._rng
        size = len(members)
        banned = _positions(pool, me, excluded)
        if size > 2 * need + 8 and (banned is None or len(banned) <= size // 2):
            # The first ``need`` distinct, admissible draws of a sequence of uniform
            # draws (with replacement) are a uniform sample; drawn in batches, a
            # bounded number of them, then an exact scan if too many were rejected.
            # ``dict.fromkeys`` keeps each position's first draw, in order.
            picked: dict[int, None] = {}
            for _ in range(4):
                batch = dict.fromkeys(draw_positions(rng, size,
                                                     need - len(picked) + (need >> 3) + 4))
                if banned is None:  # a crowded group to leave out: test each draw
                    batch = {i: None for i in batch
                             if members[i] is not me
                             and not any(members[i] in out.index for out in excluded)}
                else:
                    for i in banned:
                        batch.pop(i, None)
                if picked:
                    picked.update(batch)
                else:
                    picked = batch
                if len(picked) >= need:
                    return list(itertools.islice(picked, need))
        admissible = [i for i in range(size) if members[i] is not me]
        for out in excluded:
            out_index = out.index
            admissible = [i for i in admissible if members[i] not in out_index]
        if need < len(admissible):
            return rng.sample(admissible, need)
        rng.shuffle(admissible)
        return admissible

    def scrape(self, announce_hash: bytes) -> ScrapeCounts:
        """BEP 48 counts of one swarm (zeros for a swarm nobody announced)."""
        now = self._clock()
        swarm = self._swarms.get(announce_hash)
        if swarm is not None:
            self._purge(announce_hash, swarm, now)
        complete, incomplete = _counts(self._swarms.get(announce_hash))
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
        swarm = self._swarms.get(announce_hash)
        entry = None if swarm is None else swarm.peers.get((ip, port))
        return None if entry is None else entry.network_id

    def statistics(self) -> RegistryStatistics:
        """A snapshot of the counters."""
        seeds = sum(swarm.seeds for swarm in self._swarms.values())
        return RegistryStatistics(swarms=len(self._swarms), peers=self._total, seeds=seeds,
                                  leechers=self._total - seeds, announces=self._announces,
                                  refused=self._refused, expired=self._expired,
                                  downloads=self._downloads_total)

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep >= self.interval_s:
            self._last_sweep = now
            for announce_hash, swarm in list(self._swarms.items()):
                self._purge(announce_hash, swarm, now)

    def _purge(self, announce_hash: bytes, swarm: _Swarm, now: float) -> None:
        """Drop expired entries: the oldest announces come first, stop at a live one."""
        peers = swarm.peers
        while peers:
            key = next(iter(peers))
            if now - peers[key].last_seen <= self.ttl_s:
                break
            swarm.remove(key)
            self._total -= 1
            self._expired += 1
        if not peers:
            del self._swarms[announce_hash]


def _positions(pool: _Pool, me: _Peer | None, excluded: list[_Pool]) -> list[int] | None:
    """The positions in ``pool`` of ``me`` and of the members of the ``excluded``
    pools; ``None`` when those pools are too large to walk for each sample (over 64
    members: a crowded LAN or region)."""
    if sum(len(out.members) for out in excluded) > 64:
        return None
    index = pool.index
    found = [index.get(peer) for out in excluded for peer in out.members]
    found.append(None if me is None else index.get(me))
    return [i for i in found if i is not None]


def draw_positions(rng: random.Random, size: int, count: int) -> list[int]:
    """``count`` uniform draws (with replacement) of a position in ``range(size)``.

    Draw ``i`` takes ``v``, the low 64 bits of the ``i``-th 128-bit slot of
    ``rng.getrandbits(128 * count)``, to the position ``(v * size) >> 64`` (Lemire's
    multiply-shift: the relative bias is below ``size / 2**64``). All draws are made
    at once in C, not with one Python multiplication each (the hand-out's largest
    cost): the upper half of every slot is cleared, the whole integer is multiplied
    by ``size`` (each slot's product is below ``2**128``, so none carries into the
    next), and the positions are the upper 64 bits of each slot.

    Raises:
        ValueError: ``size`` not within 1..2**64.
    """
    if not 1 <= size <= 2**64:
        raise ValueError(f"size must be within 1..2**64, got {size}")
    low = _LOW_HALVES if count <= _LOW_HALVES_SLOTS else _low_halves(count)
    bits = rng.getrandbits(128 * count) & low
    words = array("Q", (bits * size).to_bytes(16 * count, "little"))
    if sys.byteorder != "little":
        words.byteswap()
    return words[1::2].tolist()


def _low_halves(slots: int) -> int:
    """The integer whose 128-bit slots each hold 2**64 - 1."""
    return int.from_bytes((b"\xff" * 8 + bytes(8)) * slots, "little")


_LOW_HALVES_SLOTS: Final = 256
_LOW_HALVES: Final = _low_halves(_LOW_HALVES_SLOTS)


def _counts(swarm: _Swarm | None) -> tuple[int, int]:
    if swarm is None:
        return 0, 0
    return swarm.seeds, len(swarm) - swarm.seeds
