"""The release catalogue's entries and the newest-counter rule. Pure.

:class:`Release` is what the tracker may offer (registered from a release manifest);
:func:`decide_offer` is the anti-downgrade rule: only a release of the device's
product whose counter is above the device's. Which of those a device gets now is the
rollout's decision (:mod:`tracker.rollout`, :mod:`tracker.director`). The wire format
the devices speak is :mod:`tracker.wire`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from manifest import ManifestFormatError, ReleaseManifest, release_target_name
from tracker.bittorrent import SwarmInfo
from tracker.errors import RequestError
from tracker.wire import MAX_RELEASE_COUNTER, CheckIn

__all__ = ["Release", "decide_offer"]


@dataclass(frozen=True)
class Release:
    """One registered release: what the tracker may offer.

    ``target`` is the TUF target name of its release manifest and always equals
    ``manifest.release_target_name(product, version)``; build with :meth:`create` or
    :meth:`from_manifest` to have it derived. ``swarms`` are the BitTorrent swarms of
    its payloads (those whose manifest entry carries an ``info_hash``), in manifest
    order; releases registered without them have none.

    Raises:
        RequestError: invalid product or version, counter outside
            0..MAX_RELEASE_COUNTER, a ``target`` that does not match, or a swarm of
            another release or listed twice.
    """

    product: str
    version: str
    release_counter: int
    target: str
    swarms: tuple[SwarmInfo, ...] = ()

    def __post_init__(self) -> None:
        try:
            expected = release_target_name(self.product, self.version)
        except ManifestFormatError as exc:
            raise RequestError(f"release: {exc}") from None
        counter = self.release_counter
        if (not isinstance(counter, int) or isinstance(counter, bool)
                or not 0 <= counter <= MAX_RELEASE_COUNTER):
            raise RequestError(f"release: release_counter {counter!r:.40} outside "
                               f"0..{MAX_RELEASE_COUNTER}")
        if self.target != expected:
            raise RequestError(f"release: target {self.target!r:.80} should be {expected!r}")
        seen: set[bytes] = set()
        for swarm in self.swarms:
            if (swarm.product, swarm.version) != (self.product, self.version):
                raise RequestError(f"release: swarm {swarm.info_hash} belongs to "
                                   f"{swarm.product} {swarm.version}")
            if swarm.announce_hash in seen:
                raise RequestError(f"release: swarm {swarm.info_hash} listed twice (or two "
                                   "info-hashes share their first 20 bytes)")
            seen.add(swarm.announce_hash)

    @classmethod
    def create(cls, product: str, version: str, release_counter: int) -> Release:
        """A release with its target name derived from product and version."""
        try:
            target = release_target_name(product, version)
        except ManifestFormatError as exc:
            raise RequestError(f"release: {exc}") from None
        return cls(product, version, release_counter, target)

    @classmethod
    def from_manifest(cls, manifest: ReleaseManifest) -> Release:
        """The catalogue entry of a parsed release manifest, with its payloads' swarms."""
        base = cls.create(manifest.product, manifest.version, manifest.release_counter)
        swarms = tuple(SwarmInfo(p.info_hash, manifest.product, manifest.version, p.kind)
                       for p in manifest.payloads if p.info_hash is not None)
        return cls(base.product, base.version, base.release_counter, base.target, swarms)


# --- decision -------------------------------------------------------------------------


def decide_offer(checkin: CheckIn, releases: Iterable[Release]) -> Release | None:
    """The release to offer ``checkin``'s device, or ``None``.

    The newest release (highest ``release_counter``) of the device's product whose
    counter is strictly higher than the device's. Releases of other products are
    ignored. Counters are unique per product, so the choice is unambiguous.
    """
    best: Release | None = None
    for release in releases:
        if release.product != checkin.product:
            continue
        if release.release_counter <= checkin.release_counter:
            continue
        if best is None or release.release_counter > best.release_counter:
            best = release
    return best
