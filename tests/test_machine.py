"""The update state machine (pure), its journal codec, the crash-point facility and the
fsio step hook."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarmota.infra.fsio import atomic_write_bytes
from swarmota.peer import crashpoints
from swarmota.peer.machine import (
    Action,
    Event,
    Journal,
    JournalError,
    Phase,
    advance,
    budget_spent_outcome,
    decode_journal,
    encode_journal,
    recover,
)


def run_to(*events: Event) -> Journal:
    j = Journal()
    for event in events:
        j = advance(j, event)
    return j


def test_clean_update_walks_every_state_in_order() -> None:
    j = Journal()
    seen = [j.phase]
    for event in (Event.CHECK, Event.OFFER, Event.DOWNLOADED, Event.VERIFIED, Event.APPLIED,
                  Event.SWITCHED, Event.HEALTHY, Event.REPORT, Event.QUEUED):
        j = advance(j, event)
        seen.append(j.phase)
    assert seen == [Phase.IDLE, Phase.CHECKING, Phase.DOWNLOADING, Phase.VERIFYING,
                    Phase.APPLYING, Phase.SWITCHING, Phase.HEALTH_CHECKING, Phase.COMMITTED,
                    Phase.REPORTING, Phase.IDLE]
    assert j.seq == 9 and j.attempt == 1


def test_unhealthy_slot_is_rolled_back_then_reported() -> None:
    j = run_to(Event.CHECK, Event.OFFER, Event.DOWNLOADED, Event.VERIFIED, Event.APPLIED,
               Event.SWITCHED, Event.UNHEALTHY)
    assert j.phase is Phase.ROLLED_BACK
    assert advance(j, Event.REPORT).phase is Phase.REPORTING


def test_delta_fallback_returns_to_downloading() -> None:
    j = run_to(Event.CHECK, Event.OFFER, Event.DOWNLOADED, Event.VERIFIED)
    j = advance(j, Event.FALLBACK, payload_kind="full")
    assert j.phase is Phase.DOWNLOADING and j.payload_kind == "full"


def test_impossible_transitions_are_programming_errors() -> None:
    with pytest.raises(RuntimeError, match="no transition from idle on switched"):
        advance(Journal(), Event.SWITCHED)
    with pytest.raises(RuntimeError):
        advance(run_to(Event.CHECK, Event.OFFER), Event.HEALTHY)


def test_offer_starts_a_new_attempt_without_old_fields() -> None:
    j = advance(Journal(phase=Phase.CHECKING, attempt=3, to_version="old", status=20),
                Event.OFFER, to_version="2.0")
    assert (j.attempt, j.to_version, j.status) == (4, "2.0", None)


@pytest.mark.parametrize("phase", [Phase.CHECKING, Phase.DOWNLOADING, Phase.VERIFYING,
                                   Phase.APPLYING, Phase.SWITCHING])
def test_recovery_before_the_switch_reclaims_and_starts_over(phase: Phase) -> None:
    rec = recover(Journal(phase=phase, seq=5), pending=False, committed_version="1.0")
    assert rec.actions == (Action.RECLAIM_SLOT_WRITES, Action.RUN_PASS)
    assert rec.journal.phase is Phase.IDLE and rec.journal.seq == 6


@pytest.mark.parametrize("phase", [p for p in Phase
                                   if p not in (Phase.COMMITTED, Phase.ROLLED_BACK)])
def test_a_pending_switch_is_always_finished_first(phase: Phase) -> None:
    rec = recover(Journal(phase=phase), pending=True, committed_version="1.0")
    assert rec.actions == (Action.RECLAIM_SLOT_WRITES, Action.FINISH_PENDING)


@pytest.mark.parametrize("phase", [Phase.COMMITTED, Phase.ROLLED_BACK])
def test_a_journaled_verdict_is_carried_out_without_another_boot_attempt(
        phase: Phase) -> None:
    """Power lost after the health check's verdict, before boot control acted on it:
    the verdict stands (issue 15: a check that passed is not a failed boot)."""
    rec = recover(Journal(phase=phase), pending=True, committed_version="1.0")
    assert rec.actions == (Action.RECLAIM_SLOT_WRITES, Action.FINISH_VERDICT)


def test_boot_attempts_are_journaled_in_the_health_check_state() -> None:
    j = run_to(Event.CHECK, Event.OFFER, Event.DOWNLOADED, Event.VERIFIED, Event.APPLIED)
    j = advance(j, Event.SWITCHED, boot_budget=3)
    for n in (1, 2):
        j = advance(j, Event.BOOT_ATTEMPT)
        assert (j.phase, j.boot_attempts, j.boot_budget) == (Phase.HEALTH_CHECKING, n, 3)
    assert decode_journal(encode_journal(j)) == j
    assert advance(j, Event.HEALTHY).boot_attempts == 2


@pytest.mark.parametrize(("attempts", "status"), [(3, 41), (4, 41), (2, 40), (0, 40)])
def test_a_spent_budget_is_an_interruption_only_if_every_boot_reached_the_agent(
        attempts: int, status: int) -> None:
    """Every spent boot reached the agent's health check and none gave a verdict: power
    cuts, 41 (not the release's fault). A boot that never reached the agent (panic,
    hang): 40."""
    j = Journal(phase=Phase.HEALTH_CHECKING, to_version="2.0", target_slot="b",
                boot_budget=3, boot_attempts=attempts)
    got, message = budget_spent_outcome(j)
    assert got == status
    assert ("interrupted" in message) == (status == 41)
    rolled = advance(j, Event.BUDGET_SPENT, status=got, message=message)
    assert rolled.phase is Phase.ROLLED_BACK
    rec = recover(rolled, pending=False, committed_version="1.0")
    assert rec.journal.report is not None and rec.journal.report["status"] == status
    # the fall back reached boot control, the journal did not: same answer
    rec = recover(j, pending=False, committed_version="1.0")
    assert rec.journal.report is not None and rec.journal.report["status"] == status


@pytest.mark.parametrize(("committed", "status"), [("2.0", 0), ("1.0", 40)])
def test_recovery_after_the_outcome_reports_what_boot_control_says(
        committed: str, status: int) -> None:
    j = Journal(phase=Phase.COMMITTED, from_version="1.0", to_version="2.0")
    rec = recover(j, pending=False, committed_version=committed)
    assert rec.actions == (Action.RECLAIM_SLOT_WRITES, Action.QUEUE_REPORT)
    assert rec.journal.phase is Phase.REPORTING and rec.journal.status == status
    assert rec.journal.report is not None and rec.journal.report["status"] == status


def test_recovery_in_reporting_queues_the_stored_report() -> None:
    j = Journal(phase=Phase.REPORTING, report={"status": 0})
    rec = recover(j, pending=False, committed_version="2.0")
    assert rec.actions == (Action.QUEUE_REPORT,) and rec.journal == j


def test_journal_round_trips_and_rejects_damage() -> None:
    j = run_to(Event.CHECK, Event.OFFER)
    assert decode_journal(encode_journal(j)) == j
    for bad in (b"", b"[]", b'{"phase": "flying", "seq": 1}', b'{"phase": "idle"}',
                encode_journal(j)[:20], b'{"phase": "idle", "seq": 1, "to_version": 3}'):
        with pytest.raises(JournalError):
            decode_journal(bad)


def test_fsio_hook_sees_every_step_of_an_atomic_write(tmp_path: Path) -> None:
    steps: list[str] = []
    atomic_write_bytes(tmp_path / "f", b"data", hook=steps.append)
    assert steps == ["before_fsync", "after_fsync", "before_rename", "after_rename",
                     "after_dir_fsync"]


def test_fsio_hook_interrupting_before_rename_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def interrupt(step: str) -> None:
        if step == "before_rename":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new", hook=interrupt)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_crash_at_parsing() -> None:
    assert crashpoints.parse_crash_at("a.b") == ("a.b", 1)
    assert crashpoints.parse_crash_at("a.b:3") == ("a.b", 3)
    for bad in ("", ":2", "a:0", "a:x"):
        with pytest.raises(ValueError):
            crashpoints.parse_crash_at(bad)


def test_crash_points_are_inert_without_the_variables() -> None:
    assert crashpoints.configure({}) is None
    assert crashpoints.fsio_hook("x") is None
    crashpoints.crash_point("anything")  # returns, does nothing


def test_crash_point_traces_and_kills_at_the_nth_pass(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    code = ("from peer import crashpoints as c\n"
            "for i in range(5):\n"
            "    c.crash_point('loop')\n"
            "    print(i, flush=True)\n")
    env = dict(os.environ, SWARMOTA_CRASH_AT="loop:3", SWARMOTA_CRASH_TRACE=str(trace))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.split() == ["0", "1"]
    assert trace.read_text().split() == ["loop"] * 3
