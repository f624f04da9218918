"""The end of an attempt's log, carried by its report: bounded, safe to show, and
recorded without changing what the console shows."""

from __future__ import annotations

import io
import logging

from swarmota.peer.logtail import AttemptLog


def test_the_tail_keeps_the_last_lines_within_the_bound() -> None:
    with AttemptLog("swarmota.peer.test-bound", max_bytes=300) as tail:
        log = logging.getLogger("swarmota.peer.test-bound.child")
        for n in range(100):
            log.info("step %03d of the attempt", n)
    text = tail.text()
    assert len(text.encode()) <= 300
    assert text.rstrip().endswith("step 099 of the attempt")
    assert "step 000" not in text


def test_hostile_text_in_a_message_is_escaped() -> None:
    with AttemptLog("swarmota.peer.test-escape") as tail:
        logging.getLogger("swarmota.peer.test-escape").warning("server said \x1b[2Jboom\x00")
    assert "\\x1b[2Jboom\\x00" in tail.text()
    assert "\x1b" not in tail.text() and "\x00" not in tail.text()


def test_info_is_recorded_without_reaching_a_warning_level_console() -> None:
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    handler.setLevel(logging.WARNING)  # what swarmota's command line sets
    root = logging.getLogger()
    root.addHandler(handler)
    logger = logging.getLogger("swarmota.peer.test-console")
    before = logger.level
    try:
        with AttemptLog("swarmota.peer.test-console") as tail:
            logger.info("downloading chunk 7")
        assert "downloading chunk 7" in tail.text()
        assert "downloading chunk 7" not in console.getvalue()
        assert logger.level == before
    finally:
        root.removeHandler(handler)
