"""Serving the origin app over HTTP(S) with the shared hypercorn adapter."""

from __future__ import annotations

import trio

from swarmota.infra.http_serve import ListenConfig, serve_asgi
from swarmota.seeder.origin import OriginApp

__all__ = ["serve_origin"]


async def serve_origin(
    app: OriginApp,
    listen: ListenConfig,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; report the bound base URL once listening.

    With ``listen.port == 0`` the kernel picks a free port; the URL passed to
    ``task_status.started`` (``http://HOST:PORT``, or ``https://HOST:PORT`` when
    ``listen.certfile`` and ``listen.keyfile`` are set) names it. TLS is hypercorn's:
    TLS 1.2 at least (its ``Config.create_ssl_context`` sets ``minimum_version``),
    ciphers ``ECDHE+AESGCM``, ALPN ``h2`` and ``http/1.1``.
    """
    await serve_asgi(app, listen, task_status=task_status)
