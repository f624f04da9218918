"""A small synchronous client of the tracker's admin API (the ``httpx`` adapter).

Every failure becomes :class:`~tracker.errors.AdminApiError`: an error answer keeps
its HTTP status and the tracker's message; a transport failure has status 0.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import httpx

from swarmota.tracker.errors import AdminApiError

__all__ = ["AdminClient"]


class AdminClient:
    """Calls ``<base_url>/v1/admin/...`` with ``Authorization: Bearer <token>``.

    A context manager. ``ca_file``: PEM certificates to trust for an ``https`` tracker
    (e.g. its self-signed certificate; default: the system's trust store).
    ``transport`` is for tests (default: real HTTP).
    """

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 10.0,
                 ca_file: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise AdminApiError(f"cannot use {ca_file} as CA file: {exc}") from exc
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s,
                                  headers={"authorization": f"Bearer {token}"},
                                  transport=transport, trust_env=False, verify=verify)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, params: Mapping[str, str | int] | None = None) -> Any:
        """GET ``/v1/admin/<path>`` (``params``: the query); the decoded JSON answer.

        Raises:
            AdminApiError: an error status, a non-JSON answer, or no answer.
        """
        return self._call("GET", path, None, params)

    def post(self, path: str, body: Any = None) -> Any:
        """POST ``/v1/admin/<path>`` with a JSON body; the decoded JSON answer.

        Raises:
            AdminApiError: an error status, a non-JSON answer, or no answer.
        """
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: Any,
              params: Mapping[str, str | int] | None = None) -> Any:
        url = f"/v1/admin/{path.lstrip('/')}"
        try:
            response = self._http.request(method, url, json=body, params=params)
        except httpx.HTTPError as exc:
            raise AdminApiError(f"cannot reach the tracker: {exc}") from exc
        try:
            answer = response.json()
        except ValueError:
            raise AdminApiError(f"HTTP {response.status_code}: not a JSON answer",
                                response.status_code) from None
        if response.status_code >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise AdminApiError(f"HTTP {response.status_code}: {message or answer}",
                                response.status_code)
        return answer
