"""The operator's workflow end to end: a real tracker over HTTPS that accepts only
devices signed by the fleet CA, real agents with pinned keys and identities, releases
registered through the admin API (verified against the signed repository metadata).

A bad release with one failing canary halts at the canary, the device named; aborted,
then rolled out again (generation 2), it halts again at its new canary; a good release
goes canary -> 50% -> 100% -> completed, and the inventory follows the reports."""

from __future__ import annotations

import time
from typing import Any

import trio

from swarmota.demo import broken_image, health_command
from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from swarmota.peer.state import DeviceState
from swarmota.seeder.publish import publish_release
from swarmota.tracker.admin import hash_token, new_token
from swarmota.tracker.admin_client import AdminClient
from swarmota.tracker.errors import AdminApiError
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import TokenRecord
from tests.release_env import HARDWARE_ID, PRODUCT, Fleet


class Operator:
    """What an operator's client does: the admin API over HTTPS with a token."""

    def __init__(self, fleet: Fleet, role: str = "operator") -> None:
        self.url = fleet.env.tracker_url
        self.ca = str(fleet.server_ca)
        self.token = new_token()
        with SqliteStore(fleet.env.db) as store:  # the bootstrap: tracker admin token create
            store.add_token(TokenRecord(hash_token(self.token), f"alice-{role}", role,
                                        time.time(), None))

    async def __call__(self, method: str, path: str, body: Any = None) -> Any:
        def call() -> Any:
            with AdminClient(self.url, self.token, ca_file=self.ca) as client:
                return client.get(path) if method == "GET" else client.post(path, body)
        return await trio.to_thread.run_sync(call)


def plan(canaries: tuple[str, ...]) -> dict[str, Any]:
    return RolloutPlan(canary_devices=canaries, stages_percent=(50.0, 100.0),
                       min_successes=1, soak_s=0).to_json()


async def run(devices: list[DeviceState]) -> dict[str, Any]:
    results = {}
    for dev in devices:
        results[dev.config().device_id] = await update_once(dev)
    return results


async def test_operator_stops_a_bad_canary_retries_it_and_completes_a_good_release(
        fleet: Fleet) -> None:
    env = fleet.env
    operator = Operator(fleet)
    devices = [fleet.device(name, health_command=health_command(), mode="direct",
                            seed_time_s=0.0, image=env.v2, version="2.0.0", counter=2)
               for name in ("c1", "c2", "d1", "d2", "d3")]

    # the bad release, published and registered through the API with a canary plan
    bad = env.image_path("v3-bad.img", broken_image(env.v2))
    m3 = publish_release(env.repo, bad, product=PRODUCT, version="3.0.0", release_counter=3,
                         compatibility=[HARDWARE_ID], zstd_level=3)
    answer = await operator("POST", "releases", {"manifest": m3.to_bytes().decode(),
                                                 "rollout": plan(("c1",))})
    assert answer["added"] and answer["phase"] == "active"
    results = await run(devices)
    assert results["c1"].status == StatusCode.POSTCHECK_FAILED
    assert not any(results[d].attempted for d in ("c2", "d1", "d2", "d3"))
    rollout = await operator("GET", f"rollouts/{PRODUCT}/3.0.0")
    assert rollout["phase"] == "halted" and rollout["stage"] == "canary"
    assert "c1 (stage canary, status 40 post-check-failed): health check exited 1" \
        in rollout["halt_reason"]
    # the report carries the end of the agent's log of that attempt
    device = await operator("GET", "devices/c1")
    tail = device["reports"][0]["log_tail"]
    assert "swarmota.peer.agent WARNING update to 3.0.0 failed (40)" in tail, tail
    assert len(tail.encode()) <= 16 * 1024

    # abort, then a new rollout of the same release: generation 2, canary c2
    await operator("POST", f"rollouts/{PRODUCT}/3.0.0/abort")
    again = await operator("POST", "rollouts", {"product": PRODUCT, "version": "3.0.0",
                                                "plan": plan(("c2",))})
    assert again["generation"] == 2 and again["phase"] == "active"
    results = await run(devices)
    assert results["c2"].status == StatusCode.POSTCHECK_FAILED and not results["c1"].attempted
    rollout = await operator("GET", f"rollouts/{PRODUCT}/3.0.0")
    assert (rollout["generation"], rollout["phase"]) == (2, "halted")
    assert "c2 (stage canary" in rollout["halt_reason"]

    # a good release: canary, then 50 %, then everyone, completed
    good = env.image_path("v4.img", env.v2[::-1])
    m4 = publish_release(env.repo, good, product=PRODUCT, version="4.0.0", release_counter=4,
                         compatibility=[HARDWARE_ID], zstd_level=3)
    await operator("POST", "releases", {"manifest": m4.to_bytes().decode(),
                                        "rollout": plan(("c1",))})
    for _ in range(4):  # each pass of the fleet lets the rollout move on
        await run(devices)
    rollout = await operator("GET", f"rollouts/{PRODUCT}/4.0.0")
    assert rollout["phase"] == "completed", rollout
    assert rollout["totals"]["succeeded"] == 5 and rollout["totals"]["failed"] == 0
    listed = await operator("GET", f"devices?product={PRODUCT}")
    assert {d["device_id"]: d["version"] for d in listed["devices"]} == {
        "c1": "4.0.0", "c2": "4.0.0", "d1": "4.0.0", "d2": "4.0.0", "d3": "4.0.0"}

    # a release the repository did not sign is refused, whoever holds a token
    forged = m4.to_bytes().decode().replace('"4.0.0"', '"4.0.1"')
    try:
        await operator("POST", "releases", {"manifest": forged})
    except AdminApiError as exc:
        assert exc.status == 400 and "not in the repository's signed targets" in str(exc)
    else:
        raise AssertionError("an unsigned release was registered")
