"""The OpenAPI 3.1 description of the tracker's HTTP API. Pure.

Built from the same definitions the tracker serves by: the admin routes table
(:data:`tracker.admin.ROUTES`: paths, methods, roles, query parameters) and the wire
format's limits and patterns (:mod:`tracker.wire`). The tracker serves it at
``GET /v1/openapi.json``; ``docs/openapi.json`` is the same document, checked in
(``python -m tracker.openapi > docs/openapi.json``; a test keeps them equal), and a
test runs schemathesis against a live tracker on every route.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from swarmota.tracker.admin import ROUTES, Route
from swarmota.tracker.rollout import ACTIONS, DEVICE_STATUSES, PHASES, RolloutPlan
from swarmota.tracker.wire import (
    DEVICE_ID_RE,
    MAX_BYTES_COUNT,
    MAX_COMPONENTS,
    MAX_LABELS,
    MAX_LOG_TAIL_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_RELEASE_COUNTER,
    MAX_TIMINGS,
    NETWORK_ID_RE,
    REPORT_ID_RE,
    STATUS_NAMES,
    TIMING_NAME_RE,
)

__all__ = ["openapi_document"]

_PRODUCT = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"}
_VERSION = {"type": "string", "pattern": "^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$"}
_DEVICE_ID = {"type": "string", "pattern": f"^{DEVICE_ID_RE.pattern}$"}
_NETWORK_ID = {"type": "string", "pattern": f"^{NETWORK_ID_RE.pattern}$"}
_COUNTER = {"type": "integer", "minimum": 0, "maximum": MAX_RELEASE_COUNTER}
_BYTES = {"type": "integer", "minimum": 0, "maximum": MAX_BYTES_COUNT}
_TIME = {"type": "number", "description": "epoch seconds (UTC)"}
_OBJECT = {"type": "object"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("Error"), "refused; the message says why")


def _schemas() -> dict[str, Any]:
    offer = {"type": "object", "required": ["product", "version", "release_counter",
                                             "target"],
             "properties": {"product": _PRODUCT, "version": _VERSION,
                            "release_counter": _COUNTER,
                            "target": {"type": "string"}}}
    stage = {"type": "object", "required": ["offered", "succeeded", "failed",
                                             "rolled_back", "bytes_origin", "bytes_peers"],
             "properties": {"name": {"type": "string"},
                            **{k: {"type": "integer", "minimum": 0} for k in (
                                "offered", "downloading", "succeeded", "failed",
                                "rolled_back", "in_flight", "bytes_origin",
                                "bytes_peers")},
                            "bandwidth_saved": {"type": "number", "minimum": 0,
                                                "maximum": 1}}}
    return {
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": {"type": "string"}}},
        "CheckIn": {
            "type": "object", "additionalProperties": False,
            "required": ["device_id", "product", "hardware_id", "version",
                         "release_counter"],
            "properties": {
                "device_id": _DEVICE_ID, "product": _PRODUCT, "hardware_id": _DEVICE_ID,
                "version": _VERSION, "release_counter": _COUNTER,
                "network_id": _NETWORK_ID, "region": _NETWORK_ID,
                "labels": {"type": "array", "maxItems": MAX_LABELS, "items": _NETWORK_ID},
                "components": {"type": "array", "maxItems": MAX_COMPONENTS, "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["name", "version", "release_counter"],
                    "properties": {"name": _PRODUCT, "version": _VERSION,
                                   "release_counter": _COUNTER}}}}},
        "CheckInAnswer": {
            "type": "object", "required": ["release", "poll_after_s"],
            "properties": {"release": {"oneOf": [{"type": "null"}, offer]},
                           "poll_after_s": {"type": "integer", "minimum": 0}}},
        "Report": {
            "type": "object", "additionalProperties": False,
            "required": ["device_id", "product", "from_version", "to_version", "status",
                         "message", "bytes_origin", "bytes_peers", "timings_s"],
            "properties": {
                "device_id": _DEVICE_ID, "product": _PRODUCT, "from_version": _VERSION,
                "to_version": _VERSION,
                "status": {"type": "integer", "enum": sorted(STATUS_NAMES),
                           "description": ", ".join(f"{k} {v}"
                                                    for k, v in STATUS_NAMES.items())},
                "message": {"type": "string", "maxLength": MAX_MESSAGE_CHARS},
                "bytes_origin": _BYTES, "bytes_peers": _BYTES,
                "timings_s": {"type": "object", "maxProperties": MAX_TIMINGS,
                              "propertyNames": {"pattern": f"^{TIMING_NAME_RE.pattern}$"},
                              "additionalProperties": {"type": "number", "minimum": 0,
                                                       "maximum": 1e9}},
                "report_id": {"type": "string", "pattern": f"^{REPORT_ID_RE.pattern}$"},
                "log_tail": {"type": "string", "maxLength": MAX_LOG_TAIL_BYTES,
                             "description": f"at most {MAX_LOG_TAIL_BYTES} bytes of UTF-8"}}},
        "Ok": {"type": "object", "required": ["ok"], "properties": {"ok": {"const": True}}},
        "Plan": {"oneOf": [{"const": "everyone"}, {
            "type": "object", "additionalProperties": False,
            "properties": {k: {"default": v} for k, v in RolloutPlan().to_json().items()},
            "description": "RolloutPlan fields (tracker/rollout.py); missing ones take "
                           "their defaults"}]},
        "Stage": stage,
        "Rollout": {"type": "object",
                    "required": ["rollout_id", "product", "version", "generation",
                                 "phase", "stage", "halt_reason", "plan", "stages",
                                 "totals", "failures"],
                    "properties": {"rollout_id": {"type": "string"}, "product": _PRODUCT,
                                   "version": _VERSION, "generation": {"type": "integer"},
                                   "phase": {"enum": list(PHASES)},
                                   "stage": {"type": "string"},
                                   "halt_reason": {"type": "string"},
                                   "plan": _OBJECT, "created_at": _TIME,
                                   "stage_started_at": _TIME,
                                   "stages": {"type": "array", "items": _ref("Stage")},
                                   "totals": _ref("Stage"),
                                   "failures": {"type": "array", "items": _OBJECT},
                                   "actions": {"type": "array",
                                               "items": {"enum": list(ACTIONS)},
                                               "description": "the operator actions its "
                                                              "phase allows"}}},
        "Release": {"type": "object",
                    "required": ["product", "version", "release_counter", "payloads",
                                 "phase"],
                    "properties": {"product": _PRODUCT, "version": _VERSION,
                                   "release_counter": _COUNTER,
                                   "update_type": {"type": "string"},
                                   "component": {"type": ["string", "null"]},
                                   "payloads": {"type": "array", "items": _OBJECT},
                                   "phase": {"enum": ["none", *PHASES]}}},
        "Device": {"type": "object",
                   "required": ["device_id", "product", "version", "last_seen", "labels",
                                "tags"],
                   "properties": {"device_id": _DEVICE_ID, "product": _PRODUCT,
                                  "version": _VERSION, "last_seen": _TIME,
                                  "labels": {"type": "array"}, "tags": {"type": "array"},
                                  "rollout": {"type": ["object", "null"]}}},
    }


def _answer_of(route: Route) -> dict[str, Any]:
    """The success answer's schema of an admin route."""
    path = "/".join(route.path)
    if path == "releases" and route.method == "GET":
        return {"type": "object", "required": ["releases"], "properties": {
            "releases": {"type": "array", "items": _ref("Release")}}}
    if path in ("releases", "releases/{product}/{version}"):
        return _ref("Release")
    if path == "rollouts" and route.method == "GET":
        return {"type": "object", "required": ["rollouts"], "properties": {
            "rollouts": {"type": "array", "items": _ref("Rollout")}}}
    if path.startswith("rollouts") and not path.endswith("devices"):
        return _ref("Rollout")
    if path == "devices":
        return {"type": "object", "required": ["devices", "next"], "properties": {
            "devices": {"type": "array", "items": _ref("Device")}}}
    if path == "devices/{device_id}":
        return {"allOf": [_ref("Device"), {"type": "object",
                                           "required": ["rollouts", "reports"]}]}
    return _OBJECT


def _parameter(name: str, where: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if name in ("product",):
        schema = _PRODUCT
    elif name == "version":
        schema = _VERSION
    elif name in ("limit", "stale_s", "seen_within_s", "before", "since"):
        schema = {"type": "integer", "minimum": 0}
    elif name == "status" and where == "query":
        schema = {"type": "string"}
    if where == "path":
        schema = {**schema, "minLength": 1}
    return {"name": name, "in": where, "required": where == "path", "schema": schema}


def _admin_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in ROUTES:
        url = "/v1/admin/" + "/".join(route.path)
        parameters = [_parameter(p[1:-1], "path") for p in route.path if p.startswith("{")]
        parameters += [_parameter(q, "query") for q in route.query]
        created = route.method == "POST" and route.path in (("releases",), ("rollouts",))
        responses = {
            "201" if created else "200": _json(_answer_of(route), route.summary or "done"),
            "400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR, "405": _ERROR,
            "409": _ERROR, "500": _ERROR}
        if route.path == ("releases",) and route.method == "POST":
            responses["502"] = _ERROR
        operation: dict[str, Any] = {
            "summary": route.summary, "description": f"Role: {route.role}.",
            "operationId": f"{route.method.lower()}_" + "_".join(
                p.strip("{}") for p in route.path),
            "security": [{"bearer": []}], "parameters": parameters,
            "responses": responses}
        if route.method == "POST":
            operation["requestBody"] = {"required": False, "content": {
                "application/json": {"schema": _OBJECT}}}
            responses["413"] = _ERROR
        paths.setdefault(url, {})[route.method.lower()] = operation
    return paths


def _device_paths() -> dict[str, Any]:
    device = {"description": "Devices sign with swarmota-device-cert and "
                             "swarmota-signature when the tracker has a fleet CA.",
              "security": [{}, {"deviceSignature": []}]}
    errors = {"400": _ERROR, "401": _ERROR, "405": _ERROR, "413": _ERROR, "500": _ERROR}
    bencoded = {"description": "bencoded (BEP 3), a failure reason when refused",
                "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {
        "/v1/checkin": {"post": {
            **device, "operationId": "checkin", "summary": "What should this device run?",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("CheckIn")}}},
            "responses": {"200": _json(_ref("CheckInAnswer"), "the offer"), **errors}}},
        "/v1/report": {"post": {
            **device, "operationId": "report", "summary": "The outcome of an attempt.",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("Report")}}},
            "responses": {"200": _json(_ref("Ok"), "stored"), **errors}}},
        "/v1/health": {"get": {"operationId": "health", "summary": "Liveness.",
                               "responses": {"200": _json(_ref("Ok"), "alive")}}},
        "/v1/openapi.json": {"get": {"operationId": "openapi",
                                     "summary": "This document.",
                                     "responses": {"200": _json(_OBJECT, "OpenAPI 3.1")}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus counters.",
                             "responses": {"200": {"description": "text exposition 0.0.4",
                                                   "content": {"text/plain": {}}}}}},
        "/announce": {"get": {
            **device, "operationId": "announce",
            "summary": "BitTorrent announce (BEP 3, 23) for registered releases' swarms.",
            "parameters": [{"name": n, "in": "query", "required": False,
                            "schema": {"type": "string"}}
                           for n in ("info_hash", "peer_id", "port", "uploaded",
                                     "downloaded", "left", "event", "compact",
                                     "numwant", "device_id")],
            "responses": {"200": bencoded, "500": bencoded}}},
        "/scrape": {"get": {
            **device, "operationId": "scrape", "summary": "BitTorrent scrape (BEP 48).",
            "parameters": [{"name": "info_hash", "in": "query", "required": False,
                            "schema": {"type": "string"}}],
            "responses": {"200": bencoded, "500": bencoded}}},
    }


def openapi_document() -> dict[str, Any]:
    """The whole document (a new dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "swarmota tracker", "version": "1",
                 "description": "Device check-ins and reports, the BitTorrent tracker of "
                                "the releases' swarms, and the admin API (bearer tokens: "
                                "viewer < operator < admin). Device states in a rollout: "
                                + ", ".join(DEVICE_STATUSES) + "."},
        "paths": {**_device_paths(), **_admin_paths()},
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "deviceSignature": {"type": "apiKey", "in": "header",
                                    "name": "swarmota-signature"}}},
    }


def main() -> int:
    """Print the document (``python -m swarmota.tracker.openapi > docs/openapi.json``)."""
    sys.stdout.write(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
