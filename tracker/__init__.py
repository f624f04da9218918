"""The tracker: which release each device should install, and what devices report.

Devices check in (``POST /v1/checkin``) with their product, hardware id, version and
release counter (and optionally their network id and region); the tracker records them
and offers the newest registered release of their product with a higher counter whose
rollout admits the device (canaries, then percentage stages; a release without a
rollout is offered to nobody). After an attempt they report the outcome
(``POST /v1/report``), which feeds the rollout: stages advance on successes and soak
time, and the rollout halts by itself on failures. Operators register releases from
release manifest files and steer rollouts through the admin API (``/v1/admin/...``,
bearer tokens with roles, audited); ``/metrics`` serves Prometheus counters.

The tracker is also a BitTorrent HTTP tracker for the swarms of registered releases'
payloads (each manifest payload's ``info_hash``, the torrent's SHA-256 v2 info-hash;
clients announce its first 20 bytes). The announce URL to put in torrents is
``<tracker>/announce`` (e.g. ``http://tracker.example:8470/announce``); scrapes go to
``<tracker>/scrape``. Unknown info-hashes get a ``failure reason``. Peers are kept in
memory only (a restart forgets them; clients re-announce within one interval).

The tracker is untrusted for integrity: it only names a release; devices verify it
against signed TUF metadata and refuse anything not applicable or not newer. Devices
authenticate to it: with ``TrackerConfig.device_ca`` set, every device request must be
signed by a fleet identity, name the certificate's device id and carry a counter above
the device's last one (:mod:`tracker.identity`); without it (lab mode) nothing is
checked.

Layout (pure core, thin shells):

- :mod:`tracker.protocol`: request parsing, the offer decision, answers. Pure.
- :mod:`tracker.rollout`: rollouts as a state machine (events and a clock in,
  decisions out). Pure.
- :mod:`tracker.admin`: roles, tokens, admin API views. Pure.
- :mod:`tracker.metrics`: Prometheus text. Pure.
- :mod:`tracker.catalogue`: register a release and start its rollout.
- :mod:`tracker.admin_client`: the admin API client (httpx) behind the CLI.
- :mod:`tracker.bittorrent`: announce/scrape query parsing and bencoded answers. Pure.
- :mod:`tracker.registry`: :class:`SwarmRegistry`, the in-memory peer registry
  (bounded, expiring, clock and RNG passed in).
- :mod:`tracker.identity`: device identity on the tracker: the fleet CA trust, refusal
  kinds, the in-memory announce counter window. Pure but for reading the CA file.
- :mod:`tracker.store`: the :class:`Store` interface and :class:`SqliteStore`.
- :mod:`tracker.app`: the raw ASGI application, :class:`TrackerApp`.
- :mod:`tracker.announce_server`: the lean BitTorrent endpoint (``/announce`` and
  ``/scrape`` over raw trio streams, a strict HTTP/1.1 subset) deciding through the
  same :class:`TrackerApp`.
- :mod:`tracker.server`: :func:`serve_tracker` / :func:`serve_tracker_endpoints`,
  store + app + hypercorn (+ the lean endpoint) on trio.
- :mod:`tracker.cli`: ``swarmota tracker ...``.
- :mod:`tracker.errors`: the exception tree.
"""
