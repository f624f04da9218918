"""The operator console as the tracker serves it (no browser: tests/test_console_browser.py
drives it in Chromium), and the admin API data it shows: stale devices and the last
day's failures in the fleet view, device search, the actions a rollout's phase allows.

The real app on a real SQLite store over ASGI, with a fake wall clock."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import MutableMapping
from dataclasses import replace
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from swarmota.tracker import console
from swarmota.tracker.admin import ACTION_ROLES
from swarmota.tracker.app import TrackerApp
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.errors import ConflictError
from swarmota.tracker.openapi import openapi_document
from swarmota.tracker.rollout import (
    ACTIONS,
    PHASES,
    RolloutPlan,
    allowed_actions,
    apply_action,
    new_rollout,
)
from swarmota.tracker.sqlite_store import SqliteStore
from tests.tracker_asgi import (
    PRODUCT,
    START,
    Clock,
    call,
    offered,
    release,
    report_body,
    token_for,
)

ROOT = Path(__file__).resolve().parent.parent


async def get(app: TrackerApp, path: str, method: str = "GET"
              ) -> tuple[int, dict[bytes, bytes], bytes]:
    """``(status, headers, body)`` of one request to ``app``."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await app({"type": "http", "method": method, "path": path, "headers": [],
               "query_string": b"", "client": ("127.0.0.1", 5000)}, receive, send)
    return (sent[0]["status"], dict(sent[0]["headers"]),
            b"".join(m.get("body", b"") for m in sent[1:]))


# --- the page and its files -------------------------------------------------------------


async def test_the_console_is_served_with_a_strict_content_security_policy(
        app: TrackerApp) -> None:
    status, headers, body = await get(app, "/console/")
    assert status == 200 and headers[b"content-type"] == b"text/html; charset=utf-8"
    assert b'<script src="console.js" defer></script>' in body
    policy = headers[b"content-security-policy"].decode()
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["form-action"] == "'none'"
    assert directives["require-trusted-types-for"] == "'script'"
    assert "unsafe" not in policy
    assert headers[b"x-frame-options"] == b"DENY"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"referrer-policy"] == b"no-referrer"
    assert b"set-cookie" not in headers  # nothing a browser would send back by itself
    for name, content_type in console.ASSETS.items():
        status, headers, body = await get(app, f"/console/{name}")
        assert (status, headers[b"content-type"]) == (200, content_type)
        assert body == console.asset_bytes(name)
        assert headers[b"content-security-policy"] == policy.encode()


async def test_console_redirects_to_its_page_and_refuses_other_paths_and_methods(
        app: TrackerApp) -> None:
    status, headers, _ = await get(app, "/console")
    assert (status, headers[b"location"]) == (308, b"console/")  # relative: proxy prefixes
    status, headers, _ = await get(app, "/console/../v1/admin/whoami")
    assert status == 404
    assert (await get(app, "/console/secret.txt"))[0] == 404
    status, headers, _ = await get(app, "/console/", method="POST")
    assert (status, headers[b"allow"]) == (405, b"GET")
    assert (await get(app, "/consoles"))[0] == 404  # not the console's: the API's 404


class _Markup(HTMLParser):
    """What the page refers to, and anything inline."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        self.inline += [f"{tag} {k}" for k in names if k.startswith("on") or k == "style"]
        if tag == "style":
            self.inline.append("style element")
        if tag == "script":
            if names.get("src") is None:
                self._in_script = True
            else:
                self.refs.append(str(names["src"]))
        if tag == "link":
            self.refs.append(str(names.get("href")))
        if tag in ("img", "iframe", "object", "embed", "form") and (
                names.get("src") or names.get("action")):
            self.refs.append(str(names.get("src") or names.get("action")))

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("inline script")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False


def test_every_console_file_ships_in_the_package_and_nothing_comes_from_elsewhere() -> None:
    """The page refers only to its own files (no CDN, nothing inline that the policy
    would have to allow), and pyproject.toml ships every one of them."""
    page = _Markup()
    page.feed(console.asset_bytes("index.html").decode())
    assert page.inline == []
    assert sorted(page.refs) == ["console.css", "console.js"]
    assets = resources.files("swarmota.tracker") / "console_assets"
    shipped = {p.name for p in assets.iterdir()}
    assert shipped == set(console.ASSETS)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["swarmota.tracker"]
    for name in shipped:
        assert any(fnmatch.fnmatch(f"console_assets/{name}", p) for p in patterns), name
    for name in console.ASSETS:
        text = console.asset_bytes(name).decode()
        urls = set(re.findall(r"\b[a-z]+://[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)  # a namespace name
        assert "@import" not in text and "url(" not in text, name


def test_the_console_script_never_turns_strings_into_markup() -> None:
    """Device messages and log tails must stay text: the script builds the page from
    elements and text nodes only (and the policy's Trusted Types make the HTML sinks
    throw in the browser)."""
    script = "\n".join(line for line in console.asset_bytes("console.js").decode().splitlines()
                       if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                 "eval(", "Function(", "DOMParser", "createContextualFragment",
                 "srcdoc", "javascript:", "localStorage", "document.cookie"):
        assert sink not in script, sink


def test_the_console_offers_each_rollout_action_to_the_role_the_api_demands() -> None:
    script = console.asset_bytes("console.js").decode()
    block = re.search(r"const ACTION_ROLES = \{(.*?)\};", script, re.S)
    assert block is not None
    shown = dict(re.findall(r"(\w+): \"(\w+)\"", block.group(1)))
    assert shown == dict(ACTION_ROLES)


def test_the_plan_form_takes_its_defaults_from_the_openapi_document() -> None:
    plan = openapi_document()["components"]["schemas"]["Plan"]["oneOf"][1]["properties"]
    assert {k: v["default"] for k, v in plan.items()} == RolloutPlan().to_json()


# --- what the API gives the console -------------------------------------------------------


def test_a_rollout_offers_exactly_the_actions_its_phase_allows() -> None:
    fresh, _ = new_rollout("r1", PRODUCT, "2.0.0", 2, RolloutPlan(), START)
    for phase in PHASES:
        state = replace(fresh, phase=phase)
        for action in ACTIONS:
            try:
                apply_action(state, action, START)
                applies = True
            except ConflictError:
                applies = False
            assert (action in allowed_actions(phase)) == applies, (phase, action)


async def test_the_fleet_view_counts_stale_devices_and_the_failures_of_the_last_day(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    token = token_for(store, "viewer")
    register_release(store, release(), RolloutPlan.everyone(), now=START)
    for device in ("old-1", "old-2"):
        assert await offered(app, device) == "2.0.0"
        code, _ = await call(app, "POST", "/v1/report", report_body(device, 40))
        assert code == 200  # a day and a half ago: rolled back
    clock.now = START + 36 * 3600
    for device in ("new-1", "new-2", "new-3"):
        assert await offered(app, device) == "2.0.0"
    await call(app, "POST", "/v1/report", report_body("new-1", 0))
    await call(app, "POST", "/v1/report", report_body("new-2", 10))
    code, fleet = await call(app, "GET", "/v1/admin/fleet", token=token,
                             query=b"stale_s=3600")
    assert code == 200, fleet
    assert fleet["versions"] == {PRODUCT: {"1.0.0": 4, "2.0.0": 1}}
    assert fleet["stale_s"] == 3600
    assert fleet["stale"] == {PRODUCT: {"1.0.0": 2, "2.0.0": 0}}  # old-1, old-2
    assert fleet["reports_last_day"] == {PRODUCT: {"ok": 1, "download-failed": 1}}
    assert fleet["failures_last_day"] == {PRODUCT: 1}
    # by default a device is stale once it missed two check-in intervals
    clock.now += 2 * app.director.config.poll_after_s + 1
    code, fleet = await call(app, "GET", "/v1/admin/fleet", token=token)
    assert fleet["stale_s"] == 2 * app.director.config.poll_after_s
    assert fleet["stale"] == {PRODUCT: {"1.0.0": 4, "2.0.0": 1}}
    code, answer = await call(app, "GET", "/v1/admin/fleet", token=token, query=b"stale_s=x")
    assert code == 400, answer


async def test_devices_are_found_by_part_of_their_id_and_by_when_they_were_heard_of(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    token = token_for(store, "viewer")
    for device in ("router-a1", "router-b2", "cam-a3"):
        await offered(app, device)
        clock.now += 600

    async def ids(query: bytes) -> list[str]:
        code, answer = await call(app, "GET", "/v1/admin/devices", token=token, query=query)
        assert code == 200, answer
        return [d["device_id"] for d in answer["devices"]]

    assert await ids(b"search=router") == ["router-a1", "router-b2"]
    assert await ids(b"search=-a") == ["cam-a3", "router-a1"]
    assert await ids(b"search=%25") == []  # no wildcard: the text itself
    assert await ids(b"seen_within_s=1300") == ["cam-a3", "router-b2"]
    assert await ids(b"stale_s=1300") == ["router-a1"]
    assert await ids(b"search=router&seen_within_s=1300") == ["router-b2"]
    code, answer = await call(app, "GET", "/v1/admin/devices", token=token,
                              query=b"search=" + b"x" * 129)
    assert code == 400 and "search" in answer["error"]


@pytest.mark.parametrize("phase", ["active", "paused"])
async def test_a_rollout_answer_lists_the_actions_of_its_phase(
        app: TrackerApp, store: SqliteStore, phase: str) -> None:
    token = token_for(store, "operator")
    register_release(store, release(), RolloutPlan(), now=START)
    if phase == "paused":
        code, _ = await call(app, "POST", f"/v1/admin/rollouts/{PRODUCT}/2.0.0/pause",
                             token=token)
        assert code == 200
    code, answer = await call(app, "GET", f"/v1/admin/rollouts/{PRODUCT}/2.0.0", token=token)
    assert code == 200 and answer["phase"] == phase
    assert answer["actions"] == list(allowed_actions(phase))
    assert ("pause" in answer["actions"]) == (phase == "active")
