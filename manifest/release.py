"""The release manifest: one signed description of one release of one product.

A release manifest is a TUF target file (``releases/<product>/<version>.json``), so the
TUF targets role signs its length and hashes. It states:

- ``product``, ``version``, ``release_counter`` (monotonic, for anti-rollback) and the
  hardware ``compatibility`` ids the image may be installed on;
- ``image``: size and SHA-256 of the image that must end up in the slot;
- ``component`` (exactly when ``update_type`` is not ``image``): the name of the
  component (e.g. ``modem-fw``) whose content the "image" is;
- ``critical`` (optional, default false): an emergency release; devices install it
  outside their maintenance windows and without their install delay;
- ``payloads``: how to get that image. Each payload has a kind, an encoding, its size
  and SHA-256, a chunk size and the SHA-256 of every chunk, and optionally the
  BitTorrent v2 info-hash of its torrent. Exactly one is ``full`` (encoding ``zstd``:
  the image compressed). Others are ``delta`` payloads: an ``engine``
  (``bsdiff-zstd`` or ``zstd-patch``) applied to a ``base`` image named by size and
  SHA-256 produces the image.

The **compact** form of a manifest (:meth:`ReleaseManifest.compact`) names each
payload's chunk hashes by the size and SHA-256 of a **chunk list** file (the 32-byte
digests, one after the other: :func:`encode_chunk_list`) instead of listing them: its
size no longer grows with the payloads' sizes, and a device fetches the chunk list of
the one payload it downloads (:meth:`Payload.with_chunk_list`). It is the same release:
the canonical manifest's TUF targets entry pins it in its ``custom`` data
(:func:`compact_pin`, read back by :func:`parse_compact_pin`; the file is served as
target :func:`compact_target_name`), and older agents, which do not know it, keep
reading the canonical one.

Parsing is strict: a size limit before decoding, no duplicate keys, no unknown keys, no
floats, bounded integers and strings, and chunk lists consistent with sizes. Names that
become paths (payload files) are derived from hashes, never taken from the document, so
path traversal is impossible by construction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from swarmota.manifest.chunking import (
    MAX_CHUNK_SIZE_BYTES,
    MIN_CHUNK_SIZE_BYTES,
    chunk_count,
    chunk_span,
    sha256_hex,
    verify_bytes,
)
from swarmota.manifest.errors import (
    CounterJumpError,
    ManifestFormatError,
    NotApplicableError,
    RollbackError,
)

__all__ = [
    "CHUNK_DIGEST_BYTES",
    "MAX_IMAGE_SIZE_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_RELEASE_COUNTER",
    "SCHEMA_VERSION",
    "UPDATE_TYPES",
    "ChunkList",
    "ImageInfo",
    "Payload",
    "ReleaseManifest",
    "check_applicable",
    "compact_pin",
    "compact_target_name",
    "encode_chunk_list",
    "parse_compact_pin",
    "parse_release_manifest",
    "release_target_name",
    "validate_component",
    "validate_product",
    "validate_version",
]

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_IMAGE_SIZE_BYTES = 64 * 1024**3
MAX_RELEASE_COUNTER = 2**53
MAX_COMPAT_IDS = 64

_PRODUCT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")
_HWID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

PAYLOAD_KINDS = ("full", "delta")
# encoding -> file extension in the origin tree; "zstd" is the full image compressed.
ENCODINGS = {"zstd": "zst", "bsdiff-zstd": "bsdz", "zstd-patch": "zpatch"}
DELTA_ENCODINGS = ("bsdiff-zstd", "zstd-patch")
# image: a whole A/B slot image; module (modem firmware, bootloader), app, config: the
# new content of one named component, installed beside the slots (``component``).
UPDATE_TYPES = ("image", "module", "app", "config")
_COMPONENT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
CHUNK_DIGEST_BYTES = 32  # one SHA-256 per chunk in a chunk list file


def validate_product(product: str) -> str:
    if not isinstance(product, str) or not _PRODUCT_RE.fullmatch(product):
        raise ManifestFormatError(
            f"invalid product {product!r}: 1-64 chars of a-z 0-9 . _ -, starting alphanumeric"
        )
    return product


def validate_component(component: str) -> str:
    """A component name (``modem-fw``): the product rule."""
    if not isinstance(component, str) or not _COMPONENT_RE.fullmatch(component):
        raise ManifestFormatError(
            f"invalid component {component!r}: 1-64 chars of a-z 0-9 . _ -, starting "
            "alphanumeric"
        )
    return component


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ManifestFormatError(
            f"invalid version {version!r}: 1-64 chars of A-Z a-z 0-9 . _ + -, "
            "starting alphanumeric"
        )
    return version


def release_target_name(product: str, version: str) -> str:
    """The TUF target path of a release manifest (both parts validated)."""
    return f"releases/{validate_product(product)}/{validate_version(version)}.json"


COMPACT_FIELD = "compact"  # key of the pin in a targets entry's custom data


def compact_target_name(target_name: str) -> str:
    """The target path of the compact form of the manifest at ``target_name``
    (``releases/p/1.0.json`` -> ``releases/p/1.0.compact.json``). Not listed in the
    targets: the canonical manifest's entry pins it."""
    return target_name.removesuffix(".json") + ".compact.json"


def compact_pin(compact: bytes) -> dict[str, Any]:
    """The custom data of a canonical manifest's targets entry that pins ``compact``."""
    return {COMPACT_FIELD: {"length": len(compact), "sha256": sha256_hex(compact)}}


def parse_compact_pin(custom: Any) -> tuple[int, str] | None:
    """``(length, sha256)`` of the compact manifest a targets entry's custom data pins, or
    ``None`` if it pins none (or pins it in a form this version does not know: the
    canonical manifest is the fallback, never an error)."""
    if not isinstance(custom, dict):
        return None
    pin = custom.get(COMPACT_FIELD)
    if not isinstance(pin, dict) or set(pin) != {"length", "sha256"}:
        return None
    length, sha = pin["length"], pin["sha256"]
    if (not isinstance(length, int) or isinstance(length, bool)
            or not 0 < length <= MAX_MANIFEST_BYTES
            or not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha)):
        return None
    return length, sha


@dataclass(frozen=True)
class ImageInfo:
    """The image that must end up in the slot."""

    size: int
    sha256: str


@dataclass(frozen=True)
class ChunkList:
    """A chunk list file (:func:`encode_chunk_list`), named by its size and SHA-256."""

    size: int
    sha256: str

    @property
    def path(self) -> str:
        """Path of the file in the origin tree (derived from its hash)."""
        return f"payloads/{self.sha256}.chunks"


def encode_chunk_list(chunks: Sequence[str]) -> bytes:
    """The chunk list file of ``chunks`` (hex SHA-256s): their 32-byte digests, in order."""
    return b"".join(bytes.fromhex(c) for c in chunks)


@dataclass(frozen=True)
class Payload:
    """One way to obtain the image, cut into fixed-size chunks.

    ``base`` is set exactly for ``delta`` payloads: the image the delta applies to.
    ``info_hash`` is the BitTorrent v2 info-hash (SHA-256, hex) of the payload's torrent.
    ``chunks`` holds the SHA-256 of every chunk, except in a compact manifest, where
    ``chunk_list`` names the file that holds them (then ``chunks`` is empty until
    :meth:`with_chunk_list` loads it; only a payload with its chunks verifies chunks).
    """

    kind: str
    encoding: str
    size: int
    sha256: str
    chunk_size: int
    chunks: tuple[str, ...]
    base: ImageInfo | None = None
    info_hash: str | None = None
    chunk_list: ChunkList | None = None

    @property
    def path(self) -> str:
        """Path of the payload file in the origin tree (derived from its hash)."""
        return f"payloads/{self.sha256}.{ENCODINGS[self.encoding]}"

    @property
    def torrent_path(self) -> str:
        """Path of the payload's torrent file in the origin tree."""
        return f"{self.path}.torrent"

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index`` within the payload."""
        return chunk_span(index, self.size, self.chunk_size)

    def verify_chunk(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Raise ``IntegrityError`` unless ``data`` is exactly chunk ``index``.

        Raises:
            RuntimeError: the chunk list is not loaded (:meth:`with_chunk_list`).
        """
        if not self.chunks:
            raise RuntimeError(f"payload {self.sha256[:12]}: chunk list not loaded")
        _, length = self.chunk_span(index)
        verify_bytes(f"chunk {index} of payload {self.sha256[:12]}", data, length,
                     self.chunks[index])

    def compact(self) -> Payload:
        """This payload with its chunk hashes in a chunk list file (see the module)."""
        if self.chunk_list is not None:
            return self
        data = encode_chunk_list(self.chunks)
        return replace(self, chunks=(), chunk_list=ChunkList(len(data), sha256_hex(data)))

    def with_chunk_list(self, data: bytes) -> Payload:
        """This payload with the chunk hashes of ``data``, its chunk list file, which
        must be exactly the one named (size and SHA-256); unchanged if they are loaded.

        Raises:
            IntegrityError: ``data`` is not the chunk list named.
        """
        if self.chunk_list is None:
            return self
        verify_bytes(f"chunk list of payload {self.sha256[:12]}", data,
                     self.chunk_list.size, self.chunk_list.sha256)
        step = CHUNK_DIGEST_BYTES
        return replace(self, chunk_list=None,
                       chunks=tuple(data[i:i + step].hex() for i in range(0, len(data), step)))

    def verify(self, data: bytes | bytearray | memoryview) -> None:
        """Raise ``IntegrityError`` unless ``data`` is exactly this payload."""
        verify_bytes(f"payload {self.sha256[:12]}", data, self.size, self.sha256)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "encoding": self.encoding,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
        }
        if self.chunk_list is not None:
            out["chunk_list"] = {"size": self.chunk_list.size,
                                 "sha256": self.chunk_list.sha256}
        else:
            out["chunks"] = list(self.chunks)
        if self.base is not None:
            out["base"] = {"size": self.base.size, "sha256": self.base.sha256}
        if self.info_hash is not None:
            out["info_hash"] = self.info_hash
        return out


@dataclass(frozen=True)
class ReleaseManifest:
    """A parsed, well-formed release manifest. Authenticity comes from TUF."""

    product: str
    version: str
    release_counter: int
    compatibility: tuple[str, ...]
    update_type: str
    image: ImageInfo
    payloads: tuple[Payload, ...]
    critical: bool = False
    component: str | None = None

    @property
    def target_name(self) -> str:
        return release_target_name(self.product, self.version)

    def delta_for(self, base_sha256: str) -> Payload | None:
        """The delta payload whose base is the image with ``base_sha256``, if any."""
        for payload in self.payloads:
            if payload.base is not None and payload.base.sha256 == base_sha256:
                return payload
        return None

    def compact(self) -> ReleaseManifest:
        """The compact form of this manifest: every payload's chunk hashes in a chunk
        list file (:meth:`Payload.compact`)."""
        return replace(self, payloads=tuple(p.compact() for p in self.payloads))

    @property
    def full_payload(self) -> Payload:
        for payload in self.payloads:
            if payload.kind == "full":
                return payload
        raise ManifestFormatError("manifest has no full payload")  # parse guarantees one

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "product": self.product,
            "version": self.version,
            "release_counter": self.release_counter,
            "compatibility": list(self.compatibility),
            "update_type": self.update_type,
            "image": {"size": self.image.size, "sha256": self.image.sha256},
            "payloads": [p.to_json() for p in self.payloads],
            # only when set: manifests without it keep their exact bytes
            **({"critical": True} if self.critical else {}),
            **({"component": self.component} if self.component is not None else {}),
        }

    def to_bytes(self) -> bytes:
        """Canonical encoding: sorted keys, no whitespace, ASCII, trailing newline."""
        encoded = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                             ensure_ascii=True).encode("ascii") + b"\n"
        # Round-trip through the parser so we never emit what we would refuse to read.
        parse_release_manifest(encoded)
        return encoded


def check_applicable(
    release: ReleaseManifest,
    *,
    product: str,
    hardware_id: str,
    installed_counter: int,
    max_counter_jump: int | None = None,
) -> None:
    """Refuse a release meant for something else, not newer than what is installed, or
    (with ``max_counter_jump``) whose counter is more than that above the installed one.

    Raises:
        NotApplicableError: product or hardware id does not match.
        RollbackError: ``release.release_counter <= installed_counter``.
        CounterJumpError: ``release.release_counter - installed_counter >
            max_counter_jump`` (see :mod:`manifest.counters`).
    """
    if release.product != product:
        raise NotApplicableError(
            f"release {release.version} is for product {release.product!r}, "
            f"this device is {product!r}"
        )
    if hardware_id not in release.compatibility:
        raise NotApplicableError(
            f"release {release.version} supports hardware {list(release.compatibility)}, "
            f"not {hardware_id!r}"
        )
    if release.release_counter <= installed_counter:
        raise RollbackError(
            f"release {release.version} has counter {release.release_counter}, "
            f"not newer than the installed counter {installed_counter}"
        )
    jump = release.release_counter - installed_counter
    if max_counter_jump is not None and jump > max_counter_jump:
        raise CounterJumpError(
            f"release {release.version} has counter {release.release_counter}, {jump} above "
            f"the installed counter {installed_counter}: more than the {max_counter_jump} "
            "this device accepts (max_release_counter_jump; a counter pushed that far "
            "would make every later release a rollback)"
        )


# --- strict parsing -------------------------------------------------------------------


def _reject_float(text: str) -> Any:
    raise ManifestFormatError(f"floating point numbers are not allowed ({text})")


def _reject_constant(text: str) -> Any:
    raise ManifestFormatError(f"constant {text} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ManifestFormatError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _obj(value: Any, where: str, keys: Sequence[str],
         optional: Sequence[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ManifestFormatError(f"{where}: expected an object")
    missing = [k for k in keys if k not in value]
    extra = sorted(set(value) - set(keys) - set(optional))
    if missing:
        raise ManifestFormatError(f"{where}: missing {', '.join(missing)}")
    if extra:
        raise ManifestFormatError(f"{where}: unknown keys {', '.join(extra)}")
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestFormatError(f"{where}: expected an integer")
    if not lo <= value <= hi:
        raise ManifestFormatError(f"{where}: {value} outside {lo}..{hi}")
    return value


def _sha(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ManifestFormatError(f"{where}: expected 64 lowercase hex digits")
    return value


def _choice(value: Any, where: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ManifestFormatError(f"{where}: {value!r} not one of {list(allowed)}")
    return str(value)


def _parse_payload(raw: Any, where: str) -> Payload:
    listed = "chunks" if isinstance(raw, dict) and "chunk_list" not in raw else "chunk_list"
    obj = _obj(raw, where, ("kind", "encoding", "size", "sha256", "chunk_size", listed),
               optional=("base", "info_hash"))
    size = _int(obj["size"], f"{where}.size", 1, MAX_IMAGE_SIZE_BYTES)
    chunk_size = _int(obj["chunk_size"], f"{where}.chunk_size", MIN_CHUNK_SIZE_BYTES,
                      MAX_CHUNK_SIZE_BYTES)
    if chunk_size & (chunk_size - 1):
        raise ManifestFormatError(f"{where}.chunk_size: {chunk_size} is not a power of two")
    expected = chunk_count(size, chunk_size)
    chunks: list[Any] = []
    chunk_list = None
    if listed == "chunk_list":
        ref = _obj(obj["chunk_list"], f"{where}.chunk_list", ("size", "sha256"))
        chunk_list = ChunkList(
            size=_int(ref["size"], f"{where}.chunk_list.size", expected * CHUNK_DIGEST_BYTES,
                      expected * CHUNK_DIGEST_BYTES),
            sha256=_sha(ref["sha256"], f"{where}.chunk_list.sha256"))
    else:
        chunks = obj["chunks"]
        if not isinstance(chunks, list):
            raise ManifestFormatError(f"{where}.chunks: expected a list")
        if len(chunks) != expected:
            raise ManifestFormatError(f"{where}.chunks: {len(chunks)} hashes for {expected} "
                                      f"chunks of {chunk_size} bytes")
    kind = _choice(obj["kind"], f"{where}.kind", PAYLOAD_KINDS)
    encoding = _choice(obj["encoding"], f"{where}.encoding",
                       DELTA_ENCODINGS if kind == "delta" else ("zstd",))
    base: ImageInfo | None = None
    if kind == "delta":
        if "base" not in obj:
            raise ManifestFormatError(f"{where}: a delta payload needs a base")
        base = _parse_image(obj["base"], f"{where}.base")
    elif "base" in obj:
        raise ManifestFormatError(f"{where}: only delta payloads have a base")
    info_hash = _sha(obj["info_hash"], f"{where}.info_hash") if "info_hash" in obj else None
    return Payload(
        kind=kind,
        encoding=encoding,
        size=size,
        sha256=_sha(obj["sha256"], f"{where}.sha256"),
        chunk_size=chunk_size,
        chunks=tuple(_sha(c, f"{where}.chunks[{i}]") for i, c in enumerate(chunks)),
        base=base,
        info_hash=info_hash,
        chunk_list=chunk_list,
    )


def _parse_image(raw: Any, where: str) -> ImageInfo:
    obj = _obj(raw, where, ("size", "sha256"))
    return ImageInfo(size=_int(obj["size"], f"{where}.size", 1, MAX_IMAGE_SIZE_BYTES),
                     sha256=_sha(obj["sha256"], f"{where}.sha256"))


def parse_release_manifest(data: bytes) -> ReleaseManifest:
    """Parse and validate release manifest bytes.

    Raises:
        ManifestFormatError: too large, not JSON, or not the schema.
    """
    if not isinstance(data, bytes | bytearray):
        raise ManifestFormatError("manifest must be bytes")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestFormatError(f"manifest is {len(data)} bytes, limit {MAX_MANIFEST_BYTES}")
    try:
        text = bytes(data).decode("utf-8")
        raw = json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_reject_float,
                         parse_constant=_reject_constant)
    except ManifestFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestFormatError(f"manifest is not valid JSON: {exc}") from None
    obj = _obj(raw, "manifest", ("schema", "product", "version", "release_counter",
                                 "compatibility", "update_type", "image", "payloads"),
               optional=("critical", "component"))
    if obj["schema"] != SCHEMA_VERSION or isinstance(obj["schema"], bool):
        raise ManifestFormatError(f"unsupported manifest schema {obj['schema']!r}")
    compat = obj["compatibility"]
    if not isinstance(compat, list) or not 1 <= len(compat) <= MAX_COMPAT_IDS:
        raise ManifestFormatError(f"compatibility: expected a list of 1..{MAX_COMPAT_IDS} ids")
    for i, hwid in enumerate(compat):
        if not isinstance(hwid, str) or not _HWID_RE.fullmatch(hwid):
            raise ManifestFormatError(f"compatibility[{i}]: invalid hardware id {hwid!r}")
    payloads_raw = obj["payloads"]
    if not isinstance(payloads_raw, list) or not 1 <= len(payloads_raw) <= 16:
        raise ManifestFormatError("payloads: expected a list of 1..16 payloads")
    payloads = tuple(_parse_payload(p, f"payloads[{i}]") for i, p in enumerate(payloads_raw))
    if sum(1 for p in payloads if p.kind == "full") != 1:
        raise ManifestFormatError("payloads: exactly one full payload is required")
    if len({p.sha256 for p in payloads}) != len(payloads):
        raise ManifestFormatError("payloads: the same payload is listed twice")
    image = _parse_image(obj["image"], "image")
    bases = [p.base.sha256 for p in payloads if p.base is not None]
    if len(set(bases)) != len(bases):
        raise ManifestFormatError("payloads: two deltas from the same base")
    if image.sha256 in bases:
        raise ManifestFormatError("payloads: a delta whose base is the image itself")
    update_type = _choice(obj["update_type"], "update_type", UPDATE_TYPES)
    try:
        product = validate_product(obj["product"])
        version = validate_version(obj["version"])
    except ManifestFormatError as exc:
        raise ManifestFormatError(f"manifest: {exc}") from None
    return ReleaseManifest(
        product=product,
        version=version,
        release_counter=_int(obj["release_counter"], "release_counter", 0, MAX_RELEASE_COUNTER),
        compatibility=tuple(compat),
        update_type=update_type,
        image=image,
        payloads=payloads,
        critical=_critical(obj.get("critical", False)),
        component=_component(obj.get("component"), update_type),
    )


def _component(value: Any, update_type: str) -> str | None:
    if update_type == "image":
        if value is not None:
            raise ManifestFormatError("component: only for module, app and config updates")
        return None
    try:
        return validate_component(value)
    except ManifestFormatError:
        raise ManifestFormatError(f"component: a {update_type} update needs a component "
                                  "name (1-64 chars of a-z 0-9 . _ -, starting "
                                  "alphanumeric)") from None


def _critical(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ManifestFormatError("critical: expected true or false")
    return value
