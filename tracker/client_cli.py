"""The command-line side of an admin API client, shared by ``swarmota tracker ...`` and
the seeder's ``--register``: connection options, rollout plan options, registration.

- :func:`add_client_options` / :func:`open_client`: ``--url``, ``--ca-file``,
  ``--token``, ``--client-config`` (environment variables and the client config file
  behind them: :mod:`tracker.client_settings`); the seeder spells them
  ``--tracker-ca-file`` and ``--tracker-token`` beside its own options.
- :func:`add_plan_options` / :func:`plan_from_args`: a rollout plan from
  ``--plan-file`` (:mod:`tracker.plan_file`) with every :class:`RolloutPlan` threshold
  as a flag laid over it (``--canary``, ``--stages``, ``--soak-s``, ``--min-successes``,
  ``--min-success-rate``, ``--canary-max-failures``, ``--halt-failure-rate``,
  ``--halt-min-sample``, ``--halt-failure-count``, ``--max-in-flight``,
  ``--in-flight-timeout-s``, ``--start-at``, ``--advance-window``,
  ``--retry-rolled-back``), or ``--everyone``; with ``--no-rollout`` where registering.
- :func:`register_releases`: ``POST /v1/admin/releases`` for manifests or their URLs
  (``tracker release add``, ``seeder publish --register``, ``seeder sign --register``).

Errors: :class:`~tracker.errors.ConfigError` (unusable settings: exit 2),
:class:`~tracker.errors.RequestError` (a bad plan or plan file: exit 2),
:class:`~tracker.errors.AdminApiError` (the tracker refused or cannot be reached: exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from swarmota.infra.ids import DEVICE_ID_RE
from swarmota.infra.timewindows import parse_window
from swarmota.tracker.admin_client import AdminClient
from swarmota.tracker.client_settings import (
    DEFAULT_URL,
    ENV_CA_FILE,
    ENV_CONFIG,
    ENV_TOKEN,
    ENV_URL,
    ClientSettings,
    load_settings,
)
from swarmota.tracker.errors import AdminApiError, ConfigError, RequestError
from swarmota.tracker.plan_file import (
    MAX_PLAN_FILE_BYTES,
    PLAN_KEYS,
    build_plan,
    parse_plan_file,
    parse_time,
)
from swarmota.tracker.rollout import RolloutPlan

__all__ = [
    "PLAN_FLAGS",
    "add_client_options",
    "add_plan_options",
    "connect",
    "device_arg",
    "open_client",
    "plan_from_args",
    "register_releases",
    "settings_from_args",
    "time_arg",
]

PLAN_FLAGS: Final = {
    "canary_devices": "--canary", "canary_label": "--canary-label",
    "stages_percent": "--stages", "soak_s": "--soak-s", "min_successes": "--min-successes",
    "min_success_rate": "--min-success-rate",
    "canary_halt_failure_count": "--canary-max-failures",
    "halt_failure_rate": "--halt-failure-rate", "halt_min_sample": "--halt-min-sample",
    "halt_failure_count": "--halt-failure-count", "max_in_flight": "--max-in-flight",
    "in_flight_timeout_s": "--in-flight-timeout-s", "start_at": "--start-at",
    "advance_windows": "--advance-window", "retry_rolled_back": "--retry-rolled-back"}
"""The flag of each :class:`RolloutPlan` field."""
_STAGED_ONLY: Final = ("canary_devices", "canary_label", "stages_percent", "soak_s",
                       "min_successes", "min_success_rate")
"""Plan fields that make no sense with ``--everyone`` (one stage, at once)."""


# --- connection ------------------------------------------------------------------------


def add_client_options(parser: argparse.ArgumentParser, *, prefix: str = "",
                       url: bool = True) -> None:
    """Add the connection options (``--{prefix}url``, ``--{prefix}ca-file``,
    ``--{prefix}token``, ``--client-config``); ``url=False`` leaves the URL to the
    caller (the seeder's ``--register URL``)."""
    group = parser.add_argument_group(
        "connection to the tracker (a flag wins over the environment, which wins over "
        "the client config file)")
    if url:
        group.add_argument(f"--{prefix}url", dest="client_url", metavar="URL", default=None,
                           help=f"tracker base URL (${ENV_URL}; default {DEFAULT_URL})")
    group.add_argument(f"--{prefix}ca-file", dest="client_ca_file", metavar="PEM",
                       default=None,
                       help=f"CA certificate(s) an https tracker's certificate must chain "
                            f"to (${ENV_CA_FILE}; default: the system's)")
    group.add_argument(f"--{prefix}token", dest="client_token", metavar="TOKEN",
                       default=None,
                       help=f"admin API bearer token (${ENV_TOKEN}; better than a flag, "
                            "which other users may see in the process list)")
    group.add_argument("--client-config", dest="client_config", metavar="FILE",
                       type=Path, default=None,
                       help=f"client config file (${ENV_CONFIG}; default "
                            "$XDG_CONFIG_HOME/swarmota/client.toml or "
                            "~/.config/swarmota/client.toml): a [tracker] table with url, "
                            "ca_file, token")


def settings_from_args(args: argparse.Namespace, *, url: str | None = None,
                       environ: Mapping[str, str] | None = None,
                       warn: TextIO | None = None) -> ClientSettings:
    """The client settings the options, the environment and the config file give
    (``url`` overrides ``--url``); warnings are printed to ``warn`` (stderr).

    Raises:
        ConfigError: unusable settings, naming the file and key, flag or variable.
    """
    flags = {"url": url if url is not None else getattr(args, "client_url", None),
             "ca_file": args.client_ca_file, "token": args.client_token}
    settings = load_settings(flags, os.environ if environ is None else environ,
                             args.client_config)
    for warning in settings.warnings:
        print(f"warning: {warning}", file=warn or sys.stderr)
    return settings


def open_client(args: argparse.Namespace, *, url: str | None = None) -> AdminClient:
    """An admin API client with the settings of :func:`settings_from_args`.

    Raises:
        ConfigError: unusable settings, no token at all, or an unusable CA file.
    """
    return connect(settings_from_args(args, url=url))


def connect(settings: ClientSettings) -> AdminClient:
    """An admin API client with ``settings`` (nothing is sent yet).

    Raises:
        ConfigError: no token at all, or an unusable CA file.
    """
    if settings.token is None:
        raise ConfigError(f"no admin token: pass --token, set ${ENV_TOKEN}, or put token "
                          "in the [tracker] table of the client config file (an admin "
                          "creates one: 'swarmota tracker admin token create')")
    try:
        return AdminClient(settings.url, settings.token,
                           ca_file=None if settings.ca_file is None else str(settings.ca_file))
    except AdminApiError as exc:
        raise ConfigError(f"{settings.sources['ca_file']}: {exc}") from None


# --- rollout plans ---------------------------------------------------------------------


def add_plan_options(parser: argparse.ArgumentParser, *, registering: bool) -> None:
    """Add the rollout plan options (``registering``: also ``--no-rollout``)."""
    d = RolloutPlan()
    group = parser.add_argument_group(
        "rollout plan (default: staged; flags override --plan-file; see "
        "docs/OPERATIONS-CLI.md)")
    group.add_argument("--plan-file", metavar="TOML", type=Path, default=None,
                       help="a TOML file of RolloutPlan fields (canary_devices, "
                            "stages_percent, soak_s, halt_failure_rate, start_at, ...)")
    shape = group.add_mutually_exclusive_group()
    shape.add_argument("--everyone", action="store_true",
                       help="every device at once (one stage of 100%%, no soak); the halt "
                            "rules still apply")
    if registering:
        shape.add_argument("--no-rollout", action="store_true",
                           help="register only: offered to nobody until 'tracker rollout "
                                "create'")
    flag = _plan_flag(group)
    flag("canary_devices", "DEVICE_ID", device_arg, append=True,
         help="a canary device: stage 0 (repeat for several)")
    flag("canary_label", "LABEL", str,
         help="devices declaring this label (or carrying this tag) are canaries too")
    flag("stages_percent", "P1,P2,...", _stages_arg,
         help="stage percentages of the fleet, increasing, ending at 100 (default "
              f"{','.join(f'{p:g}' for p in d.stages_percent)})")
    flag("soak_s", "S", _seconds_arg,
         help=f"seconds each stage runs at least before it advances (default {d.soak_s:g})")
    flag("min_successes", "N", _count_arg,
         help=f"successes a stage needs before it advances (default {d.min_successes})")
    flag("min_success_rate", "RATE", _rate_arg,
         help="share of a stage's reports that must be successes to advance, 0.95 or "
              f"95%% (default {d.min_success_rate:g})")
    flag("canary_halt_failure_count", "N", _count_arg,
         help="canary failures that halt the rollout (default "
              f"{d.canary_halt_failure_count}: any)")
    flag("halt_failure_rate", "RATE", _rate_arg,
         help="a stage halts above this failure rate, 0.05 or 5%% (default "
              f"{d.halt_failure_rate:g})")
    flag("halt_min_sample", "N", _count_arg,
         help=f"reports a stage needs before its failure rate counts (default "
              f"{d.halt_min_sample})")
    flag("halt_failure_count", "N", _count_arg,
         help=f"failures over every stage that halt the rollout (default "
              f"{d.halt_failure_count})")
    flag("max_in_flight", "N", _count_arg,
         help="devices at most offered or downloading at once (default 0: no cap)")
    flag("in_flight_timeout_s", "S", _seconds_arg,
         help="a device silent this long no longer counts as in flight (default "
              f"{d.in_flight_timeout_s:g})")
    flag("start_at", "TIME", time_arg,
         help="start later: ISO 8601, local time (2025-06-02T09:00) or with a zone "
              "(2025-06-02T07:00Z); scheduled until then")
    flag("advance_windows", "WINDOW", _window_arg, append=True,
         help="stages advance only inside this window, UTC, e.g. 'mon,tue,wed,thu "
              "07:00-15:00' (repeat for several)")
    group.add_argument(PLAN_FLAGS["retry_rolled_back"], dest="plan_retry_rolled_back",
                       action="store_const", const=True, default=None,
                       help="offer the release again to a device that rolled it back (labs)")


def _plan_flag(group: Any) -> Any:
    def flag(key: str, metavar: str, kind: Any, *, help: str, append: bool = False) -> None:
        group.add_argument(PLAN_FLAGS[key], dest=f"plan_{key}", metavar=metavar, type=kind,
                           action="append" if append else "store", default=None, help=help)
    return flag


def plan_from_args(args: argparse.Namespace) -> RolloutPlan | None:
    """The plan the options describe; ``None`` with ``--no-rollout``.

    Raises:
        RequestError: an unreadable or bad plan file, or a bad combination (the message
            names the file and key, or the flags).
    """
    flags = {key: getattr(args, f"plan_{key}") for key in PLAN_KEYS
             if getattr(args, f"plan_{key}", None) is not None}
    if "stages_percent" in flags:
        flags["stages_percent"] = list(flags["stages_percent"])
    if getattr(args, "no_rollout", False):
        if flags or args.plan_file is not None:
            raise RequestError("--no-rollout starts no rollout: it takes no plan options")
        return None
    base: dict[str, Any] = {}
    if args.everyone:
        clash = [PLAN_FLAGS[k] for k in flags if k in _STAGED_ONLY]
        if args.plan_file is not None or clash:
            raise RequestError("--everyone offers the release to every device at once: it "
                               "takes no --plan-file and no staging options "
                               f"({', '.join(clash) or '--plan-file'})")
        base = RolloutPlan.everyone().to_json()
    elif args.plan_file is not None:
        base = parse_plan_file(_read_plan_file(args.plan_file), str(args.plan_file))
    return build_plan(base, flags, source=str(args.plan_file or "rollout plan flags"))


def _read_plan_file(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_PLAN_FILE_BYTES + 1)
    except OSError as exc:
        raise RequestError(f"cannot read plan file {path}: {exc.strerror or exc}") from None


# --- registration ----------------------------------------------------------------------


def register_releases(client: AdminClient, manifests: Sequence[bytes | str],
                      plan: RolloutPlan | None) -> list[Any]:
    """``POST releases`` for each manifest (its bytes, or its URL under the origin's
    ``targets/``), with ``plan`` as its rollout (``None``: none); the answers.

    Raises:
        AdminApiError: the tracker refused (a 400 says why the release is not the
            signed one) or cannot be reached; earlier manifests stay registered.
    """
    answers = []
    for manifest in manifests:
        body: dict[str, Any] = ({"url": manifest} if isinstance(manifest, str)
                                else {"manifest": manifest.decode("utf-8", "replace")})
        if plan is not None:
            body["rollout"] = plan.to_json()
        try:
            answers.append(client.post("releases", body))
        except AdminApiError as exc:
            if exc.status != 400:
                raise
            raise AdminApiError(f"the tracker refused the release: {exc} (it registers "
                                "only a release the repository signed, byte for byte: "
                                "published, and signed to the threshold if its targets "
                                "keys are offline)", exc.status) from None
    return answers


# --- argument types --------------------------------------------------------------------


def device_arg(text: str) -> str:
    """A device id (argparse type)."""
    if not DEVICE_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid device id {text!r}")
    return text


def time_arg(text: str) -> float:
    """ISO 8601 (local time unless it names a zone) -> epoch seconds (argparse type)."""
    try:
        return parse_time(text, "time")
    except RequestError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("time: ")) from None


def _stages_arg(text: str) -> tuple[float, ...]:
    try:
        stages = tuple(float(p.strip().removesuffix("%")) for p in text.split(","))
        RolloutPlan(stages_percent=stages)
    except (ValueError, RequestError) as exc:
        raise argparse.ArgumentTypeError(f"bad stages {text!r}: "
                                         f"{str(exc).removeprefix('plan: ')}") from None
    return stages


def _rate_arg(text: str) -> float:
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (0.05 or 5%)") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not within 0..1 (0%..100%)")
    return value


def _count_arg(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 10**9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number within 0..10^9")
    return int(text)


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 365 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not within 0..31536000 seconds")
    return value


def _window_arg(text: str) -> str:
    try:
        parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
