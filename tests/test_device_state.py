"""Device state that must survive crashes and mixed update kinds (docs/ATTACK_MATRIX.md,
"Fault classes learned from outside testing": idempotence, counters; and what
``peer status`` shows): report ids kept across a resend, anti-rollback floors per update
kind and component (and the migration of a single-floor state directory), what a
device tells the tracker it runs, the last failure kept across no-op passes, no stale
progress after a kill, no partial payload left after a delta.

Devices run the real agent against the real origin and tracker of
:class:`tests.release_env.ReleaseEnv` on 127.0.0.1; kills are real SIGKILLs of
``swarmota peer update`` at named crash points.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from typing import Any

import httpx
import trio

from swarmota.infra.http_serve import ListenConfig, Receive, Scope, Send, serve_asgi
from swarmota.peer.agent import update_once
from swarmota.peer.bootctl import write_bootctl
from swarmota.peer.components import ComponentStore
from swarmota.peer.config import save_config
from swarmota.peer.download import PayloadWorkdir
from swarmota.peer.errors import StatusCode
from swarmota.peer.floors import FLOORS_FILE, Floors, read_floors
from swarmota.peer.state import DeviceState
from swarmota.seeder.publish import publish_release
from swarmota.tracker.wire import REPORT_ID_RE
from tests.release_env import (
    HARDWARE_ID,
    PRODUCT,
    REPO_ROOT,
    ReleaseEnv,
    killed_at,
    read_body,
    serve_offer,
)
from tests.test_update_delta import publish_v3_with_deltas


class RecordingTracker:
    """Forwards every request to the real tracker and keeps the JSON bodies sent to
    ``path_part`` paths (e.g. ``/v1/report``)."""

    def __init__(self, tracker_url: str) -> None:
        self.tracker_url = tracker_url
        self.bodies: dict[str, list[dict[str, Any]]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        path = scope["path"]
        if scope["method"] == "POST":
            self.bodies.setdefault(path, []).append(json.loads(body))
        query = scope.get("query_string", b"").decode()
        headers = {k.decode(): v.decode() for k, v in scope["headers"]
                   if k.lower() not in (b"host", b"content-length")}
        async with httpx.AsyncClient() as client:
            answer = await client.request(scope["method"], self.tracker_url + path
                                          + (f"?{query}" if query else ""),
                                          content=body, headers=headers)
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": [(b"content-type", answer.headers.get(
                        "content-type", "application/json").encode())]})
        await send({"type": "http.response.body", "body": answer.content})


async def recording_tracker(env: ReleaseEnv, nursery: trio.Nursery) -> tuple[RecordingTracker, str]:
    recorder = RecordingTracker(env.tracker_url)
    url: str = await nursery.start(serve_asgi, recorder, ListenConfig())
    return recorder, url


async def test_a_report_sent_again_after_a_crash_carries_the_same_report_id(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """Killed after the report was sent, before the outbox was cleared: the next pass
    sends it again, with the id it was made with, so that the tracker can store it once
    (the tracker counted it twice: fleet totals, bytes)."""
    recorder, url = await recording_tracker(env, nursery)
    dev = env.device("dev-1", mode="direct", tracker_url=url)
    await killed_at(dev, "report.after_send")
    assert len(dev.outbox()) == 1, "killed before the outbox was cleared"
    with trio.fail_after(60):
        result = await update_once(dev)
    assert result.status == StatusCode.OK and not result.attempted
    sent = recorder.bodies["/v1/report"]
    assert len(sent) == 2 and sent[0] == sent[1], "the same report, sent twice"
    assert REPORT_ID_RE.fullmatch(sent[0]["report_id"])
    assert dev.outbox() == []
    # another attempt is another report, with an id of its own
    dev2 = env.device("dev-2", mode="direct", tracker_url=url)
    with trio.fail_after(60):
        await update_once(dev2)
    ids = {body["report_id"] for body in recorder.bodies["/v1/report"]}
    assert len(ids) == 2


def publish_config(env: ReleaseEnv, content: bytes, version: str, counter: int) -> None:
    path = env.image_path(f"net-config-{version}.json", content)
    env.register(publish_release(env.repo, path, product=PRODUCT, version=version,
                                 release_counter=counter, compatibility=[HARDWARE_ID],
                                 zstd_level=3, update_type="config", component="net-config"))


IMAGE_OFFER = {"product": PRODUCT, "version": "2.0.0", "release_counter": 2,
               "target": "releases/acme-router/2.0.0.json"}
CONFIG_OFFER = {"product": PRODUCT, "version": "3.0.0", "release_counter": 3,
                "target": "releases/acme-router/3.0.0.json"}


def floors_of(dev: DeviceState) -> Floors:
    return read_floors(dev.root, dev.bootctl(), ComponentStore(dev.root / "components"))


async def test_a_config_release_with_a_higher_counter_leaves_image_releases_installable(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """Configuration 3.0.0 (counter 3) installed first, then image 2.0.0 (counter 2):
    each kind has its own floor, so the image is not a rollback (it was, for ever)."""
    publish_config(env, b'{"dns": "10.0.0.1"}\n' * 100, "3.0.0", 3)
    recorder, url = await recording_tracker(env, nursery)
    # a tracker that offers the configuration first (ours offers the image first)
    dev = env.device("dev-1", mode="direct",
                     tracker_url=await serve_offer(nursery, CONFIG_OFFER))
    first = await update_once(dev)
    assert first.status == StatusCode.OK and "net-config" in first.message, first.message
    assert floors_of(dev) == Floors(image=1, components={"net-config": 3})
    save_config(dev.config_path, replace(dev.config(), tracker_url=url))
    image = await update_once(dev)
    assert image.status == StatusCode.OK and image.updated, image.message
    # the device told the tracker what it runs, per component, with its own counter
    checkin = recorder.bodies["/v1/checkin"][-1]
    assert checkin["release_counter"] == 1
    assert checkin["components"] == [{"name": "net-config", "version": "3.0.0",
                                      "release_counter": 3}]
    assert dev.slot_path(dev.bootctl().committed).read_bytes() == env.v2
    assert floors_of(dev) == Floors(image=2, components={"net-config": 3})
    # and an image at or below its own floor is still a rollback
    save_config(dev.config_path, replace(dev.config(), tracker_url=await serve_offer(
        nursery, IMAGE_OFFER)))
    old = await update_once(dev)
    assert old.status == StatusCode.VERIFY_FAILED and "not newer" in old.message


async def test_a_state_directory_with_one_floor_for_everything_is_migrated(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """A device of before per-kind floors: its configuration (counter 3) raised the one
    floor in boot control to 3. The first pass gives the component its floor, brings
    the image's back to its committed slot's counter, and image 2.0.0 installs."""
    publish_config(env, b'{"ntp": "pool"}\n' * 100, "3.0.0", 3)
    dev = env.device("dev-1", mode="direct",
                     tracker_url=await serve_offer(nursery, CONFIG_OFFER))
    assert (await update_once(dev)).status == StatusCode.OK
    (dev.root / FLOORS_FILE).unlink()  # as the agent of before left it
    bc = dev.bootctl()
    write_bootctl(dev.bootctl_path, replace(bc, min_release_counter=3))
    save_config(dev.config_path, replace(dev.config(), tracker_url=await serve_offer(
        nursery, IMAGE_OFFER)))
    result = await update_once(dev)
    assert result.status == StatusCode.OK and result.updated, result.message
    assert floors_of(dev) == Floors(image=2, components={"net-config": 3})
    assert json.loads((dev.root / FLOORS_FILE).read_bytes())["components"] == {
        "net-config": 3}


def peer_status(dev: DeviceState) -> str:
    proc = subprocess.run([sys.executable, "-m", "swarmota.cli", "peer", "status",
                           str(dev.root)], capture_output=True, text=True, cwd=REPO_ROOT,
                          check=True)
    return proc.stdout


async def test_status_keeps_the_last_failure_across_passes_with_nothing_to_do(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    dev = env.device("dev-1", mode="direct", origin_url="http://127.0.0.1:9")
    failed = await update_once(dev)
    assert failed.status == StatusCode.DOWNLOAD_FAILED and failed.attempted
    save_config(dev.config_path, replace(dev.config(), tracker_url=await serve_offer(
        nursery, None)))  # a tracker with nothing to offer
    idle = await update_once(dev)
    assert idle.status == StatusCode.OK and not idle.attempted
    text = peer_status(dev)
    assert "last result: status 0: up to date" in text
    assert "last failure: status 10: metadata download failed" in text, text
    # an update that succeeds clears it
    save_config(dev.config_path, replace(dev.config(), origin_url=env.origin_url,
                                         tracker_url=env.tracker_url))
    assert (await update_once(dev)).updated
    assert "last failure" not in peer_status(dev)


async def test_a_killed_download_leaves_no_stale_progress_in_status(env: ReleaseEnv) -> None:
    """SIGKILL mid-download: the progress record stays on disk, but no agent runs, so
    ``peer status`` does not claim a download is under way."""
    dev = env.device("dev-1", mode="direct", download_concurrency=1)
    await killed_at(dev, "download.chunk_written:3")  # progress is saved after a chunk
    assert dev.progress_path.exists(), "the killed pass left its progress"
    assert dev.progress() is None
    assert "now: downloading" not in peer_status(dev)


async def test_a_partial_full_payload_is_removed_once_a_delta_succeeds(
        env: ReleaseEnv) -> None:
    """An earlier pass began the full payload (its delta had failed then); this pass's
    delta works: the full payload's work area is of no use and goes."""
    v3, m3 = publish_v3_with_deltas(env)
    dev = env.device("dev-1", mode="direct")
    leftover = PayloadWorkdir(dev.downloads_dir, m3.full_payload)
    leftover.prepare()
    first = (env.repo.origin_dir / m3.full_payload.path).read_bytes()[
        :m3.full_payload.chunk_size]
    leftover.write_chunk(0, first)
    assert leftover.part.exists()
    result = await update_once(dev)
    assert result.status == StatusCode.OK and result.payload_kind == "delta", result.message
    assert dev.slot_path("b").read_bytes() == v3
    assert list(dev.downloads_dir.iterdir()) == []
