"""The hypercorn adapter: serve an ASGI app on trio, report the bound URL.

The only module that imports hypercorn. Components build an ASGI app and call
:func:`serve_asgi`; with port 0 the kernel picks a free port and the bound base URL
(``http://127.0.0.1:PORT``) is passed to ``task_status.started``.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

__all__ = [
    "TLS_VERSIONS",
    "ASGIApp",
    "ListenConfig",
    "Receive",
    "Scope",
    "Send",
    "bind_error",
    "listen_arg",
    "parse_listen",
    "serve_asgi",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class ListenConfig:
    """Where and how to listen. ``certfile``/``keyfile`` enable TLS; clients offering
    less than ``tls_min_version`` (``"1.2"`` or ``"1.3"``) fail the handshake.

    Raises:
        ValueError: ``tls_min_version`` is not a key of :data:`TLS_VERSIONS`.
    """

    host: str = "127.0.0.1"
    port: int = 0
    certfile: str | None = None
    keyfile: str | None = None
    access_log: bool = False
    tls_min_version: str = "1.2"

    def __post_init__(self) -> None:
        if self.tls_min_version not in TLS_VERSIONS:
            raise ValueError(f"tls_min_version must be one of {sorted(TLS_VERSIONS)}, "
                             f"got {self.tls_min_version!r}")


class _Config(Config):
    """hypercorn's configuration with a TLS floor above its own (TLS 1.2)."""

    tls_minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2

    def create_ssl_context(self) -> ssl.SSLContext | None:
        context = super().create_ssl_context()
        if context is not None:
            context.minimum_version = self.tls_minimum_version
        return context


def listen_arg(text: str) -> tuple[str, int]:
    """:func:`parse_listen` as an argparse type (its message kept in the usage error)."""
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_listen(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[IPV6]:PORT"`` -> ``(host, port)``; port 0 means any free port.

    Raises:
        ValueError: the text is not of that form (the message says why).
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:8470")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:8470")
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"{text!r}: missing or invalid host")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} outside 0..65535")
    return host, port


async def serve_asgi(
    app: ASGIApp,
    listen: ListenConfig,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; report the base URL once listening."""
    config = _Config()
    config.tls_minimum_version = TLS_VERSIONS[listen.tls_min_version]
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    config.bind = [f"{host}:{listen.port}"]
    config.certfile = listen.certfile
    config.keyfile = listen.keyfile
    config.accesslog = logging.getLogger("hypercorn.access") if listen.access_log else None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        try:
            binds: list[str] = await nursery.start(
                functools.partial(serve, _with_lifespan(app), config, mode="asgi")  # type: ignore[arg-type]
            )
        except OSError as exc:
            raise bind_error(exc, host, listen.port) from exc
        except BaseExceptionGroup as group:  # hypercorn's own nursery may wrap it
            matched, rest = group.split(OSError)
            if matched is None or rest is not None:
                raise
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, OSError)
            raise bind_error(leaf, host, listen.port) from group
        task_status.started(binds[0])


def bind_error(exc: OSError, host: str, port: int) -> OSError:
    """``exc`` (from binding a listener) naming the address it was about."""
    return type(exc)(exc.errno, f"cannot listen on {host}:{port}: "
                                f"{exc.strerror or exc}")


def _with_lifespan(app: ASGIApp) -> ASGIApp:
    """Answer ASGI lifespan events so that apps only deal with HTTP."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapped
