"""The operator console: a browser page the tracker serves at ``/console/``. Pure.

The page is three static files shipped in the package (``tracker/console_assets/``:
``index.html``, ``console.js``, ``console.css``; nothing is fetched from anywhere
else). The script asks for an admin token, keeps it in the tab's ``sessionStorage``
and sends it as ``Authorization: Bearer`` on every call of the admin API
(``/v1/admin/...``), exactly as any other client does: the API decides and audits,
and the role the token has only decides which controls the page shows. No cookie is
set or read, so the tracker grants nothing to a request a browser makes on its own
(no ambient authority, nothing for a cross-site request to ride on).

Every answer under ``/console`` carries a strict Content-Security-Policy
(:data:`CONTENT_SECURITY_POLICY`): scripts and styles only from the tracker's own
files (no inline script or style), connections only back to the tracker, no frames
(``frame-ancestors 'none'``), no form submissions, and Trusted Types required for
script sinks, so ``innerHTML`` and friends throw in the page: strings that devices
send (report messages, log tails) can only ever become text.

:func:`answer` maps a request to ``(status, body, content type, headers)``; the ASGI
app sends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Final

__all__ = [
    "ASSETS",
    "CONTENT_SECURITY_POLICY",
    "PREFIX",
    "ConsoleAnswer",
    "answer",
    "asset_bytes",
    "is_console_path",
]

PREFIX: Final = "/console"
ASSETS: Final = {
    "index.html": b"text/html; charset=utf-8",
    "console.js": b"text/javascript; charset=utf-8",
    "console.css": b"text/css; charset=utf-8",
}
"""The console's files (in ``tracker/console_assets/``) and their content types."""

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "require-trusted-types-for 'script'; trusted-types 'none'")

_HEADERS: Final = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode("ascii")),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


@dataclass(frozen=True)
class ConsoleAnswer:
    """What to send: ``status``, ``body``, ``content_type`` and extra ``headers``."""

    status: int
    body: bytes
    content_type: bytes
    headers: tuple[tuple[bytes, bytes], ...]


def is_console_path(path: str) -> bool:
    """Whether ``path`` is the console's (``/console`` or below it)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


@cache
def asset_bytes(name: str) -> bytes:
    """The bytes of the console file ``name`` (one of :data:`ASSETS`), read once from
    the package.

    Raises:
        KeyError: not a console file.
    """
    if name not in ASSETS:
        raise KeyError(name)
    return (resources.files("swarmota.tracker") / "console_assets" / name).read_bytes()


def answer(method: str, path: str) -> ConsoleAnswer:
    """The answer to ``method path`` (a path :func:`is_console_path` accepts):
    ``/console`` redirects to ``/console/`` (so the page's relative links work behind
    a proxy's path prefix too), ``/console/`` is the page, ``/console/<file>`` a file
    of :data:`ASSETS`; anything else 404, a method other than GET 405."""
    if method != "GET":
        return _text(405, "the console only answers GET", ((b"allow", b"GET"),))
    if path == PREFIX:
        return _text(308, "the console is at console/", ((b"location", b"console/"),))
    name = path[len(PREFIX) + 1:] or "index.html"
    if name not in ASSETS:
        return _text(404, f"no such console file {name[:100]!r}")
    return ConsoleAnswer(200, asset_bytes(name), ASSETS[name], _HEADERS)


def _text(status: int, message: str,
          headers: tuple[tuple[bytes, bytes], ...] = ()) -> ConsoleAnswer:
    return ConsoleAnswer(status, message.encode("utf-8") + b"\n",
                         b"text/plain; charset=utf-8", (*_HEADERS, *headers))
