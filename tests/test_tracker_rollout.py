"""The rollout state machine, driven by a simulated fleet on a fake clock (no I/O)."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest

from swarmota.tracker.errors import ConflictError, RequestError
from swarmota.tracker.rollout import (
    Admission,
    RolloutPlan,
    RolloutState,
    admit,
    apply_action,
    cohort_percent,
    mark_downloading,
    new_rollout,
    on_report,
    stage_of,
    tick,
)

HOUR = 3600.0


@dataclass
class FleetResult:
    state: RolloutState
    highest_stage: int
    offered_to: set[str]
    finished_at: float | None
    events: list[tuple[float, str, str]] = field(default_factory=list)


def simulate(plan: RolloutPlan, *, devices: int, fail_fraction: float, seed: int,
             horizon_s: float = 30 * 24 * HOUR, poll_s: float = 1800.0,
             install_s: float = 900.0) -> FleetResult:
    """``devices`` devices check in every ``poll_s`` (random phase); an offered device
    reports ``install_s`` later: failure for a ``fail_fraction`` of the fleet chosen at
    random (status 30 or 40), success otherwise. The rollout ticks at every event."""
    rng = random.Random(seed)
    ids = [f"dev-{i:05d}" for i in range(devices)]
    bad = set(rng.sample(ids, round(devices * fail_fraction)))
    state, _ = new_rollout("r-1", "acme-router", "2.0.0", 2, plan, 0.0)
    admissions: dict[str, Admission] = {}
    queue: list[tuple[float, int, str, str]] = []
    for n, device in enumerate(ids):
        heapq.heappush(queue, (rng.uniform(0, poll_s), n, "checkin", device))
    highest, offered, finished_at = state.stage, set(), None
    events: list[tuple[float, str, str]] = []
    seq = devices
    while queue:
        now, _, kind, device = heapq.heappop(queue)
        if now > horizon_s:
            break
        state, decisions = tick(state, now)
        events += [(now, d.kind, d.detail) for d in decisions]
        seq += 1
        if kind == "checkin":
            result = admit(state, device, admissions.get(device), now)
            state = result.state
            if result.offer and device not in offered:
                offered.add(device)
                assert result.admission is not None
                state, admissions[device] = mark_downloading(state, result.admission, now)
                heapq.heappush(queue, (now + install_s, seq, "report", device))
            elif not result.offer and device not in offered:
                heapq.heappush(queue, (now + poll_s, seq, "checkin", device))
        else:
            status = (30 if seq % 2 else 40) if device in bad else 0
            state, admissions[device], decisions = on_report(
                state, admissions[device], status, now, bytes_origin=10, bytes_peers=90)
            events += [(now, d.kind, d.detail) for d in decisions]
        highest = max(highest, state.stage)
        if state.phase == "halted":
            break  # only an operator can move it on
        if kind == "report" and state.totals.succeeded == devices:
            finished_at = now
            break
    return FleetResult(state, highest, offered, finished_at, events)


PLAN = RolloutPlan(canary_devices=tuple(f"dev-{i:05d}" for i in range(0, 2000, 100)),
                   soak_s=2 * HOUR)


@pytest.mark.parametrize("seed", range(8))
def test_a_bad_release_never_goes_beyond_the_canaries_and_the_first_stage(seed: int) -> None:
    result = simulate(PLAN, devices=2000, fail_fraction=0.10, seed=seed)
    assert result.state.phase == "halted"
    assert result.highest_stage <= 1  # canary (0) or 1%
    assert any(kind == "halted" for _, kind, _ in result.events)
    # Nobody outside the canaries and the 1% cohort was ever offered the release.
    assert all(stage_of(PLAN, "r-1", d) <= 1 for d in result.offered_to)
    assert len(result.offered_to) < 2000 * 0.03


def test_a_good_release_reaches_every_device() -> None:
    result = simulate(PLAN, devices=2000, fail_fraction=0.0, seed=1)
    assert result.state.phase == "active"
    assert result.state.stage_name == "100%"
    assert len(result.offered_to) == 2000
    assert result.finished_at is not None
    # canary, 1%, 10%, 50%, 100%: four soaks of 2 h plus check-in and install delays
    assert 4 * 2 * HOUR <= result.finished_at <= 14 * HOUR
    kinds = [kind for _, kind, _ in result.events]
    assert kinds == ["stage-advanced"] * 4
    assert result.state.totals.bytes_peers == 2000 * 90


def test_a_forced_rollout_reaches_everyone_even_when_bad() -> None:
    state, _ = new_rollout("r-1", "p", "2.0.0", 2, PLAN, 0.0)
    state, decision = apply_action(state, "force", 5.0, actor="alice")
    assert (state.phase, state.stage_name, decision.kind) == ("forced", "100%", "forced")
    admissions = {}
    for i in range(200):
        result = admit(state, f"d{i}", None, 6.0)
        assert result.offer and result.admission is not None
        state, admissions[f"d{i}"] = result.state, result.admission
    for admission in admissions.values():
        state, _, decisions = on_report(state, admission, 30, 7.0)
        assert decisions == []  # forced rollouts never halt by themselves
    assert state.phase == "forced" and state.totals.failed == 200


def test_cohorts_are_deterministic_and_stages_only_add_devices() -> None:
    assert cohort_percent("r-1", "dev-1") == cohort_percent("r-1", "dev-1")
    assert cohort_percent("r-1", "dev-1") != cohort_percent("r-2", "dev-1")
    plan = RolloutPlan()
    shares = [stage_of(plan, "r-9", f"d{i}") for i in range(20000)]
    assert 0.5 < shares.count(1) / 200 < 1.5       # about 1%
    assert 7 < shares.count(2) / 200 < 11          # about 9% more
    # A device admitted at an early stage stays admitted at every later stage.
    state, _ = new_rollout("r-9", "p", "2.0.0", 2, RolloutPlan(soak_s=0, min_successes=0),
                           0.0)
    admitted_at: dict[str, int] = {}
    for stage in range(1, 5):
        for i in range(2000):
            result = admit(state, f"d{i}", None, 0.0)
            if result.offer:
                admitted_at.setdefault(f"d{i}", stage)
        state, _ = tick(state, 1.0)
    assert all(stage_of(plan, "r-9", d) <= s for d, s in admitted_at.items())
    assert len(admitted_at) == 2000


def test_halt_counts_install_errors_and_health_failures_alike() -> None:
    plan = RolloutPlan(stages_percent=(100.0,), halt_min_sample=4, halt_failure_rate=0.3,
                       halt_failure_count=100)
    state, _ = new_rollout("r", "p", "2.0.0", 2, plan, 0.0)
    for status in (0, 0, 30, 40):
        assert state.phase == "active"
        result = admit(state, f"d{state.totals.admitted}", None, 1.0)
        assert result.admission is not None
        state, _, _ = on_report(result.state, result.admission, status, 2.0)
    assert state.phase == "halted" and "2/4" in state.halt_reason
    assert state.totals.failed == 1 and state.totals.rolled_back == 1


@pytest.mark.parametrize("retry", [False, True])
def test_a_device_that_rolled_back_is_not_offered_again_unless_the_plan_retries(
        retry: bool) -> None:
    state, _ = new_rollout("r", "p", "2.0.0", 2, RolloutPlan.everyone(
        retry_rolled_back=retry), 0.0)
    result = admit(state, "d1", None, 1.0)
    assert result.offer and result.admission is not None
    state, admission, _ = on_report(result.state, result.admission, 40, 2.0)
    assert admit(state, "d1", admission, 3.0).offer is retry
    failed, admission, _ = on_report(state, admission, 30, 4.0)  # an install error
    assert admit(failed, "d1", admission, 5.0).offer  # retried whatever the plan says
    assert RolloutPlan.from_json(RolloutPlan.everyone(
        retry_rolled_back=retry).to_json()).retry_rolled_back is retry


def test_absolute_failure_count_halts_before_the_minimum_sample() -> None:
    plan = RolloutPlan(stages_percent=(100.0,), min_successes=0, soak_s=0,
                       halt_min_sample=1000, halt_failure_count=3)
    state, _ = new_rollout("r", "p", "2.0.0", 2, plan, 0.0)
    for i in range(3):
        result = admit(state, f"d{i}", None, 1.0)
        assert result.admission is not None
        state, _, _ = on_report(result.state, result.admission, 20, 2.0)
    assert state.phase == "halted" and state.halt_reason.startswith("3 failures")


def test_halted_and_paused_rollouts_offer_the_release_to_nobody_new() -> None:
    state, _ = new_rollout("r", "p", "2.0.0", 2, RolloutPlan.everyone(), 0.0)
    first = admit(state, "in-flight", None, 1.0)
    assert first.offer and first.admission is not None
    state = first.state
    paused, _ = apply_action(state, "pause", 2.0)
    assert not admit(paused, "newcomer", None, 3.0).offer
    assert admit(paused, "in-flight", first.admission, 3.0).offer  # may finish
    resumed, decision = apply_action(paused, "resume", 4.0)
    assert decision.kind == "resumed" and admit(resumed, "newcomer", None, 5.0).offer
    aborted, _ = apply_action(state, "abort", 2.0)
    assert not admit(aborted, "in-flight", first.admission, 3.0).offer
    revoked, _ = apply_action(aborted, "revoke", 3.0)
    assert revoked.phase == "revoked"
    with pytest.raises(ConflictError, match="cannot resume a rollout that is revoked"):
        apply_action(revoked, "resume", 4.0)
    with pytest.raises(RequestError, match="unknown action"):
        apply_action(state, "explode", 4.0)


def test_a_stage_caps_devices_in_flight() -> None:
    plan = RolloutPlan(stages_percent=(100.0,), min_successes=0, soak_s=0, max_in_flight=2)
    state, _ = new_rollout("r", "p", "2.0.0", 2, plan, 0.0)
    offers = []
    for i in range(3):
        result = admit(state, f"d{i}", None, 1.0)
        state = result.state
        offers.append((result.offer, result.paced))
    assert offers == [(True, False), (True, False), (False, True)]
    done = Admission("d0", 1, "offered", 1.0)
    state, _, _ = on_report(state, done, 0, 2.0)
    assert admit(state, "d2", None, 3.0).offer


def test_a_stage_waits_for_its_soak_time_and_its_success_rate() -> None:
    plan = RolloutPlan(canary_devices=("c1", "c2"), min_successes=2, soak_s=100,
                       min_success_rate=1.0, halt_failure_count=50, halt_min_sample=50)
    state, _ = new_rollout("r", "p", "2.0.0", 2, plan, 0.0)
    assert state.stage_name == "canary"
    assert not admit(state, "someone-else", None, 1.0).offer
    admissions = {}
    for device in ("c1", "c2"):
        result = admit(state, device, None, 1.0)
        assert result.admission is not None
        state, admissions[device] = result.state, result.admission
    state, _, _ = on_report(state, admissions["c1"], 0, 10.0)
    assert tick(state, 500.0)[0].stage == 0           # one success of two needed
    state, _, _ = on_report(state, admissions["c2"], 0, 20.0)
    assert tick(state, 99.0)[0].stage == 0            # still soaking
    advanced, decisions = tick(state, 100.0)
    assert advanced.stage_name == "1%" and decisions[0].kind == "stage-advanced"


@pytest.mark.parametrize("bad", [
    {"stages_percent": [10, 5, 100]}, {"stages_percent": [50]}, {"min_success_rate": 2},
    {"halt_failure_count": 0}, {"canary_devices": ["a", "a"]}, {"soak_s": -1},
    {"surprise": 1}, {"max_in_flight": True},
])
def test_bad_plans_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(RequestError, match="plan"):
        RolloutPlan.from_json(bad)


def test_plans_round_trip_through_json() -> None:
    plan = RolloutPlan(canary_devices=("a", "b"), stages_percent=(5, 100), max_in_flight=3)
    assert RolloutPlan.from_json(plan.to_json()) == plan


def test_the_canary_stage_never_advances_without_its_canaries() -> None:
    plan = RolloutPlan(canary_devices=("c1", "c2", "c3"), min_successes=2, soak_s=10)
    state, _ = new_rollout("r", "p", "2.0.0", 2, plan, 0.0)
    assert tick(state, 1e6)[0].stage == 0          # nobody checked in, however long
    result = admit(state, "c1", None, 1.0)
    assert result.admission is not None
    state, _, _ = on_report(result.state, result.admission, 0, 2.0)
    assert tick(state, 1e6)[0].stage == 0          # one success of the two needed


def test_a_label_names_canaries_too_and_their_stage_needs_min_successes() -> None:
    plan = RolloutPlan(canary_label="beta", min_successes=2, soak_s=0)
    state, _ = new_rollout("r", "p", "2.0.0", 2, plan, 0.0)
    assert state.stage_name == "canary"
    assert not admit(state, "d1", None, 1.0).offer
    admissions = []
    for device in ("d1", "d2"):
        result = admit(state, device, None, 1.0, labels=("home", "beta"))
        assert result.offer and result.admission is not None and result.admission.stage == 0
        state = result.state
        admissions.append(result.admission)
    state, _, _ = on_report(state, admissions[0], 0, 2.0)
    assert tick(state, 3.0)[0].stage == 0
    state, _, _ = on_report(state, admissions[1], 0, 2.0)
    assert tick(state, 3.0)[0].stage_name == "1%"
