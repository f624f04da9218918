"""Test-only: write TUF metadata into a published origin tree with any keys, as the
repository owner rotating keys, or as an attacker holding some of them.

The product's :class:`swarmota.seeder.repository.Repository` only ever signs correct metadata;
the metadata attack tests need roots that rotate keys, skip versions or list a key
twice, and timestamps with forged versions. :class:`Forge` reads the newest files from
``origin/metadata`` and writes new ones beside them (consistent snapshots:
``N.root.json``, ``N.snapshot.json``, ``N.targets.json``, ``N.<delegated role>.json``;
``timestamp.json``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from securesystemslib.signer import CryptoSigner, Key
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from swarmota.seeder.keys import load_private_key
from swarmota.seeder.repository import Repository

__all__ = ["Forge", "metafile", "same_key_twice"]


def metafile(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data),
                    hashes={"sha256": hashlib.sha256(data).hexdigest()})


class Forge:
    def __init__(self, repo: Repository) -> None:
        self.dir = repo.metadata_dir
        root_key = repo.offline_root_key_path  # single-key setup, else the first of k-of-n
        if not root_key.exists():
            root_key = repo.offline_dir / "root-1.pem"
        self.root_key = load_private_key(root_key)
        self.keys = {role: load_private_key(repo.online_keys_dir / f"{role}.pem")
                     for role in ("targets", "snapshot", "timestamp")
                     if (repo.online_keys_dir / f"{role}.pem").exists()}

    # --- reading ------------------------------------------------------------------------

    def _newest(self, role: str) -> int:
        return max(int(p.name.split(".")[0]) for p in self.dir.glob(f"*.{role}.json"))

    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_bytes((self.dir / f"{self._newest('root')}.root.json")
                                         .read_bytes())

    def timestamp(self) -> Metadata[Timestamp]:
        return Metadata[Timestamp].from_bytes((self.dir / "timestamp.json").read_bytes())

    def targets(self) -> Metadata[Targets]:
        snapshot = self.snapshot()
        version = snapshot.signed.meta["targets.json"].version
        return Metadata[Targets].from_bytes((self.dir / f"{version}.targets.json").read_bytes())

    def delegated(self) -> dict[str, Metadata[Targets]]:
        """The delegated targets roles (the products' release lists) snapshot names."""
        meta = self.snapshot().signed.meta
        return {name.removesuffix(".json"): Metadata[Targets].from_bytes(
                    (self.dir / f"{m.version}.{name}").read_bytes())
                for name, m in meta.items() if name != "targets.json"}

    def snapshot(self) -> Metadata[Snapshot]:
        version = self.timestamp().signed.snapshot_meta.version
        return Metadata[Snapshot].from_bytes((self.dir / f"{version}.snapshot.json")
                                             .read_bytes())

    # --- writing ------------------------------------------------------------------------

    @staticmethod
    def sign(md: Metadata[Any], signers: Sequence[CryptoSigner]) -> bytes:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        return md.to_bytes()

    def write_root(self, change: Callable[[Root], None], signers: Sequence[CryptoSigner], *,
                   version: int | None = None) -> int:
        """A new root: the newest one, changed by ``change``, version + 1 (or
        ``version``), signed by ``signers``; returns its version."""
        md = self.root()
        md.signed.version = version or md.signed.version + 1
        md.signed.expires = datetime.now(UTC) + timedelta(days=30)
        change(md.signed)
        data = self.sign(md, signers)
        (self.dir / f"{md.signed.version}.root.json").write_bytes(data)
        return md.signed.version

    def rotate(self, root: Root, role: str, new: CryptoSigner) -> None:
        """Replace every key of ``role`` by ``new`` (use inside a ``write_root`` change)."""
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(new.public_key, role)

    def write_chain(self, *, targets: Sequence[CryptoSigner] | None = None,
                    snapshot: Sequence[CryptoSigner] | None = None,
                    timestamp: Sequence[CryptoSigner] | None = None,
                    timestamp_version: int | None = None,
                    raw_targets: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Re-sign the current targets and delegated roles (new versions) with
        ``targets`` signers, then a snapshot and a timestamp naming them (default
        signers: the online keys). ``raw_targets`` edits the signed JSON of targets after
        signing (duplicate a signature entry, say)."""
        delegated: dict[str, MetaFile] = {}
        for role, rmd in self.delegated().items():
            rmd.signed.version = max(self._newest(role), rmd.signed.version) + 1
            rdata = self.sign(rmd, targets or [self.keys["targets"]])
            (self.dir / f"{rmd.signed.version}.{role}.json").write_bytes(rdata)
            delegated[f"{role}.json"] = metafile(rmd.signed.version, rdata)
        md = self.targets()
        md.signed.version = max(self._newest("targets"), md.signed.version) + 1
        data = self.sign(md, targets or [self.keys["targets"]])
        if raw_targets is not None:
            doc = json.loads(data)
            raw_targets(doc)
            data = json.dumps(doc).encode()
        (self.dir / f"{md.signed.version}.targets.json").write_bytes(data)
        self.write_snapshot(md.signed.version, data, snapshot, timestamp, timestamp_version,
                            delegated=delegated)

    def write_snapshot(self, targets_version: int, targets_data: bytes,
                       snapshot: Sequence[CryptoSigner] | None = None,
                       timestamp: Sequence[CryptoSigner] | None = None,
                       timestamp_version: int | None = None, *,
                       delegated: dict[str, MetaFile] | None = None) -> None:
        """A new snapshot naming ``targets_version`` and ``delegated`` (default: the
        delegated roles the current snapshot names), then a timestamp naming it."""
        snap = self.snapshot()
        if delegated is None:
            delegated = {n: m for n, m in snap.signed.meta.items() if n != "targets.json"}
        snap.signed.version = self._newest("snapshot") + 1
        snap.signed.expires = datetime.now(UTC) + timedelta(days=7)
        snap.signed.meta = {"targets.json": metafile(targets_version, targets_data),
                            **delegated}
        snap_data = self.sign(snap, snapshot or [self.keys["snapshot"]])
        (self.dir / f"{snap.signed.version}.snapshot.json").write_bytes(snap_data)
        self.write_timestamp(timestamp, version=timestamp_version,
                             snapshot_meta=metafile(snap.signed.version, snap_data))

    def write_timestamp(self, signers: Sequence[CryptoSigner] | None = None, *,
                        version: int | None = None,
                        snapshot_meta: MetaFile | None = None) -> None:
        ts = self.timestamp()
        ts.signed.version = version or ts.signed.version + 1
        ts.signed.expires = datetime.now(UTC) + timedelta(days=1)
        if snapshot_meta is not None:
            ts.signed.snapshot_meta = snapshot_meta
        (self.dir / "timestamp.json").write_bytes(
            self.sign(ts, signers or [self.keys["timestamp"]]))


def same_key_twice(root: Root, role: str, key: Key, alias: str) -> None:
    """List ``key`` a second time for ``role`` under another keyid ``alias``."""
    twin = Key.from_dict(alias, key.to_dict())
    root.add_key(twin, role)
