"""Registers where the later edit wins, on top of pycrdt maps.

pycrdt keeps one value per map key and, for concurrent writes, keeps the one of the higher client
id: an older correction made offline could silently beat a newer one. So every writer (device)
writes its own slot ``entity/field/device`` holding ``[stamp, value]``, slots never conflict, and
the reader picks the slot with the highest (stamp, device). Slots are bounded by the number of
devices that ever wrote a field, and a writer clears the slots it can see when an entity goes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pycrdt import Map

__all__ = ["LwwSlots", "LwwValue", "newest_stamp", "resolve_items"]

_SEP = "\x1f"


@dataclass(frozen=True, slots=True)
class LwwValue:
    stamp: str
    device: str
    value: Any


def _key(entity: str, field: str, device: str) -> str:
    return f"{entity}{_SEP}{field}{_SEP}{device}"


class LwwSlots:
    """Per-writer slots in one pycrdt map; see the module docstring."""

    def __init__(self, slots: Map[Any]) -> None:
        self._map = slots

    def write(self, entity: str, field: str, device: str, stamp: str, value: Any) -> None:
        self._map[_key(entity, field, device)] = [stamp, value]

    def clear(self, entity: str) -> None:
        """Remove every visible slot of ``entity`` (must run inside a transaction)."""
        prefix = entity + _SEP
        for key in [k for k in self._map.keys() if k.startswith(prefix)]:  # noqa: SIM118
            del self._map[key]

    def resolve(self) -> dict[str, dict[str, LwwValue]]:
        """entity -> field -> winning value, over every slot in the map."""
        return resolve_items(self._map.items())


def newest_stamp(winners: dict[str, dict[str, LwwValue]]) -> str:
    """The highest stamp among resolved slots ('' if none)."""
    return max((v.stamp for fields in winners.values() for v in fields.values()), default="")


def resolve_items(items: Iterable[tuple[str, Any]]) -> dict[str, dict[str, LwwValue]]:
    winners: dict[str, dict[str, LwwValue]] = {}
    for key, raw in items:
        parts = key.split(_SEP)
        if len(parts) != 3 or not isinstance(raw, list) or len(raw) != 2:
            continue  # not a slot of ours: ignored rather than trusted
        entity, field, device = parts
        stamp, value = raw
        if not isinstance(stamp, str):
            continue
        fields = winners.setdefault(entity, {})
        current = fields.get(field)
        if current is None or (stamp, device) > (current.stamp, current.device):
            fields[field] = LwwValue(stamp, device, value)
    return winners
