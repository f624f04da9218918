"""Release counters: how far a release may jump, and the root-signed counter reset.

The anti-rollback rule (a release installs only if its counter is above the device's
floor) has a failure mode of its own: whoever holds the targets keys (or a typo) can sign
a release with counter 2^53, after which every later release is a "rollback" on every
device that installed it. Two defences, both decided here (pure, no I/O):

- **A bounded jump.** A device refuses a release whose counter is more than
  ``max_counter_jump`` above its floor (:func:`manifest.release.check_applicable`; the
  device configuration's
  ``max_release_counter_jump``, default :data:`DEFAULT_MAX_COUNTER_JUMP`). One installed
  release can then raise the floor by at most that much.
- **A root-signed reset.** Root metadata may carry, per product, a counter reset
  ``{"epoch": E, "floor": F}`` in its custom field :data:`COUNTER_RESETS_FIELD`. A
  device that has not applied epoch ``E`` yet lowers its floor to ``F`` if it is above
  (:func:`apply_counter_reset`) and remembers ``E``; epochs only grow, so the same reset
  never applies twice and an old root cannot undo a newer one. Only a threshold of root
  keys can sign it: the targets keys, whose compromise this recovers from, cannot.

The seeder writes the field (``swarmota seeder counter-reset``), the device reads it from
its trusted root; both use this module, so the format is written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from swarmota.manifest.errors import ManifestFormatError
from swarmota.manifest.release import MAX_RELEASE_COUNTER, validate_product

__all__ = [
    "COUNTER_RESETS_FIELD",
    "DEFAULT_MAX_COUNTER_JUMP",
    "MAX_COUNTER_EPOCH",
    "CounterReset",
    "apply_counter_reset",
    "encode_counter_resets",
    "parse_counter_resets",
]

COUNTER_RESETS_FIELD = "x-swarmota-counter-resets"
"""The custom field of root metadata (``signed``) holding the counter resets."""

DEFAULT_MAX_COUNTER_JUMP = 1_000_000
"""How far above its floor a device accepts a release counter by default: ample for
sequence numbers (a device may skip a million releases), and 2^53 / 10^6 = 9 * 10^9
installed releases before a floor could be pushed to the end of the range."""

MAX_COUNTER_EPOCH = 2**31
_MAX_PRODUCTS = 256


@dataclass(frozen=True)
class CounterReset:
    """A root-signed reset of one product's anti-rollback floor: devices that have
    not applied ``epoch`` yet lower their floor to ``floor`` if it is above."""

    epoch: int
    floor: int

    def __post_init__(self) -> None:
        if not isinstance(self.epoch, int) or not 1 <= self.epoch <= MAX_COUNTER_EPOCH:
            raise ManifestFormatError(f"counter reset epoch {self.epoch!r} outside "
                                      f"1..{MAX_COUNTER_EPOCH}")
        if not isinstance(self.floor, int) or not 0 <= self.floor <= MAX_RELEASE_COUNTER:
            raise ManifestFormatError(f"counter reset floor {self.floor!r} outside "
                                      f"0..{MAX_RELEASE_COUNTER}")


def parse_counter_resets(value: Any) -> dict[str, CounterReset]:
    """The resets of a root's :data:`COUNTER_RESETS_FIELD` (``None``: no field).

    Raises:
        ManifestFormatError: not an object of product -> ``{"epoch", "floor"}`` with
            valid products and integers in range, or too many products.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestFormatError(f"{COUNTER_RESETS_FIELD}: expected an object")
    if len(value) > _MAX_PRODUCTS:
        raise ManifestFormatError(f"{COUNTER_RESETS_FIELD}: more than {_MAX_PRODUCTS} "
                                  "products")
    out: dict[str, CounterReset] = {}
    for product, raw in value.items():
        validate_product(product)
        if not isinstance(raw, dict) or set(raw) != {"epoch", "floor"}:
            raise ManifestFormatError(f"{COUNTER_RESETS_FIELD}.{product}: expected "
                                      '{"epoch": N, "floor": N}')
        for name in ("epoch", "floor"):
            if not isinstance(raw[name], int) or isinstance(raw[name], bool):
                raise ManifestFormatError(f"{COUNTER_RESETS_FIELD}.{product}.{name}: "
                                          "expected an integer")
        out[product] = CounterReset(epoch=raw["epoch"], floor=raw["floor"])
    return out


def encode_counter_resets(resets: Mapping[str, CounterReset]) -> dict[str, Any]:
    """The JSON value of :data:`COUNTER_RESETS_FIELD` for ``resets``."""
    return {product: {"epoch": r.epoch, "floor": r.floor}
            for product, r in sorted(resets.items())}


def apply_counter_reset(floor: int, applied_epoch: int,
                        reset: CounterReset | None) -> tuple[int, int] | None:
    """``(new floor, new applied epoch)`` if ``reset`` is newer than ``applied_epoch``,
    else ``None`` (nothing to do). The floor only goes down: ``min(floor, reset.floor)``.
    """
    if reset is None or reset.epoch <= applied_epoch:
        return None
    return min(floor, reset.floor), reset.epoch
