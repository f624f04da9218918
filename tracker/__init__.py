"""The tracker: which release each device should install, and what devices report.

Devices check in (``POST /v1/checkin``) with their product, hardware id, version and
release counter (and optionally their network id and region); the tracker records them
and offers the newest registered release of their product with a higher counter whose
rollout admits the device (canaries, then percentage stages; a release without a
rollout is offered to nobody). After an attempt they report the outcome
(``POST /v1/report``), which feeds the rollout: stages advance on successes and soak
time, and the rollout halts by itself on failures. Operators register releases (each
verified against the repository's signed metadata) and steer rollouts through the admin
API (``/v1/admin/...``, bearer tokens with roles, audited); ``/metrics`` serves
Prometheus counters.

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

Layout (pure core, thin shells; see docs/ARCHITECTURE.md, "The tracker"):

- :mod:`tracker.wire`: the device<->tracker wire format, written once; the agent
  imports it (and nothing else of the tracker). Pure.
- :mod:`tracker.protocol`: catalogue entries (:class:`Release`) and the
  newest-counter-per-sequence rule. Pure.
- :mod:`tracker.rollout`: rollouts as a state machine; :mod:`tracker.offers`: which
  release a check-in gets. Pure.
- :mod:`tracker.director`: the :class:`Director`, the one domain object: store,
  caches, counters, clocks; each decision one store transaction around a pure function.
- :mod:`tracker.identity`: device identity (the fleet CA, the :class:`DeviceGate`).
- :mod:`tracker.release_trust`: releases registered through the API verified against
  the repository's signed TUF metadata (httpx adapter).
- :mod:`tracker.admin`: the admin API's roles, tokens, route table and actions;
  :mod:`tracker.views`: its JSON views; :mod:`tracker.openapi`: its OpenAPI document.
- :mod:`tracker.metrics`: every counter declared once; Prometheus text. Pure.
- :mod:`tracker.catalogue`: register a release, start a rollout (written once).
- :mod:`tracker.bittorrent`: announce/scrape parsing and bencoded answers (pure);
  :mod:`tracker.registry`: the in-memory peer registry; :mod:`tracker.proxies`: the
  client's address behind trusted reverse proxies.
- :mod:`tracker.store`: the :class:`Store` interface, its records and ``open_store``
  by URL; :mod:`tracker.sql_store`: every statement, once; :mod:`tracker.sqlite_store`
  (``SqliteStore``) and :mod:`tracker.pg_store` (``PgStore``, PostgreSQL): the engines;
  :mod:`tracker.backup`: consistent backups and restores of an SQLite database.
- :mod:`tracker.redis_state`: the peers and announce replay windows that several
  tracker processes share, in Redis.
- Front ends, thin: :mod:`tracker.app` (ASGI), :mod:`tracker.device_api` (check-ins and
  reports) and :mod:`tracker.bt_api` (the BitTorrent API), which both listeners call,
  :mod:`tracker.announce_server` (the lean endpoint);
  :mod:`tracker.server` runs them; :mod:`tracker.cli` is ``swarmota tracker ...``;
  :mod:`tracker.admin_client` the admin API's client.
- The client side (the operator's command line, and the seeder's ``--register``):
  :mod:`tracker.client_settings` (URL, CA file, token from flags, environment, a config
  file), :mod:`tracker.plan_file` (rollout plans from TOML files and flags; pure),
  :mod:`tracker.client_cli` (their command-line options, registration),
  :mod:`tracker.render` (tables for people; pure), :mod:`tracker.watch` (``rollout
  watch``).
- :mod:`tracker.errors`: the exception tree.
"""
