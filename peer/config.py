"""Device configuration, stored as ``STATE/device.json``."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from swarmota.infra.fsio import atomic_write_json
from swarmota.infra.ids import DEVICE_ID_RE
from swarmota.infra.tlspin import PinError, check_pin
from swarmota.manifest import (
    DEFAULT_MAX_COUNTER_JUMP,
    MAX_RELEASE_COUNTER,
    ManifestFormatError,
    validate_product,
)
from swarmota.peer.errors import ConfigError
from swarmota.peer.services import HotConfig, parse_hot_config
from swarmota.peer.tpm import PcrSelection, tcti_of
from swarmota.tracker.wire import MAX_LABELS, NETWORK_ID_RE

__all__ = ["BOOTLOADERS", "DOWNLOAD_MODES", "KEYSTORES", "SLOT_BACKENDS", "DeviceConfig",
           "check_pinned_urls", "load_config", "save_config"]

DOWNLOAD_MODES = ("swarm", "direct")
SLOT_BACKENDS = ("file", "block")
BOOTLOADERS = ("file", "grub", "uboot")  # "file": the agent simulates the bootloader
KEYSTORES = ("file", "tpm")  # peer/keystore.py
MAX_BOOT_ATTEMPTS = 9  # GRUB counts down with an if-chain (peer/bootscripts/grub.cfg)

_PORT_RE = re.compile(r"[0-9]{1,5}")  # ASCII digits only: int() takes "²" and "٣" too


def check_pinned_urls(pins: Sequence[str], urls: Mapping[str, str],
                      what: str = "tls_pins") -> None:
    """Pins, if any, must be well formed, at least two distinct ones (a backup key to
    rotate to), and every URL they guard ``https://`` (plain http would not be pinned).

    Raises:
        ConfigError: naming ``what`` and the fault.
    """
    for pin in pins:
        try:
            check_pin(pin)
        except PinError as exc:
            raise ConfigError(f"{what}: {exc} (use 'swarmota tls pin FILE')") from None
    if not pins:
        return
    if len(set(pins)) < 2:
        raise ConfigError(f"{what} needs at least two distinct pins: the servers' keys and "
                          "a backup key to rotate to (a single pin bricks the fleet the day "
                          "that key must change)")
    for name, url in urls.items():
        if urlsplit(url).scheme != "https":
            raise ConfigError(f"{what} are set, so {name} must be https://, got {url!r}")


@dataclass(frozen=True)
class DeviceConfig:
    """Everything a device needs to know besides its trusted root and its slots."""

    device_id: str
    product: str
    hardware_id: str
    origin_url: str
    tracker_url: str
    health_command: tuple[str, ...] = ()
    health_timeout_s: float = 60.0
    download_concurrency: int = 4
    chunk_attempts: int = 4
    http_timeout_s: float = 30.0
    # slow retrieval: after http_timeout_s, a response must average at least this rate
    # (peer/http.py); 0 turns the floor off (the per-read http_timeout_s still applies)
    http_min_rate_bytes_per_s: int = 1024
    # one refresh of the TUF metadata and the release manifest, all requests together
    metadata_timeout_s: float = 300.0
    retry_backoff_s: float = 0.2
    # --- TLS (peer/http.py): SPKI pins of the origin's and tracker's keys plus at least
    # one backup, provisioned with the device (never learned from the network); a CA
    # bundle (PEM) instead of the system store, e.g. a private or development CA
    tls_pins: tuple[str, ...] = ()
    tls_ca_file: str | None = None
    # --- swarm (peer/swarm_fetch.py); rates in bytes/s, 0 = unlimited
    download_mode: str = "swarm"
    swarm_listen: str = "0.0.0.0:6881"
    download_rate_limit_bytes_per_s: int = 0
    upload_rate_limit_bytes_per_s: int = 0
    seed_time_s: float = 300.0
    network_metered: bool = False
    battery_percent_path: str | None = None
    min_battery_percent_to_upload: int = 30
    swarm_stall_s: float = 10.0
    swarm_min_rate_bytes_per_s: int = 32 * 1024
    swarm_timeout_s: float = 1800.0
    swarm_waste_budget_bytes: int = 16 * 1024 * 1024
    # a peer that unchoked us and holds requests of ours without sending anything this
    # long (silent or stalled) is dropped for the rest of the pass
    swarm_silent_peer_s: float = 2.0
    # local service discovery (BEP 14): multicasts the info-hashes the device is in on
    # its LAN, so that LAN peers meet without the tracker. Off unless the fleet's policy
    # turns it on (it tells anyone on the LAN what the device is updating to). DHT is
    # never turned on by the agent: it would publish info-hashes to the internet.
    swarm_local_discovery: bool = False
    # --- LAN-first hand-out: an opaque id of the home network (e.g. a hash of the
    # gateway's address) and a coarse region, sent at check-in when set
    network_id: str | None = None
    region: str | None = None
    # groups the device declares at check-in (a rollout's canary group may be a label)
    labels: tuple[str, ...] = ()
    # --- trust (peer/trust.py, manifest/counters.py): a release whose counter is more
    # than this above the installed one is refused (one signed counter of 2^53 would
    # otherwise make every later release a rollback). (The trusted metadata is refreshed
    # beside every check-in, offer or not: no interval to configure.)
    max_release_counter_jump: int = DEFAULT_MAX_COUNTER_JUMP
    # --- where the identity key, the anti-rollback floors and the trust anchor live
    # (peer/keystore.py): "file" (the state directory) or "tpm": a TPM 2.0 at tpm_device
    # (/dev/tpmrm0, or a TCTI such as swtpm:path=SOCKET); tpm_pcrs (e.g. "sha256:7"):
    # the TPM uses the keys only in the boot state they were made in (measured boot);
    # tpm_owner_auth: the file (root's, mode 0400) holding the owner hierarchy's password
    keystore: str = "file"
    tpm_device: str | None = None
    tpm_pcrs: str | None = None
    tpm_owner_auth: str | None = None
    # --- slots and boot control (peer/blockslots.py, peer/bootloader.py). "file": slots
    # are STATE/slots/{a,b}.img and the agent plays the bootloader (tests, the demo)
    slot_backend: str = "file"
    # {"a": "/dev/mmcblk0p2" or "PARTLABEL=rootfs-a", "b": ...}
    slot_devices: dict[str, str] = field(default_factory=dict)
    bootloader: str = "file"
    grub_env_path: str | None = None  # the environment block grub.cfg loads
    uboot_env_config: str | None = None  # fw_env.config naming the copies
    uboot_default_env: str | None = None  # libubootenv's start when no copy is valid
    # boots a new slot gets before the bootloader falls back (bootloader practice: 3);
    # a boot interrupted in its health check is retried, not a verdict
    boot_attempts: int = 3
    # run after a switch (and after a fall back from the booted slot) with a real
    # bootloader, e.g. ["systemctl", "reboot"]; empty: the reboot is left to the device
    reboot_command: tuple[str, ...] = ()
    # --- hot updates of components (peer/services.py: services with restart or
    # start/stop commands and 'after' dependencies; per component: the services to
    # restart, pre/post-install hooks from here or from the signed payload, a health check)
    services: dict[str, Any] = field(default_factory=dict)
    components: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not DEVICE_ID_RE.fullmatch(self.device_id):
            raise ConfigError(f"invalid device id {self.device_id!r}")
        try:
            validate_product(self.product)
        except ManifestFormatError as exc:
            raise ConfigError(str(exc)) from None
        if not DEVICE_ID_RE.fullmatch(self.hardware_id):
            raise ConfigError(f"invalid hardware id {self.hardware_id!r}")
        for name in ("origin_url", "tracker_url"):
            url = urlsplit(getattr(self, name))
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(f"{name} must be an http(s) URL, got {getattr(self, name)!r}")
        if not 1 <= self.download_concurrency <= 64:
            raise ConfigError("download_concurrency must be within 1..64")
        if not 1 <= self.chunk_attempts <= 100:
            raise ConfigError("chunk_attempts must be within 1..100")
        if min(self.health_timeout_s, self.http_timeout_s, self.metadata_timeout_s) <= 0:
            raise ConfigError("timeouts must be positive")
        if self.download_mode not in DOWNLOAD_MODES:
            raise ConfigError(f"download_mode must be one of {list(DOWNLOAD_MODES)}, "
                              f"got {self.download_mode!r}")
        host, _, port = self.swarm_listen.rpartition(":")
        if not host or not _PORT_RE.fullmatch(port) or int(port) > 65535:
            raise ConfigError(f"swarm_listen must be HOST:PORT, got {self.swarm_listen!r}")
        if min(self.download_rate_limit_bytes_per_s, self.upload_rate_limit_bytes_per_s,
               self.swarm_waste_budget_bytes, self.swarm_min_rate_bytes_per_s,
               self.http_min_rate_bytes_per_s) < 0:
            raise ConfigError("rate limits and the waste budget must be >= 0")
        if self.seed_time_s < 0 or min(self.swarm_stall_s, self.swarm_timeout_s,
                                       self.swarm_silent_peer_s) <= 0:
            raise ConfigError("seed_time_s must be >= 0, swarm_stall_s, swarm_timeout_s and "
                              "swarm_silent_peer_s > 0")
        if not 0 <= self.min_battery_percent_to_upload <= 100:
            raise ConfigError("min_battery_percent_to_upload must be within 0..100")
        jump = self.max_release_counter_jump
        if (not isinstance(jump, int) or isinstance(jump, bool)
                or not 1 <= jump <= MAX_RELEASE_COUNTER):
            raise ConfigError(f"max_release_counter_jump must be within "
                              f"1..{MAX_RELEASE_COUNTER}")
        if len(self.labels) > MAX_LABELS:
            raise ConfigError(f"at most {MAX_LABELS} labels")
        for name, value in (("network_id", self.network_id), ("region", self.region),
                            *(("labels", label) for label in self.labels)):
            if value is not None and not NETWORK_ID_RE.fullmatch(value):
                raise ConfigError(f"{name} must be 1-64 chars of A-Z a-z 0-9 . _ : -, "
                                  f"got {value!r}")
        self._check_tls()
        self._check_boot()
        self._check_keystore()
        self.hot  # noqa: B018 - refuse a bad recipe or a dependency cycle now

    @property
    def hot(self) -> HotConfig:
        """The services and component recipes (``swarmota.peer.services``). Raises ConfigError."""
        return parse_hot_config(self.services, self.components)

    def _check_boot(self) -> None:
        if self.slot_backend not in SLOT_BACKENDS:
            raise ConfigError(f"slot_backend must be one of {list(SLOT_BACKENDS)}, got "
                              f"{self.slot_backend!r}")
        if self.bootloader not in BOOTLOADERS:
            raise ConfigError(f"bootloader must be one of {list(BOOTLOADERS)}, got "
                              f"{self.bootloader!r}")
        if not isinstance(self.slot_devices, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v
                for k, v in self.slot_devices.items()):
            raise ConfigError("slot_devices must map slot names to device paths or labels")
        if self.slot_backend == "block" and sorted(self.slot_devices) != ["a", "b"]:
            raise ConfigError("block slots need slot_devices for a and b (a path or "
                              "PARTLABEL=label each)")
        if self.bootloader == "grub" and not self.grub_env_path:
            raise ConfigError("the grub bootloader needs grub_env_path")
        if self.bootloader == "uboot" and not self.uboot_env_config:
            raise ConfigError("the uboot bootloader needs uboot_env_config (fw_env.config)")
        if not 1 <= self.boot_attempts <= MAX_BOOT_ATTEMPTS:
            raise ConfigError(f"boot_attempts must be within 1..{MAX_BOOT_ATTEMPTS}")

    def _check_keystore(self) -> None:
        if self.keystore not in KEYSTORES:
            raise ConfigError(f"keystore must be one of {list(KEYSTORES)}, got "
                              f"{self.keystore!r}")
        if self.keystore == "file":
            if (self.tpm_device, self.tpm_pcrs, self.tpm_owner_auth) != (None, None, None):
                raise ConfigError("tpm_device, tpm_pcrs and tpm_owner_auth go with keystore "
                                  "'tpm'")
            return
        if not isinstance(self.tpm_device, str) or not self.tpm_device:
            raise ConfigError("keystore 'tpm' needs tpm_device (/dev/tpmrm0, or a TCTI "
                              "such as swtpm:path=SOCKET)")
        tcti_of(self.tpm_device)
        if self.tpm_pcrs is not None:
            if not isinstance(self.tpm_pcrs, str):
                raise ConfigError("tpm_pcrs must be a PCR selection such as sha256:7")
            PcrSelection(self.tpm_pcrs)
        if self.tpm_owner_auth is not None and (
                not isinstance(self.tpm_owner_auth, str)
                or not os.path.isabs(self.tpm_owner_auth)):
            raise ConfigError("tpm_owner_auth must be the absolute path of the file holding "
                              "the TPM owner password")

    def _check_tls(self) -> None:
        if not isinstance(self.tls_pins, tuple):
            raise ConfigError("tls_pins must be a tuple of pins")
        check_pinned_urls(self.tls_pins, {"origin_url": self.origin_url,
                                          "tracker_url": self.tracker_url})
        if self.tls_ca_file is not None and (not isinstance(self.tls_ca_file, str)
                                             or not self.tls_ca_file):
            raise ConfigError("tls_ca_file must be a path to a PEM file, or null")

    @property
    def swarm_listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.swarm_listen.rpartition(":")
        return host.strip("[]"), int(port)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["health_command"] = list(self.health_command)
        out["labels"] = list(self.labels)
        out["tls_pins"] = list(self.tls_pins)
        out["reboot_command"] = list(self.reboot_command)
        return out


def save_config(path: Path, config: DeviceConfig) -> None:
    atomic_write_json(path, config.to_json())


# Keys older agents wrote to device.json that no longer mean anything; dropped on load.
# trust_refresh_interval_s: the longest an idle device went without refreshing its
# trusted metadata; it is now refreshed beside every check-in.
OBSOLETE_KEYS: Final = frozenset({"trust_refresh_interval_s"})


def load_config(path: Path) -> DeviceConfig:
    """Read ``path`` (``STATE/device.json``); a relative ``tls_ca_file`` is relative to
    its directory, so that the state directory may move.

    Raises:
        ConfigError: missing, unreadable, or not a valid configuration.
    """
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run 'swarmota peer init' first") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for name in ("health_command", "labels", "tls_pins", "reboot_command"):
        if name in raw:
            value = raw[name]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: {name} must be a list of strings")
            raw[name] = tuple(value)
    for name in OBSOLETE_KEYS.intersection(raw):  # written by an older agent: meaningless now
        del raw[name]
    ca_file = raw.get("tls_ca_file")
    if isinstance(ca_file, str) and ca_file and not Path(ca_file).is_absolute():
        raw["tls_ca_file"] = str(path.parent / ca_file)  # a copy in the state directory
    try:
        return DeviceConfig(**raw)
    except (TypeError, AttributeError, ValueError) as exc:  # a field of the wrong type
        raise ConfigError(f"{path}: {exc}") from None
