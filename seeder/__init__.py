"""The seeder: repository keys and TUF metadata, publishing, the origin HTTP server.

- :mod:`seeder.repository`: a TUF repository on disk (k-of-n keys per role, consistent
  snapshots, changes staged until signed, rotations, counter resets, rebuild) and its
  origin tree.
- :mod:`seeder.staging`: signing requests (``REPO/staged.json``, files that travel to
  the signers); :mod:`seeder.keys` and :mod:`seeder.hsm`: key files and PKCS#11 tokens.
- :mod:`seeder.publish`: image -> zstd payload -> release manifest -> signed target.
- :mod:`seeder.origin` / :mod:`seeder.server`: a static-file ASGI app with byte ranges,
  served with the shared hypercorn adapter.
- :mod:`seeder.seeding`: seeds every published payload over BitTorrent (the swarm
  adapter :mod:`peer.swarm`), rescanning for new releases.
- :mod:`seeder.cli`: ``swarmota seeder init|publish|timestamp|serve``, and through
  :mod:`seeder.trustcli` the key ceremony (``status|sign|export|import|discard|rotate|
  counter-reset|withdraw|renew|rebuild|key``).

Errors: :mod:`seeder.errors` (``SeederError`` > ``RepositoryError`` > ``SigningError``;
``PublishError``).
Layout of the repository and origin tree: docs/ARCHITECTURE.md, "Origin tree".
"""

from swarmota.seeder.errors import PublishError, RepositoryError, SeederError
from swarmota.seeder.origin import OriginApp, OriginConfig, OriginStats
from swarmota.seeder.publish import build_full_payload, publish_release, published_releases
from swarmota.seeder.repository import ExpiryConfig, Repository
from swarmota.seeder.seeding import PayloadSeeder, SeedingConfig, SeedingStats
from swarmota.seeder.server import serve_origin

__all__ = [
    "ExpiryConfig",
    "OriginApp",
    "OriginConfig",
    "OriginStats",
    "PayloadSeeder",
    "PublishError",
    "Repository",
    "RepositoryError",
    "SeederError",
    "SeedingConfig",
    "SeedingStats",
    "build_full_payload",
    "publish_release",
    "published_releases",
    "serve_origin",
]
