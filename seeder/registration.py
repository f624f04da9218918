"""Registering releases with the tracker as they go live (``--register TRACKER_URL``).

``seeder publish --register URL`` registers the release through the tracker's admin API
(``POST /v1/admin/releases`` with the manifest, and a rollout plan from the same plan
options as ``tracker release add``) as its last step, once the release is live. With
offline targets keys a publish only stages the release: nothing is registered then (the
tracker would refuse a release the signed metadata does not list yet), and the
operator passes ``--register URL`` to the ``seeder sign`` or ``seeder import`` that
meets the threshold; that one registers every release the signing request made live.
The connection settings are the tracker client's (:mod:`tracker.client_cli`):
``--tracker-token``, ``--tracker-ca-file``, ``--client-config``, and the environment
variables and client config file behind them.

Settings and plan are checked before anything is published or signed (:func:`prepare`),
so that a typo cannot leave a release live and unregistered; a tracker that refuses or
cannot be reached afterwards leaves the release live, and the message says how to
register it by hand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from swarmota.seeder.errors import SeederError
from swarmota.tracker.client_cli import (
    add_client_options,
    add_plan_options,
    connect,
    plan_from_args,
    register_releases,
    settings_from_args,
)
from swarmota.tracker.client_settings import ClientSettings
from swarmota.tracker.errors import AdminApiError, ConfigError, RequestError
from swarmota.tracker.render import escape, render_registration
from swarmota.tracker.rollout import RolloutPlan

__all__ = ["EXIT_NOT_REGISTERED", "Registration", "add_register_options", "prepare",
           "release_files"]

EXIT_NOT_REGISTERED = 1
"""Exit code when the release went live but the tracker did not register it."""


def add_register_options(parser: argparse.ArgumentParser) -> None:
    """``--register TRACKER_URL``, the connection options and the rollout plan
    options."""
    parser.add_argument("--register", metavar="TRACKER_URL", default=None,
                        help="once the release is live, register it with the tracker "
                             "through its admin API (operator token: --tracker-token, "
                             "$SWARMOTA_TRACKER_TOKEN or the client config file) and "
                             "start its rollout (the plan options below)")
    add_client_options(parser, prefix="tracker-", url=False)
    add_plan_options(parser, registering=True)


@dataclass(frozen=True)
class Registration:
    """A registration checked and ready to send: where, with what token, which plan."""

    settings: ClientSettings
    plan: RolloutPlan | None

    @property
    def url(self) -> str:
        return self.settings.url

    def send(self, manifests: Mapping[str, bytes], where: str) -> int:
        """Register ``manifests`` (target name -> manifest bytes) and print what the
        tracker answered; 0, or :data:`EXIT_NOT_REGISTERED` with a message that says
        how to register them by hand (``where``: the manifest files)."""
        if not manifests:
            return 0
        try:
            with connect(self.settings) as client:
                answers = register_releases(client, list(manifests.values()), self.plan)
        except (AdminApiError, ConfigError) as exc:
            print(f"error: {', '.join(manifests)} is live, but {self.url} did not "
                  f"register it: {escape(str(exc))}", file=sys.stderr)
            print(f"register it when the tracker can: 'swarmota tracker release add "
                  f"--url {self.url} MANIFEST' with the manifest in {where}",
                  file=sys.stderr)
            return EXIT_NOT_REGISTERED
        for answer in answers:
            print("\n".join(render_registration(answer)))
        return 0

    def not_live(self, what: str) -> int:
        """Say that nothing was registered because ``what`` (0: not an error)."""
        print(f"not registered with {self.url}: {what}; the 'seeder sign' or 'seeder "
              f"import' that meets the threshold registers it, given --register {self.url}")
        return 0


def prepare(args: argparse.Namespace) -> Registration | None:
    """The registration the options ask for (``None``: no ``--register``), checked
    before anything is published or signed.

    Raises:
        SeederError: unusable connection settings, no token, a bad plan or plan file.
    """
    if args.register is None:
        return None
    try:
        plan = plan_from_args(args)
        settings = settings_from_args(args, url=args.register)
        connect(settings).close()  # a token, a usable CA file
    except (ConfigError, RequestError) as exc:
        raise SeederError(f"--register: {exc}") from None
    return Registration(settings, plan)


def release_files(target_files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The release manifests among a signing request's target files."""
    return {name: data for name, data in sorted(target_files.items())
            if name.startswith("releases/")}

