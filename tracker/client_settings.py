"""Where an admin API client finds the tracker: URL, CA file and token.

Each setting comes from the first of:

1. a command-line flag (``--url``, ``--ca-file``, ``--token``);
2. an environment variable (:data:`ENV_URL`, :data:`ENV_CA_FILE`, :data:`ENV_TOKEN`);
3. the client config file: ``--client-config FILE``, else ``$SWARMOTA_CLIENT_CONFIG``,
   else :func:`default_config_path` (``$XDG_CONFIG_HOME/swarmota/client.toml`` or
   ``~/.config/swarmota/client.toml``; it need not exist), a TOML file::

       [tracker]
       url = "https://tracker.example.net:8470"
       ca_file = "server-ca.pem"          # relative to this file's directory
       token = "sot_..."                  # then keep the file private: chmod 600

4. the default: :data:`DEFAULT_URL`, the system's CA certificates, no token.

:func:`load_settings` reads the file; :func:`resolve_settings` decides (pure). Errors
are :class:`~tracker.errors.ConfigError` naming the file and key (or the flag, or the
variable) at fault; doubtful but usable settings (a token in a file every user may read,
a token sent over plain HTTP to another host) become :attr:`ClientSettings.warnings`.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from swarmota.tracker.errors import ConfigError

__all__ = [
    "DEFAULT_URL",
    "ENV_CA_FILE",
    "ENV_CONFIG",
    "ENV_TOKEN",
    "ENV_URL",
    "ClientSettings",
    "ConfigFile",
    "default_config_path",
    "load_settings",
    "read_config_file",
    "resolve_settings",
]

DEFAULT_URL: Final = "http://127.0.0.1:8470"
ENV_URL: Final = "SWARMOTA_TRACKER_URL"
ENV_CA_FILE: Final = "SWARMOTA_TRACKER_CA_FILE"
ENV_TOKEN: Final = "SWARMOTA_TRACKER_TOKEN"
ENV_CONFIG: Final = "SWARMOTA_CLIENT_CONFIG"
_KEYS: Final = ("url", "ca_file", "token")
_MAX_CONFIG_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the tracker's admin API. ``sources`` says where each setting came
    from (``--url``, ``$SWARMOTA_TRACKER_URL``, ``FILE: tracker.url``, ``default``)."""

    url: str
    ca_file: Path | None
    token: str | None
    sources: Mapping[str, str]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigFile:
    """A client config file as read: its ``[tracker]`` table, and its permission bits
    (``None``: the file does not exist)."""

    path: Path
    tracker: Mapping[str, Any]
    mode: int | None


def default_config_path(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/swarmota/client.toml``, or ``~/.config/swarmota/client.toml``."""
    base = environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path(environ.get("HOME") or
                                                       Path.home()) / ".config"
    return root / "swarmota" / "client.toml"


def read_config_file(path: Path, *, required: bool) -> ConfigFile:
    """Read a client config file; a missing one is empty unless ``required``.

    Raises:
        ConfigError: unreadable, not TOML, or not of the form the module docstring
            shows (unknown tables or keys, values that are not strings).
    """
    try:
        with path.open("rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            data = fh.read(_MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"client config file {path} does not exist") from None
        return ConfigFile(path, {}, None)
    except OSError as exc:
        raise ConfigError(f"cannot read client config file {path}: "
                          f"{exc.strerror or exc}") from None
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes: not a client "
                          "config file")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML file: {exc}") from None
    extra = sorted(set(doc) - {"tracker"})
    if extra:
        raise ConfigError(f"{path}: unknown key {extra[0]!r}; the file holds a [tracker] "
                          f"table with {', '.join(_KEYS)}")
    table = doc.get("tracker", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'tracker' must be a table ([tracker])")
    for key, value in table.items():
        if key not in _KEYS:
            raise ConfigError(f"{path}: unknown key 'tracker.{key}'; known: "
                              f"{', '.join('tracker.' + k for k in _KEYS)}")
        if not isinstance(value, str):
            raise ConfigError(f"{path}: tracker.{key} must be a string")
    return ConfigFile(path, table, mode)


def resolve_settings(flags: Mapping[str, str | None], environ: Mapping[str, str],
                     config: ConfigFile | None) -> ClientSettings:
    """Decide each setting: ``flags`` (keys ``url``, ``ca_file``, ``token``; ``None`` when
    not given) over ``environ`` over ``config`` over the defaults. Pure.

    Raises:
        ConfigError: a URL that is not http(s), an empty or malformed token, or an empty
            CA file name; the message names where it came from.
    """
    env_names = {"url": ENV_URL, "ca_file": ENV_CA_FILE, "token": ENV_TOKEN}
    flag_names = {"url": "--url", "ca_file": "--ca-file", "token": "--token"}
    chosen: dict[str, tuple[str | None, str]] = {}
    for key in _KEYS:
        if flags.get(key) is not None:
            chosen[key] = (flags[key], flag_names[key])
        elif environ.get(env_names[key]):
            chosen[key] = (environ[env_names[key]], f"${env_names[key]}")
        elif config is not None and key in config.tracker:
            chosen[key] = (config.tracker[key], f"{config.path}: tracker.{key}")
        else:
            chosen[key] = (DEFAULT_URL if key == "url" else None, "default")
    url = _url(*chosen["url"])
    token = _token(*chosen["token"])
    ca_file = None
    raw_ca, ca_source = chosen["ca_file"]
    if raw_ca is not None:
        if not raw_ca.strip():
            raise ConfigError(f"{ca_source}: the CA file name is empty")
        ca_file = Path(raw_ca).expanduser()
        if config is not None and ca_source.startswith(f"{config.path}:") \
                and not ca_file.is_absolute():
            ca_file = config.path.parent / ca_file
    warnings = []
    if (config is not None and chosen["token"][1].startswith(f"{config.path}:")
            and config.mode is not None and config.mode & stat.S_IROTH):
        warnings.append(f"{config.path} holds an admin token and every user of this host "
                        f"may read it (mode {config.mode:o}): run 'chmod 600 "
                        f"{config.path}'")
    host = urlsplit(url).hostname or ""
    if token is not None and url.startswith("http://") and not _loopback(host):
        warnings.append(f"the admin token goes to {host} over plain HTTP: anyone on the "
                        "path can read and reuse it; serve the tracker over HTTPS "
                        "(tracker serve --tls-cert ... --tls-key ...)")
    return ClientSettings(url, ca_file, token,
                          {key: source for key, (_, source) in chosen.items()},
                          tuple(warnings))


def load_settings(flags: Mapping[str, str | None], environ: Mapping[str, str],
                  config_file: Path | None = None) -> ClientSettings:
    """:func:`resolve_settings` with the config file ``config_file`` (required to exist),
    else ``$SWARMOTA_CLIENT_CONFIG`` (required too), else the default path (optional).

    Raises:
        ConfigError: see :func:`read_config_file` and :func:`resolve_settings`.
    """
    if config_file is not None:
        config = read_config_file(config_file, required=True)
    elif environ.get(ENV_CONFIG):
        config = read_config_file(Path(environ[ENV_CONFIG]).expanduser(), required=True)
    else:
        config = read_config_file(default_config_path(environ), required=False)
    return resolve_settings(flags, environ, config)


def _url(value: str | None, source: str) -> str:
    text = (value or "").strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{source}: {text[:100]!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{source}: {text[:100]!r} is not an http:// or https:// URL "
                          "of the tracker, e.g. https://tracker.example.net:8470")
    if parts.query or parts.fragment:
        raise ConfigError(f"{source}: the tracker URL takes no query or fragment")
    return text.rstrip("/")


def _token(value: str | None, source: str) -> str | None:
    if value is None:
        return None
    token = value.strip()
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{source}: not a token (one word of printable ASCII, as "
                          "'swarmota tracker admin token create' prints it)")
    return token


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
