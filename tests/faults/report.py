"""The fault suite's ledger: per group, how many faults were injected and what the zero-counters saw.

Every test in ``tests/faults`` takes the ``faults`` fixture, records each fault it injects and
reports each promise it checks as an observed count that must be zero (a corrupt response served,
a partial commit, a lost acknowledged write, a leaked secret, an SSRF connection, an unauthorized
success, a 404 where a failure was due). The session prints one line per group, and writes the
table as JSON where ``FAULT_REPORT_JSON`` says, so the README's table comes from a real run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# The zero-counters, in report order: (key, column heading).
COUNTERS: tuple[tuple[str, str], ...] = (
    ("corrupt_served", "corrupt served"),
    ("partial_commits", "partial commits"),
    ("writes_lost", "acked writes lost"),
    ("secrets_leaked", "secrets leaked"),
    ("ssrf_connected", "SSRF connected"),
    ("unauthorized_ok", "unauthorized ok"),
    ("wrong_404", "wrong 404s"),
)
COUNTER_KEYS = frozenset(key for key, _ in COUNTERS)

GROUPS: tuple[str, ...] = (
    "1 integrity",
    "2 availability",
    "3 crash consistency",
    "4 resource exhaustion",
    "5 authn/authz",
    "6 injection/traversal",
    "7 SSRF",
    "8 secrets",
    "9 content types/escaping",
)


@dataclass
class GroupLedger:
    """What one group's tests injected and observed."""

    name: str
    injected: Counter[str] = field(default_factory=Counter)
    observed: Counter[str] = field(default_factory=Counter)
    tests: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)

    def inject(self, kind: str, count: int = 1) -> None:
        """Record ``count`` faults of ``kind`` injected (an attack sent, a kill, a full disk)."""
        self.injected[kind] += count

    def zero(self, counter: str, observed: int, detail: str = "") -> None:
        """Record what a zero-counter saw and fail the test unless it saw nothing."""
        if counter not in COUNTER_KEYS:
            raise ValueError(f"unknown counter {counter!r}; one of {sorted(COUNTER_KEYS)}")
        self.observed[counter] += observed
        assert observed == 0, f"{counter}: {observed} {detail}".rstrip()


@dataclass
class FaultReport:
    """All groups of one session."""

    groups: dict[str, GroupLedger] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # test node id -> group

    def ledger(self, group: str, nodeid: str) -> GroupLedger:
        if group not in GROUPS:
            raise ValueError(f"unknown fault group {group!r}; one of {GROUPS}")
        ledger = self.groups.setdefault(group, GroupLedger(group))
        ledger.tests.add(nodeid)
        self.owner[nodeid] = group
        return ledger

    def failed(self, nodeid: str) -> None:
        group = self.owner.get(nodeid)
        if group is not None:
            self.groups[group].failed.add(nodeid)

    def rows(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for name in GROUPS:
            ledger = self.groups.get(name)
            if ledger is None:
                continue
            row: dict[str, object] = {
                "group": name,
                "tests": len(ledger.tests),
                "failed": len(ledger.failed),
                "faults": sum(ledger.injected.values()),
            }
            row.update({key: ledger.observed[key] for key, _ in COUNTERS})
            out.append(row)
        return out

    def table(self) -> list[str]:
        heads = ["group", "tests", "failed", "faults injected", *(title for _, title in COUNTERS)]
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for row in self.rows():
            cells = [row["group"], row["tests"], row["failed"], row["faults"], *(row[k] for k, _ in COUNTERS)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        return lines

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The ledgers as plain data: what an xdist worker hands the controller."""
        return {
            name: {
                "injected": dict(ledger.injected),
                "observed": dict(ledger.observed),
                "tests": sorted(ledger.tests),
                "failed": sorted(ledger.failed),
            }
            for name, ledger in self.groups.items()
        }

    def merge(self, data: dict[str, dict[str, Any]]) -> None:
        """Add another process' ledgers (pytest-xdist runs tests in several workers)."""
        for name, part in data.items():
            ledger = self.groups.setdefault(name, GroupLedger(name))
            ledger.injected.update(part["injected"])
            ledger.observed.update(part["observed"])
            ledger.tests.update(part["tests"])
            ledger.failed.update(part["failed"])

    def write_json(self) -> None:
        target = os.environ.get("FAULT_REPORT_JSON")
        if target:
            details = {
                name: {"injected": dict(ledger.injected), "observed": dict(ledger.observed)}
                for name, ledger in self.groups.items()
            }
            Path(target).write_text(json.dumps({"rows": self.rows(), "details": details}, indent=2))


REPORT_KEY = pytest.StashKey[FaultReport]()
