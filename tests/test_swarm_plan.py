"""Which chunks a swarm-mode device asks the origin for: pure planning functions.

Scenario covered: a fleet pulling one payload through a CDN link must not pull it once
per device. Devices never talk about what they fetch; they agree by construction.
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from swarmota.peer.swarm import PieceView
from swarmota.peer.swarm_fetch import first_run, owned_blocks, pick_origin_run, senior_run_pieces

PEER_IDS = st.lists(st.binary(min_size=20, max_size=20), min_size=1, max_size=24, unique=True)


@given(PEER_IDS, st.integers(min_value=0, max_value=2000))
def test_every_block_has_exactly_one_owner_and_shares_differ_by_one_at_most(
        peers: list[bytes], blocks: int) -> None:
    """Devices that see the same downloaders split the payload exactly, and evenly."""
    shares = [owned_blocks(blocks, me, [p for p in peers if p != me]) for me in peers]
    for block in range(blocks):
        assert sum(share[block] for share in shares) == 1
    sizes = [sum(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_ownership_does_not_depend_on_the_order_peers_are_seen_in() -> None:
    peers = [bytes([i]) * 20 for i in range(5)]
    me, others = peers[2], peers[:2] + peers[3:]
    assert owned_blocks(40, me, others) == owned_blocks(40, me, list(reversed(others)))
    assert owned_blocks(40, me, others) == owned_blocks(40, me, [*others, me])


def test_alone_a_device_owns_everything() -> None:
    assert owned_blocks(7, b"x" * 20, []) == [True] * 7


def test_first_run_takes_adjacent_wanted_pieces_up_to_the_limit() -> None:
    mask = [False, True, True, True, False, True]
    assert first_run(mask, 2) == [1, 2]
    assert first_run(mask, 8) == [1, 2, 3]
    assert first_run([False] * 4, 3) == []
    # from a cursor, wrapping around; a run never wraps
    assert first_run(mask, 8, start=4) == [5]
    assert first_run(mask, 8, start=6) == [1, 2, 3]
    assert first_run([True, True, False, True], 4, start=3) == [3]


def test_pick_origin_run_continues_from_the_cursor() -> None:
    wanted = [True] * 10
    assert pick_origin_run(wanted, 3, 4) == [3, 4, 5, 6]
    assert pick_origin_run(wanted, 13, 2) == [3, 4]  # the cursor wraps


def test_pick_origin_run_jumps_into_the_longest_gap_when_the_cursor_is_taken() -> None:
    wanted = [False] * 4 + [True] * 20 + [False] * 2 + [True] * 3
    run = pick_origin_run(wanted, 0, 2, jitter=0.5)
    assert run == [14, 15]  # half way into the 20-piece gap
    short = [False, True, True, False]
    assert pick_origin_run(short, 0, 4) == [1, 2]  # short gaps from their start


def test_pick_origin_run_returns_nothing_when_nothing_is_wanted() -> None:
    assert pick_origin_run([False] * 5, 2, 3) == []
    assert pick_origin_run([], 0, 3) == []


@given(st.lists(st.booleans(), max_size=300), st.integers(min_value=0, max_value=10**6),
       st.integers(min_value=1, max_value=32), st.floats(min_value=0, max_value=0.999))
def test_pick_origin_run_only_picks_wanted_adjacent_pieces(
        wanted: list[bool], cursor: int, max_pieces: int, jitter: float) -> None:
    run = pick_origin_run(wanted, cursor, max_pieces, jitter)
    assert len(run) <= max_pieces
    assert all(wanted[i] for i in run)
    assert run == list(range(run[0], run[0] + len(run))) if run else not any(wanted)


def test_devices_starting_at_random_cursors_rarely_pick_the_same_first_run() -> None:
    rng = random.Random(7)
    wanted = [True] * 400
    starts = [tuple(pick_origin_run(wanted, rng.randrange(400), 4)) for _ in range(16)]
    assert len(set(starts)) >= 14


def _view(*, replied: bool, known: int, connected: int) -> PieceView:
    return PieceView(have=(False,) * 8, availability=(0,) * 8, num_peers=connected,
                     checking=False, tracker_replied=replied, known_peers=known)


def test_senior_downloader_fetches_large_runs_once_every_named_peer_is_connected() -> None:
    """The fleet's senior keeps the origin link busy from its first request (small runs
    left the link idle between answers) once nobody more senior can still turn up."""
    settled = _view(replied=True, known=15, connected=15)
    assert senior_run_pieces(settled, others=True, alone_for_s=0.0, grace_s=0.5,
                             stalled=False, small=2, large=8) == 8


def test_small_runs_while_a_more_senior_downloader_may_still_connect() -> None:
    for view, others in ((_view(replied=True, known=15, connected=9), True),  # connecting
                         (_view(replied=False, known=0, connected=3), True),  # no answer yet
                         (_view(replied=True, known=0, connected=0), False)):  # alone so far
        assert senior_run_pieces(view, others=others, alone_for_s=0.1, grace_s=0.5,
                                 stalled=False, small=2, large=8) == 2
        assert senior_run_pieces(view, others=others, alone_for_s=0.5, grace_s=0.5,
                                 stalled=False, small=2, large=8) == 8  # grace over
        assert senior_run_pieces(view, others=others, alone_for_s=0.0, grace_s=0.5,
                                 stalled=True, small=2, large=8) == 8  # peers stalled
