"""Fault injection for the trainer's tests, from the environment only (never from a user's config):
``VNT_TEST_FAULTS="crash_in_save=4,rank=1"`` or ``"nan_step=6"``.

- ``crash_step``: the step at which ``rank`` raises;
- ``crash_in_save``: the step whose checkpoint save ``rank`` dies in (``os._exit``);
- ``nan_step``: the step whose loss becomes NaN (every rank);
- ``rank``: the rank that crashes (default 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

ENV = "VNT_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    crash_step: int = -1
    crash_in_save: int = -1
    nan_step: int = -1
    rank: int = 1

    @classmethod
    def from_environment(cls) -> "Faults":
        names = {f.name for f in fields(cls)}
        changes = {}
        for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
            key, _, value = item.partition("=")
            if key not in names:
                raise ValueError(f"{ENV}: unknown fault {key!r} (faults: {', '.join(sorted(names))})")
            changes[key] = int(value)
        return cls(**changes)
