"""The hypercorn adapter: serve an ASGI app on trio, report the bound URL.

The only module that imports hypercorn. Components build an ASGI app and call
:func:`serve_asgi`; with port 0 the kernel picks a free port and the bound base URL
(``http://127.0.0.1:PORT``) is passed to ``task_status.started``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

__all__ = ["ASGIApp", "ListenConfig", "serve_asgi"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ListenConfig:
    """Where and how to listen. ``certfile``/``keyfile`` enable TLS."""

    host: str = "127.0.0.1"
    port: int = 0
    certfile: str | None = None
    keyfile: str | None = None
    access_log: bool = False


async def serve_asgi(
    app: ASGIApp,
    listen: ListenConfig,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; report the base URL once listening."""
    config = Config()
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    config.bind = [f"{host}:{listen.port}"]
    config.certfile = listen.certfile
    config.keyfile = listen.keyfile
    config.accesslog = logging.getLogger("hypercorn.access") if listen.access_log else None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            functools.partial(serve, _with_lifespan(app), config, mode="asgi")  # type: ignore[arg-type]
        )
        task_status.started(binds[0])


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
