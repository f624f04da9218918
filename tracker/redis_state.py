"""State that every tracker process must share and that changes at every announce, in
Redis: the swarms' peers and the announce replay windows. :class:`RedisState`.

The only tracker module that imports ``redis`` (redis-py); every ``redis.RedisError``
becomes a :class:`~tracker.errors.StorageError` (announces then get a ``failure
reason`` with HTTP 500, as for a database failure; check-ins and reports do not touch
Redis). The calls are blocking and run in worker threads (``trio.to_thread``), at most
:data:`MAX_THREADS` at once, never on the event loop.

**Peers** (the way Uber's Kraken keeps its peer store: sorted sets scored by time).
Per swarm, every key under the hash tag of its announce hash (``{hex}``, so that one
swarm lives on one Redis Cluster slot and one Lua script may touch all of its keys):

- ``...:p``: a sorted set of the swarm's peers (``ip|port``) scored by their last
  announce (epoch seconds); entries older than ``2 * interval_s`` are expired, a
  bounded number per announce, oldest first (the same rule as the in-memory
  :class:`~tracker.registry.SwarmRegistry`);
- ``...:i``: a hash of each peer's peer id, role, network and region;
- pools ``...:a:s`` / ``...:a:l`` (everyone's seeds / leechers), ``...:n:<network>:s|l``
  and ``...:r:<region>:s|l``: sorted sets that the LAN-first hand-out samples with
  ``ZRANDMEMBER`` (uniform, O(numwant));
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

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import redis
import trio

from tracker.bittorrent import AnnounceRequest, HandedPeer, PeerAddress, ScrapeCounts
from tracker.errors import StorageError
from tracker.registry import AnnounceResult, RegistryStatistics
from tracker.store import redact_url

__all__ = ["COUNTER_TTL_S", "MAX_THREADS", "RedisState"]

MAX_THREADS: Final = 16
COUNTER_TTL_S: Final = 7 * 24 * 3600
_EXPIRE_PER_ANNOUNCE: Final = 64
_TIMEOUT_S: Final = 5.0

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

-- info: peer_id|role|network|region|completed (0/1)
local function unindex(m)
  local old = redis.call('HGET', info, m)
  if old then
    local _, _, role, net, reg = string.find(old, '^[^|]*|([sl])|([^|]*)|([^|]*)|')
    for _, key in ipairs(pools(role, net, reg)) do redis.call('ZREM', key, m) end
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
      redis.call('ZADD', key, now, member)
      redis.call('EXPIRE', key, ttl)
    end
    stored = 1
  end
end

local chosen, seen = {}, {}
seen[member] = true
local levels = {}
if network ~= '' then levels[#levels + 1] = {'n:' .. network .. ':'} end
if region ~= '' then levels[#levels + 1] = {'r:' .. region .. ':'} end
levels[#levels + 1] = {'a:'}
local roles = (seed == '1') and {'l'} or {'s', 'l'}
if event ~= 'stopped' then
  for _, level in ipairs(levels) do
    for _, r in ipairs(roles) do
      local need = numwant - #chosen
      if need <= 0 then break end
      local key = prefix .. level[1] .. r
      local drawn = redis.call('ZRANDMEMBER', key, need + #chosen + 1)
      for _, m in ipairs(drawn) do
        if #chosen >= numwant then break end
        if not seen[m] then
          seen[m] = true
          local at = redis.call('ZSCORE', peers, m)
          if at and tonumber(at) >= now - ttl then
            local data = redis.call('HGET', info, m)
            if data then chosen[#chosen + 1] = m .. '|' .. string.match(data, '^[^|]*') end
          end
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
            health_check_interval=30, max_connections=MAX_THREADS)
        self._announce = self._client.register_script(_ANNOUNCE)
        self._accept = self._client.register_script(_ACCEPT_COUNTER)
        self._raise = self._client.register_script(_RAISE_COUNTER)
        self._limiter = trio.CapacityLimiter(MAX_THREADS)
        self._stats = _Stats()
        self._downloads_seen = 0

    # --- plumbing -----------------------------------------------------------------------

    async def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` in a worker thread; Redis errors become StorageError."""
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except redis.RedisError as exc:
            raise StorageError(f"{what}: Redis at {redact_url(self.url)}: {exc}") from exc

    def ping(self) -> None:
        """Check that Redis answers (blocking).

        Raises:
            StorageError: it does not.
        """
        try:
            self._client.ping()
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
        stored, expired, seeds, leechers, chosen = await self._run(
            "announce", functools.partial(self._announce, keys=[self._swarm(
                request.announce_hash)], args=args))
        stats = self._stats
        stats.announces += 1
        stats.expired += int(expired)
        stats.seeds, stats.leechers = int(seeds), int(leechers)
        if not stored and request.event != "stopped":
            stats.refused += 1
        peers = []
        for raw in chosen:
            peer_ip, port, peer_id = raw.decode("ascii").rsplit("|", 2)
            peers.append(HandedPeer(PeerAddress(peer_ip, int(port)), bytes.fromhex(peer_id)))
        return AnnounceResult(tuple(peers), int(seeds), int(leechers), bool(stored))

    async def scrape(self, announce_hash: bytes) -> ScrapeCounts:
        """BEP 48 counts of one swarm (zeros for one nobody announced to lately).

        Raises:
            StorageError: Redis failed.
        """
        prefix = self._swarm(announce_hash)

        def counts() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.zcard(prefix + "a:s")
            pipe.get(prefix + "d")
            pipe.zcard(prefix + "a:l")
            return list(pipe.execute())

        complete, downloaded, incomplete = await self._run("scrape", counts)
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
        found = int(await self._run("check a replay window", functools.partial(
            self._accept, keys=[key], args=[counter, "", COUNTER_TTL_S])))
        if found == -2:
            floor = await stored_floor()
            found = int(await self._run("check a replay window", functools.partial(
                self._accept, keys=[key],
                args=[counter, "none" if floor is None else floor, COUNTER_TTL_S])))
        return None if found == -1 else found

    async def raise_counter(self, device_id: str, counter: int) -> None:
        """A check-in or report signed with ``counter`` was accepted: announces signed
        before it are replays for every process.

        Raises:
            StorageError: Redis failed.
        """
        await self._run("raise a replay window", functools.partial(
            self._raise, keys=[f"{self._prefix}:ctr:{device_id}"],
            args=[counter, COUNTER_TTL_S]))

    async def forget_counter(self, device_id: str) -> None:
        """The device's certificates were revoked: its counters start over.

        Raises:
            StorageError: Redis failed.
        """
        await self._run("reset a replay window", functools.partial(
            self._client.delete, f"{self._prefix}:ctr:{device_id}"))


def _field(value: str | None) -> str:
    """A network or region as a key part: ``|`` and ``:`` would confuse the layout, so
    they are escaped (ids are short printable strings in practice)."""
    if value is None:
        return ""
    return value.replace("%", "%25").replace("|", "%7C").replace(":", "%3A")

