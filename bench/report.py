"""The benchmark's result table: one row per figure, proxy beside nginx, against its target."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    """A pass condition on one figure: ``what`` is "ratio" or "proxy", ``op`` ">=" or "<"."""

    what: str
    op: str
    limit: float

    def check(self, proxy: float | None, ratio: float | None) -> bool | None:
        value = ratio if self.what == "ratio" else proxy
        if value is None:
            return None
        compare: Callable[[float, float], bool] = {">=": operator.ge, "<": operator.lt}[self.op]
        return compare(value, self.limit)

    def __str__(self) -> str:
        limit = f"{self.limit:g}"
        return f"ratio {self.op} {limit}" if self.what == "ratio" else f"{self.op} {limit}"


@dataclass
class Row:
    """One line of the table; ``ratio`` is proxy / nginx, whatever the unit."""

    section: str
    metric: str
    unit: str
    proxy: float | None
    nginx: float | None
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        if self.proxy is None or not self.nginx:
            return None
        return self.proxy / self.nginx

    @property
    def passed(self) -> bool | None:
        return self.target.check(self.proxy, self.ratio) if self.target else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = str(self.target) if self.target else None
        data["ratio"] = self.ratio
        data["passed"] = self.passed
        return data


@dataclass
class Report:
    """Rows, free-form details (raw figures per measurement) and warnings met on the way."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        verdict = {True: "pass", False: "FAIL", None: ""}[row.passed]
        print(f"    {row.metric}: proxy {_fmt(row.proxy)} {row.unit}, nginx {_fmt(row.nginx)} {verdict}")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"  WARNING: {message}", flush=True)

    def table(self) -> str:
        """The fixed-width table printed at the end."""
        header = ("metric", "unit", "proxy", "nginx", "ratio", "target", "result")
        lines = [
            (
                f"{row.section} {row.metric}",
                row.unit,
                _fmt(row.proxy),
                _fmt(row.nginx),
                _fmt(row.ratio, 3),
                str(row.target) if row.target else "-",
                {True: "pass", False: "FAIL", None: "info"}[row.passed],
            )
            for row in self.rows
        ]
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
        aligns = ["<", "<", ">", ">", ">", "<", "<"]

        def render(cells: tuple[str, ...]) -> str:
            return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths, strict=True))

        out = [render(header), render(tuple("-" * w for w in widths))]
        out += [render(line) for line in lines]
        out += [f"note: {n}" for n in self.notes]
        out += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(out)

    def write_json(self, path: Path, settings: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "settings": settings,
            "rows": [row.as_dict() for row in self.rows],
            "notes": self.notes,
            "warnings": self.warnings,
            "details": self.details,
        }
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _fmt(value: float | None, digits: int = 0) -> str:
    """Readable numbers: a few significant digits whatever the magnitude."""
    if value is None:
        return "-"
    if digits:
        return f"{value:.{digits}f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"
