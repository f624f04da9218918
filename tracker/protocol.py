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
from typing import Any

from swarmota.manifest import ManifestFormatError, ReleaseManifest, release_target_name
from swarmota.tracker.bittorrent import SwarmInfo
from swarmota.tracker.errors import RequestError
from swarmota.tracker.wire import MAX_RELEASE_COUNTER, CheckIn

__all__ = ["PayloadSummary", "Release", "decide_offer", "floor_of", "newer_releases"]


@dataclass(frozen=True)
class PayloadSummary:
    """One payload of a registered release, as operators see it: ``kind`` (``full`` or
    ``delta``), ``encoding``, ``size`` in bytes, its SHA-256 and, for a delta, the
    SHA-256 of the image it applies to."""

    kind: str
    encoding: str
    size: int
    sha256: str
    base_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        """As the admin API shows it and the store keeps it (``base_sha256`` only for a
        delta)."""
        out: dict[str, Any] = {"kind": self.kind, "encoding": self.encoding,
                               "size": self.size, "sha256": self.sha256}
        if self.base_sha256 is not None:
            out["base_sha256"] = self.base_sha256
        return out


@dataclass(frozen=True)
class Release:
    """One registered release: what the tracker may offer.

    ``target`` is the TUF target name of its release manifest and always equals
    ``manifest.release_target_name(product, version)``; build with :meth:`create` or
    :meth:`from_manifest` to have it derived. ``swarms`` are the BitTorrent swarms of
    its payloads (those whose manifest entry carries an ``info_hash``), in manifest
    order; releases registered without them have none. ``component`` is the
    manifest's (``None`` for an image: the A/B slots); each component, and the image,
    has a counter sequence of its own. ``payloads`` summarise the manifest's payloads.

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
    update_type: str = "image"
    component: str | None = None
    payloads: tuple[PayloadSummary, ...] = ()

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
        payloads = tuple(PayloadSummary(p.kind, p.encoding, p.size, p.sha256,
                                        None if p.base is None else p.base.sha256)
                         for p in manifest.payloads)
        return cls(base.product, base.version, base.release_counter, base.target, swarms,
                   manifest.update_type, manifest.component, payloads)


# --- decision -------------------------------------------------------------------------


def floor_of(checkin: CheckIn, release: Release) -> int:
    """The device's counter in ``release``'s sequence: the image's, or the component's
    (0 for a component it does not run; the image's for a device that lists no
    components, which keeps one sequence for everything)."""
    if release.component is None or checkin.components is None:
        return checkin.release_counter
    for component in checkin.components:
        if component.name == release.component:
            return component.release_counter
    return 0


def newer_releases(checkin: CheckIn, releases: Iterable[Release]) -> list[Release]:
    """The releases of the device's product newer than what it runs (never a
    downgrade: counters are compared within each sequence, :func:`floor_of`), in the
    order to offer them: the image first, then components by name, the newest first
    within each; for a device that keeps one sequence for everything (it lists no
    components), the newest counter first whatever its kind. Which one the device gets
    is its rollouts' decision."""
    newer = [r for r in releases
             if r.product == checkin.product and r.release_counter > floor_of(checkin, r)]
    if checkin.components is None:
        newer.sort(key=lambda r: -r.release_counter)
    else:
        newer.sort(key=lambda r: (r.component is not None, r.component or "",
                                  -r.release_counter))
    return newer


def decide_offer(checkin: CheckIn, releases: Iterable[Release]) -> Release | None:
    """The first of :func:`newer_releases`, or ``None`` (the catalogue's answer when
    every release were open to every device)."""
    newer = newer_releases(checkin, releases)
    return newer[0] if newer else None
