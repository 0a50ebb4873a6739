"""NuGet ids and versions: the normalisation the v3 protocol's URLs use, and version order.

Ids are case-insensitive and appear lower-cased in flat-container and registration URLs.
Versions are normalised: no leading zeros, at least three parts, a fourth only when it is not
zero, build metadata dropped (``01.2.0.0+sha`` → ``1.2.0``); the pre-release label keeps its
case in documents and is lower-cased in URLs. Order is SemVer 2.0's, with the fourth part.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.errors import BadRequest

_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}\Z")  # \Z: "$" accepts a trailing newline
_VERSION = re.compile(
    r"^(?P<nums>\d+(?:\.\d+){0,3})(?:-(?P<pre>[0-9A-Za-z\-]+(?:\.[0-9A-Za-z\-]+)*))?(?:\+(?P<meta>[0-9A-Za-z\-.]+))?$"
)


def valid_id(package_id: str) -> bool:
    return bool(_ID.match(package_id)) and ".." not in package_id


def normalize_id(package_id: str) -> str:
    """The one identity of a package id: lower case; BadRequest when it cannot be an id."""
    if not valid_id(package_id):
        raise BadRequest(f"{package_id!r} is not a valid NuGet package id")
    return package_id.lower()


def parse(version: str) -> tuple[tuple[int, int, int, int], str, str]:
    """(numbers, pre-release label, build metadata); ValueError when it is not a NuGet version."""
    m = _VERSION.match(version.strip())
    if m is None:
        raise ValueError(f"{version!r} is not a NuGet version")
    nums = [int(n) for n in m.group("nums").split(".")]
    nums += [0] * (4 - len(nums))
    return (nums[0], nums[1], nums[2], nums[3]), m.group("pre") or "", m.group("meta") or ""


def normalize(version: str) -> str:
    """The normalised version, pre-release case kept (ValueError when it is not one)."""
    (major, minor, patch, revision), pre, _ = parse(version)
    core = f"{major}.{minor}.{patch}" + (f".{revision}" if revision else "")
    return core + (f"-{pre}" if pre else "")


def normalize_or_400(version: str) -> str:
    try:
        return normalize(version)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def is_prerelease(version: str) -> bool:
    return "-" in version.split("+", 1)[0]


def is_semver2(version: str) -> bool:
    """Whether only SemVer 2.0 aware clients may be offered it (dotted label or metadata)."""
    try:
        _, pre, meta = parse(version)
    except ValueError:
        return False
    return "." in pre or bool(meta)


def sort_key(version: str) -> tuple[Any, ...]:
    try:
        nums, pre, _ = parse(version)
    except ValueError:
        return ((-1,), 0, (), version)
    if not pre:
        return (nums, 1, (), "")
    labels = tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in pre.split("."))
    return (nums, 0, labels, "")


def sort_versions(versions: list[str] | set[str] | tuple[str, ...]) -> list[str]:
    return sorted(versions, key=sort_key)
