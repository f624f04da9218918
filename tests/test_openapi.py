"""The tracker's OpenAPI 3.1 document: checked in, served, and true of a live tracker
(schemathesis generates requests for every route and checks each answer against it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from swarmota.tracker.admin import ROUTES, hash_token, new_token
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.openapi import openapi_document
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import TokenRecord
from swarmota.tracker.wire import CheckIn, Report

ROOT = Path(__file__).resolve().parent.parent


def test_the_checked_in_document_is_the_one_the_tracker_serves() -> None:
    """docs/openapi.json is generated (python -m tracker.openapi): regenerate it when
    the API changes."""
    checked_in = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert checked_in == openapi_document()


def test_every_admin_route_is_described() -> None:
    paths = openapi_document()["paths"]
    for route in ROUTES:
        path = "/v1/admin/" + "/".join(route.path)
        assert route.method.lower() in paths[path], path


@dataclass
class LiveTracker:
    url: str
    token: str


@pytest.fixture(scope="module")
def live_tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTracker]:
    """``swarmota tracker serve`` as its own process, lab mode, on a database holding a
    release, its rollout, a device, a report and an admin token."""
    tmp = tmp_path_factory.mktemp("openapi")
    db = tmp / "tracker.sqlite"
    token = new_token()
    with SqliteStore(db) as store:
        store.add_token(TokenRecord(hash_token(token), "fuzzer", "admin", 0.0, None))
        register_release(store, Release.create("acme-router", "2.0.0", 2),
                         RolloutPlan(canary_devices=("dev-1",)), now=time.time())
        store.record_checkin(CheckIn("dev-1", "acme-router", "hw1", "1.0.0", 1), time.time())
        store.add_report(Report("dev-1", "acme-router", "1.0.0", "2.0.0", 30, "no", 1, 2, {},
                                "r-00000001", "log line\n"), time.time())
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmota.cli", "tracker", "serve", "--db", str(db),
         "--listen", "127.0.0.1:0", "--allow-unauthenticated-devices"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"listening on (\S+)", line)
        assert found, line
        yield LiveTracker(found.group(1).rstrip(":"), token)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_every_route_answers_as_documented(live_tracker: LiveTracker) -> None:
    """For every operation of the served document: documented status codes and content
    types, answers that match their schemas, and never a 5xx, whatever schemathesis
    sends (with the admin token, so that admin routes are exercised past
    authentication)."""
    api = schemathesis.openapi.from_url(f"{live_tracker.url}/v1/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    documented = {f"{method.upper()} {path}"
                  for path, methods in openapi_document()["paths"].items() for method in methods}
    # schemathesis leaves out the document's own URL
    assert {o.label for o in operations} == documented - {"GET /v1/openapi.json"}
    headers = {"authorization": f"Bearer {live_tracker.token}"}

    for operation in operations:
        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=12, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case: Any) -> None:
            response = case.call(base_url=live_tracker.url, headers=headers, timeout=10)
            assert response.status_code < 500, (case.method, case.formatted_path,
                                                response.text)
            case.validate_response(response, checks=[status_code_conformance,
                                                     content_type_conformance,
                                                     response_schema_conformance])

        check()
