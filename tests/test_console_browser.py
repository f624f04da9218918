"""The operator console in a real browser, as an operator uses it: Debian's Chromium
driven by Playwright, against a real fleet (tests/release_env.py ``open_fleet``: the
origin and the tracker over HTTPS, fleet identities, a seeder, real agents).

The fleet runs in a trio loop of its own thread (Playwright's sync API blocks the
thread it runs in); one browser serves the whole module, each test gets a fresh
context (its own sessionStorage). Chromium trusts the tracker by its key pin
(``--ignore-certificate-errors-spki-list``), as devices do.

Screenshots of the fleet and rollout pages go to a temporary directory, or to
docs/images/ (the README shows them) with SWARMOTA_UPDATE_SCREENSHOTS=1. Skipped when
/usr/bin/chromium is missing (.ci/run installs Debian's ``chromium``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from swarmota.demo import broken_image, health_command, update_fleet
from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.http import HttpClient, TlsPolicy
from swarmota.peer.identity import load_identity
from swarmota.peer.state import DeviceState
from swarmota.seeder.publish import publish_release
from swarmota.tracker.admin import hash_token, new_token
from swarmota.tracker.admin_client import AdminClient
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import TokenRecord
from tests.release_env import HARDWARE_ID, PRODUCT, Fleet, open_fleet

playwright_api = pytest.importorskip("playwright.sync_api")
playwright_api.expect.set_options(timeout=20_000)
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian's chromium is not installed (.ci/run installs "
                                       "it): the console's browser tests need it")

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
TIMEOUT_MS = 20_000
XSS_MESSAGE = '<img src=x onerror="window.__xss = 1">install failed'
XSS_LOG = "line 1\n<script>window.__xss = 2</script><b>bold?</b>\nline 3"


class TrioThread:
    """A trio loop in a thread of its own, holding a nursery until :meth:`close`."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._thread = threading.Thread(target=self._main, name="console-fleet", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError("the trio thread did not start") from self._error

    def _main(self) -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await trio.sleep_forever()
        try:
            trio.run(main)
        except BaseException as exc:  # reported by close()
            self._error = exc
            self._ready.set()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` in the loop; its result."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def start(self, fn: Callable[..., Awaitable[Any]]) -> Any:
        """``nursery.start(fn)`` in the loop; what the task started with."""
        assert self._nursery is not None
        return self.run(self._nursery.start, fn)

    def close(self) -> None:
        assert self._nursery is not None
        trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the fleet did not stop"
        if self._error is not None:
            raise self._error


async def _hold_fleet(tmp: Path, images: tuple[bytes, bytes], *,
                      task_status: trio.TaskStatus[Fleet] = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery, open_fleet(nursery, tmp, images) as fleet:
        task_status.started(fleet)
        await trio.sleep_forever()


@dataclass
class Site:
    fleet: Fleet
    loop: TrioThread
    browser: Any
    url: str
    tokens: dict[str, str]
    devices: dict[str, DeviceState]
    shots: Path

    def admin(self, method: str, path: str, body: Any = None, role: str = "admin") -> Any:
        with AdminClient(self.fleet.env.tracker_url, self.tokens[role],
                         ca_file=str(self.fleet.server_ca)) as client:
            return client.get(path) if method == "GET" else client.post(path, body)

    def update(self, *names: str) -> dict[str, UpdateResult]:
        """One update pass of each named device, one after the other."""
        return {name: self.loop.run(update_once, self.devices[name]) for name in names}

    def page(self, role: str) -> Any:
        """A fresh browser context, signed in with the token of ``role``."""
        context = self.browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(self.url)
        sign_in(page, self.tokens[role])
        return page


def sign_in(page: Any, token: str) -> None:
    page.fill("#token", token)
    page.click("#sign-in-form button[type=submit]")


def screenshot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path


def expect(locator: Any) -> Any:
    return playwright_api.expect(locator)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory,
         images: tuple[bytes, bytes]) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("console")
    loop = TrioThread()
    try:
        fleet: Fleet = loop.start(partial(_hold_fleet, tmp, images))
        tokens = {}
        with SqliteStore(fleet.env.db) as store:  # 'tracker admin token create'
            for role in ("viewer", "operator", "admin"):
                tokens[role] = new_token()
                store.add_token(TokenRecord(hash_token(tokens[role]), f"console-{role}", role,
                                            time.time(), None))
        devices = {name: fleet.device(name, health_command=health_command(), seed_time_s=1.0)
                   for name in ("c1", "d1", "d2", "x1")}
        results = loop.run(update_fleet, list(devices.values()))  # 1.0.0 -> 2.0.0
        assert all(r.status == 0 and r.updated for r in results.values()), results
        shots = ROOT / "docs" / "images" if os.environ.get("SWARMOTA_UPDATE_SCREENSHOTS") \
            else tmp / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        with playwright_api.sync_playwright() as pw:
            tracker_pin = fleet.pins[1].removeprefix("sha256/")
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                f"--ignore-certificate-errors-spki-list={tracker_pin}"])
            site = Site(fleet, loop, browser, f"{fleet.env.tracker_url}/console/", tokens,
                        devices, shots)
            publish_bad_release(site)
            try:
                yield site
            finally:
                browser.close()
    finally:
        loop.close()


def publish_bad_release(site: Site) -> None:
    """3.0.0: its image fails the devices' health check; registered, no rollout yet."""
    env = site.fleet.env
    image = env.image_path("v3-bad.img", broken_image(env.v2))
    m3 = publish_release(env.repo, image, product=PRODUCT, version="3.0.0", release_counter=3,
                         compatibility=[HARDWARE_ID], zstd_level=3,
                         swarm_ca=(site.fleet.pki / "fleet-ca" / "ca.pem").read_bytes())
    answer = site.admin("POST", "releases", {"manifest": m3.to_bytes().decode()}, "operator")
    assert answer["phase"] == "none"


# --- the scenarios ------------------------------------------------------------------------


def test_sign_in_refuses_a_bad_token_and_shows_the_fleet_of_real_devices(site: Site) -> None:
    context = site.browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(site.url)
    sign_in(page, "sot_" + "x" * 43)
    expect(page.locator("#sign-in-error")).to_contain_text("missing or unknown bearer token")
    assert page.evaluate("sessionStorage.length") == 0
    sign_in(page, site.tokens["operator"])
    expect(page.locator("#who")).to_have_text("console-operator (operator)")
    assert page.evaluate("Object.keys(sessionStorage)") == ["swarmota-console-token"]
    assert context.cookies() == []  # nothing the browser would send by itself
    row = page.locator("table tr", has_text="2.0.0")
    expect(row).to_contain_text("4")  # c1, d1, d2, x1 updated through the swarm
    expect(page.locator(".card", has_text="online")).to_contain_text("4")
    screenshot(page, site.shots / "console-fleet.png")
    # search: the fleet page's box lists the devices whose id matches
    page.fill("#find-device", "d")
    page.press("#find-device", "Enter")
    expect(page.locator("table tbody tr")).to_have_count(2)
    expect(page.locator("table tbody")).to_contain_text("d1")
    page.select_option("select[name=seen]", "stale")  # filters: nobody is silent
    page.fill("input[name=search]", "")
    page.click("form.filters button[type=submit]")
    expect(page.locator("#page .empty")).to_have_text("No device matches.")
    page.select_option("select[name=seen]", "online")
    page.click("form.filters button[type=submit]")
    expect(page.locator("table tbody tr")).to_have_count(4)
    page.click("text=d2")
    expect(page.locator("#page h1")).to_have_text("Device d2")
    expect(page.locator(".report").first).to_contain_text("0 ok")
    page.click("#nav >> text=Rollouts")
    expect(page.locator("table tbody tr")).to_have_count(2)
    expect(page.locator("tr", has_text="acme-router 2.0.0")).to_contain_text("completed")
    context.close()


def test_a_bad_release_rolled_out_from_the_console_halts_at_its_canary_live(
        site: Site) -> None:
    page = site.page("operator")
    page.click("#nav >> text=Releases")
    release = page.locator("article.release", has_text=f"{PRODUCT} 3.0.0")
    expect(release).to_contain_text("offered to nobody")
    release.locator("button.new-rollout").click()
    screenshot(page, site.shots / "console-releases.png")
    form = release.locator("form.plan")
    form.locator("input[name=canary_devices]").fill("c1")
    form.locator("input[name=stages_percent]").fill("50, 100")
    form.locator("input[name=min_successes]").fill("1")
    form.locator("input[name=soak_s]").fill("0")
    form.locator("button[type=submit]").click()
    expect(page.locator("#phase")).to_have_text("active")
    expect(page.locator(".stage.current")).to_contain_text("canary")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads

    results = site.update("c1", "d1", "d2", "x1")  # the canary fails, rolls back
    assert int(results["c1"].status) == 40
    assert not results["d1"].attempted and not results["d2"].attempted

    expect(page.locator("#phase")).to_have_text("halted")  # polled, no reload
    reason = page.locator(".halt-reason")
    expect(reason).to_contain_text("canary stage: 1 failed of 1 offered")
    expect(reason).to_contain_text("c1 (stage canary, status 40 post-check-failed)")
    expect(page.locator("#rollout-devices tr", has_text="c1")).to_contain_text("rolled back")
    expect(page.locator("#failures tr", has_text="c1")).to_contain_text(
        "health check exited 1")
    expect(page.locator(".stage[data-stage=canary]")).to_contain_text("halted")
    assert page.evaluate("window.__sameDocument") is True
    assert page.locator("svg.chart rect.origin").count() >= 3  # a bar per stage + legend
    screenshot(page, site.shots / "console-rollout.png")
    audit = site.admin("GET", "audit")["audit"]
    assert any(e["action"] == "rollout.create" and e["actor"] == "console-operator"
               for e in audit), [e["action"] for e in audit]
    page.context.close()


def test_pause_and_resume_from_the_console_are_audited_as_the_operator(site: Site) -> None:
    page = site.page("operator")
    page.goto(f"{site.url}#/rollout/{PRODUCT}/1.0.0")  # active: nobody runs below it
    expect(page.locator("#phase")).to_have_text("active")
    page.click("button[data-action=pause]")
    expect(page.locator("#phase")).to_have_text("paused")
    expect(page.locator("button[data-action=pause]")).to_have_count(0)
    page.click("button[data-action=resume]")
    expect(page.locator("#phase")).to_have_text("active")
    assert site.admin("GET", f"rollouts/{PRODUCT}/1.0.0")["phase"] == "active"
    mine = [(e["action"], e["outcome"]) for e in site.admin("GET", "audit")["audit"]
            if e["actor"] == "console-operator" and e["target"] == f"{PRODUCT} 1.0.0"]
    assert mine == [("rollout.pause", "ok"), ("rollout.resume", "ok")]
    page.context.close()


def test_a_device_report_message_is_shown_as_text_never_as_markup(site: Site) -> None:
    """A compromised fleet device (its own identity, a signed request) reports HTML
    and script in its message and log tail: the console shows them as text."""
    dev = site.devices["d2"]
    identity = load_identity(dev.root)
    tls = TlsPolicy(pins=frozenset(site.fleet.pins), ca_file=str(site.fleet.server_ca))

    async def hostile_report() -> None:
        async with HttpClient(timeout_s=10.0, tls=tls, identity=identity) as http:
            await http.post_json(f"{site.fleet.env.tracker_url}/v1/report", {
                "device_id": "d2", "product": PRODUCT, "from_version": "2.0.0",
                "to_version": "3.0.0", "status": 30, "message": XSS_MESSAGE,
                "bytes_origin": 0, "bytes_peers": 0, "timings_s": {}, "log_tail": XSS_LOG})

    site.loop.run(hostile_report)
    page = site.page("viewer")
    page.goto(f"{site.url}#/device/d2")
    report = page.locator(".report", has_text="install-failed").first
    expect(report.locator(".message")).to_have_text(XSS_MESSAGE)
    report.locator("summary").click()
    expect(report.locator("pre.log")).to_have_text(XSS_LOG)
    assert page.locator("#page img, #page script, #page b").count() == 0
    page.wait_for_timeout(300)  # an onerror would have fired by now
    assert page.evaluate("window.__xss") is None
    # and had the script parsed markup, the policy's Trusted Types would have refused
    assert page.evaluate("""() => {
        try { document.createElement("div").innerHTML = "<b>x</b>"; return "parsed"; }
        catch (err) { return err.name; }
    }""") == "TypeError"
    screenshot(page, site.shots / "console-device.png")
    page.context.close()


def test_a_viewer_sees_no_action_and_a_forged_action_is_refused_and_audited(
        site: Site) -> None:
    page = site.page("viewer")
    expect(page.locator("#who")).to_have_text("console-viewer (viewer)")
    expect(page.locator("#nav a[data-page=audit]")).to_be_hidden()
    page.goto(f"{site.url}#/rollout/{PRODUCT}/1.0.0")
    expect(page.locator("#phase")).to_have_text("active")
    assert page.locator(".actions button").count() == 0
    page.goto(f"{site.url}#/releases")
    expect(page.locator("article.release").first).to_be_visible()
    assert page.locator("button.new-rollout").count() == 0
    page.goto(f"{site.url}#/device/d1")
    expect(page.locator("#page h1")).to_have_text("Device d1")
    assert page.locator("#page form, #page button").count() == 0
    # what the page does not offer, the API refuses: a request forged in the page
    status = page.evaluate("""async () => {
        const answer = await fetch("../v1/admin/rollouts/acme-router/1.0.0/pause", {
            method: "POST", headers: {authorization: "Bearer " +
                sessionStorage.getItem("swarmota-console-token")}});
        return answer.status;
    }""")
    assert status == 403
    assert site.admin("GET", f"rollouts/{PRODUCT}/1.0.0")["phase"] == "active"
    page.context.close()
    # the refusal is in the audit log, which the admin reads in the console
    page = site.page("admin")
    page.click("#nav >> text=Audit log")
    refused = page.locator("tr", has_text="console-viewer").filter(has_text="refused")
    expect(refused.first).to_contain_text(f"POST /v1/admin/rollouts/{PRODUCT}/1.0.0/pause")
    expect(refused.first).to_contain_text("has role viewer; this needs operator")
    page.context.close()



def test_an_operator_tags_a_device_and_an_admin_revokes_it(site: Site) -> None:
    page = site.page("operator")
    page.goto(f"{site.url}#/device/x1")
    page.fill("input[name=tags]", "lab eu-west")
    page.click(".tag-form button[type=submit]")
    tags = page.locator(".tags")
    expect(tags).to_contain_text("lab")
    expect(tags).to_contain_text("eu-west")
    page.click("button[aria-label='remove tag eu-west']")
    expect(tags).not_to_contain_text("eu-west")
    assert site.admin("GET", "devices/x1")["tags"] == ["lab"]
    assert page.locator("button.danger").count() == 0  # revoking is the admin's
    page.context.close()
    page = site.page("admin")
    page.goto(f"{site.url}#/device/x1")
    page.fill("input[name=reason]", "stolen")
    page.click("text=Revoke the device's certificates")  # the confirmation is accepted
    expect(page.locator("#flash")).to_have_text("Revoked 1 certificate(s) of x1")
    revoked = [r for r in site.admin("GET", "revocations")["revoked"] if r["device_id"] == "x1"]
    assert [(r["actor"], r["reason"]) for r in revoked] == [("console-admin", "stolen")]
    actions = [(e["actor"], e["action"]) for e in site.admin("GET", "audit")["audit"]
               if e["target"] == "x1"]
    assert actions == [("console-operator", "device.tag")] * 2 + [
        ("console-admin", "device.revoke")]
    page.context.close()
