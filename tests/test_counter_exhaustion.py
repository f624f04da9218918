"""Counter exhaustion: whoever holds the targets keys can sign release counter 2^53,
after which every later release would be a rollback on every device that installed it.
Devices refuse a counter too far above their floor; root can reset a product's floor
(an epoch in root metadata), and locked-out devices recover without reflashing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from swarmota.demo import mutate_image
from swarmota.manifest import (
    CounterJumpError,
    CounterReset,
    ManifestFormatError,
    apply_counter_reset,
    check_applicable,
    encode_counter_resets,
    parse_counter_resets,
)
from swarmota.peer.agent import update_once
from swarmota.peer.components import ComponentStore
from swarmota.peer.config import load_config, save_config
from swarmota.peer.errors import ConfigError, StatusCode
from swarmota.peer.floors import raise_component_floor, read_floors
from swarmota.peer.trust import TrustState
from swarmota.seeder.keys import load_private_key
from swarmota.seeder.publish import publish_release
from swarmota.seeder.repository import Repository
from tests.release_env import HARDWARE_ID, PRODUCT, ReleaseEnv, publish, serve_offer

ABSURD = 2**53


# --- the pure rules ----------------------------------------------------------------------


async def test_counter_far_above_the_floor_is_refused(env: ReleaseEnv) -> None:
    absurd = replace(env.m2, release_counter=ABSURD)
    with pytest.raises(CounterJumpError, match="max_release_counter_jump"):
        check_applicable(absurd, product=PRODUCT, hardware_id=HARDWARE_ID,
                         installed_counter=1, max_counter_jump=1_000_000)
    check_applicable(replace(env.m2, release_counter=1_000_001), product=PRODUCT,
                     hardware_id=HARDWARE_ID, installed_counter=1, max_counter_jump=1_000_000)


def test_a_reset_applies_once_per_epoch_and_only_lowers_the_floor() -> None:
    reset = CounterReset(epoch=2, floor=7)
    assert apply_counter_reset(ABSURD, 0, reset) == (7, 2)
    assert apply_counter_reset(5, 1, reset) == (5, 2), "a floor below stays"
    assert apply_counter_reset(ABSURD, 2, reset) is None, "epoch 2 was applied already"
    assert apply_counter_reset(ABSURD, 3, reset) is None, "an older root cannot undo"
    assert apply_counter_reset(ABSURD, 0, None) is None


@pytest.mark.parametrize("field", [
    [], {"acme": {"epoch": 0, "floor": 1}}, {"acme": {"epoch": 1}},
    {"acme": {"epoch": 1, "floor": -1}}, {"acme": {"epoch": True, "floor": 1}},
    {"../x": {"epoch": 1, "floor": 1}}, {"acme": {"epoch": 1, "floor": 2**60}},
    {"acme": {"epoch": 1, "floor": 1, "extra": 0}},
])
def test_malformed_counter_resets_are_refused(field: object) -> None:
    with pytest.raises(ManifestFormatError):
        parse_counter_resets(field)


def test_counter_resets_round_trip() -> None:
    resets = {"acme": CounterReset(3, 10), "beta": CounterReset(1, 0)}
    assert parse_counter_resets(encode_counter_resets(resets)) == resets


async def test_device_config_bounds_the_jump(env: ReleaseEnv) -> None:
    config = env.device("cfg").config()
    assert config.max_release_counter_jump == 1_000_000
    for bad in (0, -1, 2**54, True):
        with pytest.raises(ConfigError, match="max_release_counter_jump"):
            replace(config, max_release_counter_jump=bad)


async def test_a_device_json_of_an_older_agent_with_a_trust_refresh_interval_loads(
        env: ReleaseEnv) -> None:
    """Older agents wrote ``trust_refresh_interval_s`` (an idle device refreshed its
    trusted metadata that often; now it does at every check-in): such a device.json
    still loads, the key dropped; any other unknown key is still refused."""
    dev = env.device("older")
    path = dev.root / "device.json"
    raw = json.loads(path.read_bytes())
    path.write_text(json.dumps({**raw, "trust_refresh_interval_s": 86400.0}))
    assert load_config(path) == dev.config()
    path.write_text(json.dumps({**raw, "trust_refresh_intervals": 1}))
    with pytest.raises(ConfigError, match="trust_refresh_intervals"):
        load_config(path)


def test_a_damaged_trust_state_record_reads_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "trust_state.json"
    path.write_bytes(b"{damaged")
    assert TrustState.load(path) == TrustState()


def test_a_trust_state_record_of_an_older_agent_keeps_its_counter_reset_epochs(
        tmp_path: Path) -> None:
    """Older agents also recorded when the chain was last refreshed; the epochs (what
    the record is for) are read as they were, and a save keeps only them."""
    path = tmp_path / "trust_state.json"
    path.write_text(json.dumps({"refreshed_at_s": 1000.0, "counter_epochs": {PRODUCT: 2}}))
    state = TrustState.load(path)
    assert state == TrustState({PRODUCT: 2})
    state.save(path)
    assert json.loads(path.read_bytes()) == {"counter_epochs": {PRODUCT: 2}}


# --- the attack and the recovery, end to end ---------------------------------------------


def absurd_release(env: ReleaseEnv) -> dict[str, object]:
    """The stolen targets key signs v3 with counter 2^53 (the single-key setup: the key
    is on the publishing host); a compromised tracker offers it."""
    data = mutate_image(env.v2, seed=31)
    m3 = publish_release(env.repo, env.image_path("v3.img", data), product=PRODUCT,
                         version="3.0.0", release_counter=ABSURD, compatibility=[HARDWARE_ID],
                         zstd_level=3, allow_counter_jump=True)
    return {"product": PRODUCT, "version": "3.0.0", "release_counter": ABSURD,
            "target": m3.target_name}


async def test_counter_jump_to_2_53_is_refused_and_the_floor_stays(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    fake = await serve_offer(nursery, absurd_release(env))
    dev = env.device("dev-1", mode="direct", tracker_url=fake)
    result = await update_once(dev)
    assert result.status == StatusCode.VERIFY_FAILED, result.message
    assert "max_release_counter_jump" in result.message
    bc = dev.bootctl()
    assert bc.min_release_counter == 1 and bc.primary == bc.committed == "a"
    assert dev.slot_path("a").read_bytes() == env.v1 and not dev.slot_path("b").exists()


async def test_root_signed_counter_reset_recovers_devices_locked_out_by_2_53(
        env: ReleaseEnv, nursery: trio.Nursery, tmp_path: Path) -> None:
    fake = await serve_offer(nursery, absurd_release(env))
    # a device provisioned before the jump bound (any jump accepted) installs it
    legacy = env.device("legacy", mode="direct", tracker_url=fake,
                        max_release_counter_jump=ABSURD)
    modern = env.device("modern", mode="direct", tracker_url=fake)
    assert (await update_once(legacy)).status == StatusCode.OK
    assert legacy.bootctl().min_release_counter == ABSURD
    assert (await update_once(modern)).status == StatusCode.VERIFY_FAILED

    # recovery, one signing request: the stolen targets key rotated out, the absurd
    # release withdrawn, the product's counter reset to the highest legitimate one
    repo: Repository = env.repo
    _, (targets_key,) = repo.rotate("targets", generate=1)
    repo.stage_targets(remove=[f"releases/{PRODUCT}/3.0.0.json"], note="withdraw 3.0.0")
    staged = repo.counter_reset(PRODUCT, floor=2)
    assert not staged.live and staged.request is not None
    assert any("counter reset" in line for line in staged.request.describe())
    repo.sign(load_private_key(repo.offline_root_key_path))
    _, staged = repo.sign(load_private_key(targets_key))
    assert staged.live and repo.counter_resets()[PRODUCT] == CounterReset(1, 2)
    # v4, counter 3: staged, then signed by the new offline targets key
    env.register(publish(repo, tmp_path, mutate_image(env.v2, seed=41), "4.0.0", 3))

    # the legacy device's components took the absurd counter too (one floor per kind)
    raise_component_floor(legacy.root, "modem-fw", ABSURD)
    for dev in (legacy, modern):  # the operator has the real tracker back
        save_config(dev.config_path, replace(dev.config(), tracker_url=env.tracker_url))
    for dev in (legacy, modern):
        result = await update_once(dev)
        assert result.status == StatusCode.OK, result.message
        assert result.to_version == "4.0.0"
        assert dev.bootctl().min_release_counter == 3
        assert TrustState.load(dev.trust_state_path).counter_epochs == {PRODUCT: 1}
    assert read_floors(legacy.root, legacy.bootctl(), ComponentStore(
        legacy.root / "components")).of("modem-fw") == 2  # every floor was reset

    # the withdrawn release cannot come back, whoever offers it
    for dev in (legacy, modern):
        save_config(dev.config_path, replace(dev.config(), tracker_url=fake))
        result = await update_once(dev)
        assert result.status == StatusCode.VERIFY_FAILED
        assert "not listed in the signed targets" in result.message
        assert dev.bootctl().min_release_counter == 3

