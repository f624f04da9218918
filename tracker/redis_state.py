"""State that every tracker process must share and that changes at every announce, in
Redis: the swarms' peers and the announce replay windows. :class:`RedisState`.

The only tracker module that imports ``redis`` (redis-py); every ``redis.RedisError``
becomes a :class:`~tracker.errors.StorageError` (announces then get a ``failure
reason`` with HTTP 500, as for a database failure; check-ins and reports then get 500
too, as they raise the device's replay window). Commands never run on the event loop:
one worker thread (:class:`infra.worker.BatchWorker`) sends what is queued in one
pipeline, one round trip for up to a batch of announces.

**Peers** (the way Uber's Kraken keeps its peer store: sorted sets scored by time).
Per swarm, every key under the hash tag of its announce hash (``{hex}``, so that one
swarm lives on one Redis Cluster slot and one Lua script may touch all of its keys):

- ``...:p``: a sorted set of the swarm's peers (``ip|port``) scored by their last
  announce (epoch seconds); entries older than ``2 * interval_s`` are expired, a
  bounded number per announce, oldest first (the same rule as the in-memory
  :class:`~tracker.registry.SwarmRegistry`);
- ``...:i``: a hash of each peer's peer id, role, network and region;
- pools ``...:a:s`` / ``...:a:l`` (everyone's seeds / leechers), ``...:n:<network>:s|l``
  and ``...:r:<region>:s|l``: sorted sets of what a hand-out returns
  (``ip|port|peer id``) scored by the last announce too, which the LAN-first hand-out
  samples with ``ZRANDMEMBER ... WITHSCORES`` (uniform, O(numwant), no lookup per
  peer);
- ``...:d``: the swarm's completed downloads.

One announce is one Lua script (atomic, one round trip): expire, record (or remove on
``stopped``), hand out LAN first (network, region, anyone; a leecher gets seeds first,
a seed gets leechers only; never itself), count. Every key of a swarm expires
``2 * interval_s`` after its last announce, so swarms nobody announces to vanish by
themselves. A swarm holds at most ``max_peers_per_swarm`` peers (a new peer over it is
answered but not stored, as in memory); the number of swarms is bounded by the
registered releases, so Redis's memory is bounded too (about 300 bytes per peer).

**Announce replay windows**: the highest announce/scrape counter accepted per device
(``swarmota:ctr:<device>``), raised by a compare-and-set script, expiring after
:data:`COUNTER_TTL_S` without use (then the stored check-in/report counter is the
floor again, as for a device the in-memory window forgot). Every tracker process
checks the same value, so an announce accepted by one is a replay to all.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import outcome
import redis

from swarmota.infra.worker import BatchWorker
from swarmota.tracker.bittorrent import AnnounceRequest, HandedPeer, PeerAddress, ScrapeCounts
from swarmota.tracker.errors import StorageError
from swarmota.tracker.registry import AnnounceResult, RegistryStatistics
from swarmota.tracker.store import redact_url

__all__ = ["COUNTER_TTL_S", "RedisState"]

COUNTER_TTL_S: Final = 7 * 24 * 3600
_EXPIRE_PER_ANNOUNCE: Final = 64
_TIMEOUT_S: Final = 5.0
_HANDED_CACHE: Final = 200_000
_Commands = tuple[tuple[Any, ...], ...]

# KEYS[1]: the swarm's key prefix. ARGV: now, ttl, member, peer_id (hex), seed (0/1),
# network, region ("" for none), event, numwant, max peers, expire budget.
_ANNOUNCE = """
local prefix = KEYS[1]
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local member, peer_id, seed = ARGV[3], ARGV[4], ARGV[5]
local network, region, event = ARGV[6], ARGV[7], ARGV[8]
local numwant, max_peers, budget = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local peers, info = prefix .. 'p', prefix .. 'i'

local function pools(role, net, reg)
  local out = {prefix .. 'a:' .. role}
  if net ~= '' then out[#out + 1] = prefix .. 'n:' .. net .. ':' .. role end
  if reg ~= '' then out[#out + 1] = prefix .. 'r:' .. reg .. ':' .. role end
  return out
end

-- info: peer_id|role|network|region|completed (0/1); a pool member is what hand-outs
-- return, ip|port|peer_id, scored by the last announce like the peer itself
local function unindex(m)
  local old = redis.call('HGET', info, m)
  if old then
    local _, _, pid, role, net, reg = string.find(old, '^([^|]*)|([sl])|([^|]*)|([^|]*)|')
    for _, key in ipairs(pools(role, net, reg)) do redis.call('ZREM', key, m .. '|' .. pid) end
  end
  return old
end

local function remove(m)
  unindex(m)
  redis.call('HDEL', info, m)
  return redis.call('ZREM', peers, m)
end

local expired = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', peers, '-inf', '(' .. (now - ttl),
                              'LIMIT', 0, budget)) do
  expired = expired + remove(m)
end

local stored = 0
local role = (seed == '1') and 's' or 'l'
local own = member .. '|' .. peer_id
if event == 'stopped' then
  remove(member)
else
  local known = redis.call('ZSCORE', peers, member)
  if known or redis.call('ZCARD', peers) < max_peers then
    local old = unindex(member)
    local completed = (old and string.sub(old, -1) == '1') and '1' or '0'
    if event == 'completed' and completed == '0' then
      completed = '1'
      redis.call('INCR', prefix .. 'd')
    end
    redis.call('ZADD', peers, now, member)
    redis.call('HSET', info, member,
               peer_id .. '|' .. role .. '|' .. network .. '|' .. region .. '|' .. completed)
    for _, key in ipairs(pools(role, network, region)) do
      redis.call('ZADD', key, now, own)
      redis.call('EXPIRE', key, ttl)
    end
    stored = 1
  end
end

-- LAN first (network, region, anyone); a leecher gets seeds first, a seed leechers
-- only; a uniform draw from each pool, live members only, never the requester
local chosen, seen = {}, {}
seen[own] = true
local levels = {}
if network ~= '' then levels[#levels + 1] = 'n:' .. network .. ':' end
if region ~= '' then levels[#levels + 1] = 'r:' .. region .. ':' end
levels[#levels + 1] = 'a:'
local roles = (seed == '1') and {'l'} or {'s', 'l'}
if event ~= 'stopped' then
  for _, level in ipairs(levels) do
    for _, r in ipairs(roles) do
      local need = numwant - #chosen
      if need <= 0 then break end
      local drawn = redis.call('ZRANDMEMBER', prefix .. level .. r, need + #chosen + 1,
                               'WITHSCORES')
      for n = 1, #drawn, 2 do
        if #chosen >= numwant then break end
        local m = drawn[n]
        if not seen[m] and tonumber(drawn[n + 1]) >= now - ttl then
          seen[m] = true
          chosen[#chosen + 1] = m
        end
      end
    end
  end
end
for _, key in ipairs({peers, info, prefix .. 'd'}) do redis.call('EXPIRE', key, ttl) end
return {stored, expired, redis.call('ZCARD', prefix .. 'a:s'),
        redis.call('ZCARD', prefix .. 'a:l'), chosen}
"""

# KEYS[1]: the device's counter key. ARGV: counter, the database's floor ("" not read
# yet, "none" if it has none), ttl. Returns -1 (accepted: the new floor), -2 (no floor
# here: read the database's and call again), or the floor that refuses it.
_ACCEPT_COUNTER = """
local floor = redis.call('GET', KEYS[1])
if not floor then
  if ARGV[2] == '' then return -2 end
  floor = ARGV[2]
end
local counter = tonumber(ARGV[1])
if floor ~= 'none' and counter <= tonumber(floor) then return tonumber(floor) end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return -1
"""

# KEYS[1]: the device's counter key. ARGV: counter, ttl. Raise to at least counter.
_RAISE_COUNTER = """
local floor = tonumber(redis.call('GET', KEYS[1]) or '')
if not floor or floor < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return 0
"""


@dataclass
class _Stats:
    announces: int = 0
    refused: int = 0
    expired: int = 0
    seeds: int = 0
    leechers: int = 0


class RedisState:
    """Peers and announce replay windows of every tracker process, in the Redis at
    ``url`` (``redis://[:password@]host:port/db``, ``rediss://`` for TLS, or
    ``unix:///path/to/socket``).

    ``interval_s`` is the announce interval (peers expire after twice it);
    ``max_peers_per_swarm`` bounds each swarm; ``clock`` gives epoch seconds (every
    process's clock scores the same sets: keep them in sync, as NTP does; expiry is
    minutes, far above any sane skew).

    Raises:
        ConfigError: the URL does not parse (from :func:`redis.from_url`, as
            ``ValueError``; the caller's command line reports it).
    """

    def __init__(self, url: str, *, interval_s: float, max_peers_per_swarm: int,
                 clock: Callable[[], float] = time.time, prefix: str = "swarmota") -> None:
        self.url = url
        self.ttl_s = 2 * interval_s
        self.max_peers_per_swarm = max_peers_per_swarm
        self._clock = clock
        self._prefix = prefix
        self._client = redis.Redis.from_url(
            url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S,
            health_check_interval=30)
        self._scripts = {name: self._client.register_script(text) for name, text in (
            ("announce", _ANNOUNCE), ("accept", _ACCEPT_COUNTER), ("raise", _RAISE_COUNTER))}
        self._worker: BatchWorker[_Commands] = BatchWorker("tracker-redis", self._pipeline,
                                                           batch=64)
        self._stats = _Stats()
        self._handed: dict[bytes, HandedPeer] = {}  # reused: their compact form is cached

    # --- plumbing -----------------------------------------------------------------------

    async def _run(self, what: str, *commands: tuple[Any, ...]) -> list[Any]:
        """The replies to ``commands`` (``("script", name, keys, args)`` or a raw
        command), sent in the worker's next pipeline.

        Raises:
            StorageError: Redis failed, or refused a command.
        """
        try:
            replies: list[Any] = await self._worker.submit(commands)
        except redis.RedisError as exc:
            raise StorageError(f"{what}: Redis at {redact_url(self.url)}: {exc}") from exc
        return replies

    def _pipeline(self, batch: Sequence[_Commands]) -> list[outcome.Outcome[Any]]:
        """In the worker thread: every command of ``batch`` in one pipeline (scripts by
        their digest, loaded again if Redis lost them)."""
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for commands in batch:
                for command in commands:
                    if command[0] == "script":
                        _, name, keys, args = command
                        pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
                    else:
                        pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            try:
                replies = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:
                return [outcome.Error(exc)] * len(batch)
            if attempt == 0 and any(isinstance(r, redis.exceptions.NoScriptError)
                                    for r in replies):
                for script in self._scripts.values():  # Redis restarted: load them again
                    self._client.script_load(script.script)
                continue
            out: list[outcome.Outcome[Any]] = []
            at = 0
            for commands in batch:
                mine = replies[at:at + len(commands)]
                at += len(commands)
                failed = next((r for r in mine if isinstance(r, Exception)), None)
                out.append(outcome.Error(failed) if failed is not None else outcome.Value(mine))
            return out
        raise RuntimeError("unreachable")

    def ping(self) -> None:
        """Check that Redis answers and load the scripts (blocking).

        Raises:
            StorageError: it does not.
        """
        try:
            self._client.ping()
            for script in self._scripts.values():
                self._client.script_load(script.script)
        except redis.RedisError as exc:
            raise StorageError(f"Redis at {redact_url(self.url)}: {exc}") from exc

    def close(self) -> None:
        self._client.close()

    def _swarm(self, announce_hash: bytes) -> str:
        return f"{self._prefix}:sw:{{{announce_hash.hex()}}}:"

    # --- peers --------------------------------------------------------------------------

    async def announce(self, request: AnnounceRequest, ip: str, network_id: str | None,
                       region: str | None) -> AnnounceResult:
        """Record ``request`` from ``ip`` and choose its peers (see the module docstring).

        Raises:
            StorageError: Redis failed.
        """
        args = (self._clock(), self.ttl_s, f"{ip}|{request.port}", request.peer_id.hex(),
                "1" if request.is_seed else "0", _field(network_id), _field(region),
                request.event, request.numwant, self.max_peers_per_swarm,
                _EXPIRE_PER_ANNOUNCE)
        (stored, expired, seeds, leechers, chosen), = await self._run(
            "announce", ("script", "announce", [self._swarm(request.announce_hash)], args))
        stats = self._stats
        stats.announces += 1
        stats.expired += int(expired)
        stats.seeds, stats.leechers = int(seeds), int(leechers)
        if not stored and request.event != "stopped":
            stats.refused += 1
        handed = self._handed
        peers = []
        for raw in chosen:
            peer = handed.get(raw)
            if peer is None:
                peer_ip, port, peer_id = raw.decode("ascii").rsplit("|", 2)
                peer = HandedPeer(PeerAddress(peer_ip, int(port)), bytes.fromhex(peer_id))
                if len(handed) >= _HANDED_CACHE:
                    handed.clear()
                handed[raw] = peer
            peers.append(peer)
        return AnnounceResult(tuple(peers), int(seeds), int(leechers), bool(stored))

    async def scrape(self, announce_hash: bytes) -> ScrapeCounts:
        """BEP 48 counts of one swarm (zeros for one nobody announced to lately).

        Raises:
            StorageError: Redis failed.
        """
        prefix = self._swarm(announce_hash)
        complete, downloaded, incomplete = await self._run(
            "scrape", ("ZCARD", prefix + "a:s"), ("GET", prefix + "d"),
            ("ZCARD", prefix + "a:l"))
        return ScrapeCounts(int(complete), int(downloaded or 0), int(incomplete))

    def statistics(self) -> RegistryStatistics:
        """This process's view: its own announces, refusals and expiries, and the seeds
        and leechers of the swarm it saw last (the shared totals are Redis's)."""
        s = self._stats
        return RegistryStatistics(swarms=0, peers=s.seeds + s.leechers, seeds=s.seeds,
                                  leechers=s.leechers, announces=s.announces,
                                  refused=s.refused, expired=s.expired, downloads=0)

    # --- announce replay windows -----------------------------------------------------------

    async def accept_counter(self, device_id: str, counter: int,
                             stored_floor: Callable[[], Awaitable[int | None]]
                             ) -> int | None:
        """Accept ``counter`` for ``device_id`` if it is above the highest one any
        process accepted (or, when Redis has none, above ``await stored_floor()``, the
        database's check-in/report counter, read only then): ``None``, and it is the new
        floor. Otherwise the floor that refuses it.

        Raises:
            StorageError: Redis (or ``stored_floor``) failed.
        """
        key = f"{self._prefix}:ctr:{device_id}"
        found = int((await self._run("check a replay window", (
            "script", "accept", [key], [counter, "", COUNTER_TTL_S])))[0])
        if found == -2:
            floor = await stored_floor()
            found = int((await self._run("check a replay window", (
                "script", "accept", [key],
                [counter, "none" if floor is None else floor, COUNTER_TTL_S])))[0])
        return None if found == -1 else found

    async def raise_counter(self, device_id: str, counter: int) -> None:
        """A check-in or report signed with ``counter`` was accepted: announces signed
        before it are replays for every process.

        Raises:
            StorageError: Redis failed.
        """
        await self._run("raise a replay window", (
            "script", "raise", [f"{self._prefix}:ctr:{device_id}"], [counter, COUNTER_TTL_S]))


def _field(value: str | None) -> str:
    """A network or region as a key part: ``|`` and ``:`` would confuse the layout, so
    they are escaped (ids are short printable strings in practice)."""
    if value is None:
        return ""
    return value.replace("%", "%25").replace("|", "%7C").replace(":", "%3A")

