"""npm dependencies: ``dependencies``, ``optionalDependencies`` and ``peerDependencies`` of the
``package.json`` inside the version's tarball, and node-semver's range semantics.

The tarball is the source for published and cached versions alike: its bytes are the ones the
integrity field vouches for and never change, while a packument is mutable metadata (and may
even state other dependencies than the tarball, "manifest confusion"). Aliases
(``"x": "npm:evil@^6"``) count as dependencies on the aliased package.

Ranges follow node-semver: ``||`` alternatives of space-separated comparator sets; ``<``,
``<=``, ``>``, ``>=``, ``=``; x-ranges (``1.x``, ``1.2.*``, ``*``, ``""``); partial versions;
tilde and caret ranges; hyphen ranges (``1.2.3 - 2``). A pre-release version satisfies a set
only if one of the set's comparators names a pre-release of the same major.minor.patch
(``^1.2.3-beta.1`` admits ``1.2.3-beta.4`` but not ``1.2.4-beta.1``). Tags, URLs, git and file
specs admit no registry version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from proxy.formats.deps_base import (
    Declared,
    DependencyReader,
    RangeError,
    tar_top_member,
)
from proxy.formats.npm_docs import valid_name

FIELDS = ("dependencies", "optionalDependencies", "peerDependencies")
_NUM = r"0|[1-9]\d*"
_IDENT = r"[0-9A-Za-z-]+"
_VERSION = re.compile(
    rf"^v?=?\s*(?P<major>{_NUM})\.(?P<minor>{_NUM})\.(?P<patch>{_NUM})"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?(?:\+{_IDENT}(?:\.{_IDENT})*)?\Z"
)
_XR = r"[xX*]|0|[1-9]\d*"
_PARTIAL = re.compile(
    rf"^v?(?P<major>{_XR})(?:\.(?P<minor>{_XR})(?:\.(?P<patch>{_XR})"
    rf"(?:-?(?P<pre>{_IDENT}(?:\.{_IDENT})*))?(?:\+{_IDENT}(?:\.{_IDENT})*)?)?)?\Z"
)
_COMPARATOR = re.compile(r"^(?P<op><=|>=|<|>|=|~>|~|\^)?(?P<rest>.*)\Z")
_HYPHEN = re.compile(r"^\s*(\S+)\s+-\s+(\S+)\s*\Z")


@dataclass(frozen=True, slots=True, order=True)
class SemVer:
    """A version in SemVer 2.0 precedence: pre-releases sort before their release."""

    major: int
    minor: int
    patch: int
    pre: tuple[tuple[int, int | str], ...] = ()

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def key(self) -> tuple[Any, ...]:
        # No pre-release sorts after every pre-release; numeric identifiers before alphanumeric.
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, self.pre)


def parse_version(text: str) -> SemVer:
    m = _VERSION.match(text.strip())
    if m is None:
        raise RangeError(f"{text!r} is not a semantic version")
    return SemVer(int(m["major"]), int(m["minor"]), int(m["patch"]), _pre(m["pre"]))


def _pre(text: str | None) -> tuple[tuple[int, int | str], ...]:
    if not text:
        return ()
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in text.split("."))


_ZERO = ((0, 0),)  # the "-0" pre-release: below every other pre-release of a version
Comparator = tuple[str, SemVer]  # (operator, version); operator "" never matches


def _cmp(a: SemVer, b: SemVer) -> int:
    ka, kb = a.key(), b.key()
    return (ka > kb) - (ka < kb)


def _test(op: str, a: SemVer, b: SemVer) -> bool:
    c = _cmp(a, b)
    return {"<": c < 0, "<=": c <= 0, ">": c > 0, ">=": c >= 0, "=": c == 0}.get(op, False)


def parse_range(spec: str) -> list[list[Comparator]]:
    """A range as alternatives of comparator sets; RangeError when it is not one."""
    alternatives = []
    for part in spec.split("||"):
        hyphen = _HYPHEN.match(part)
        if hyphen:
            alternatives.append(_hyphen(hyphen.group(1), hyphen.group(2)))
            continue
        # ">= 1.2.3" is ">=1.2.3": an operator may be followed by spaces.
        tokens = re.sub(r"(<=|>=|<|>|=|~>|~|\^)\s+", r"\1", part.strip()).split()
        comparators: list[Comparator] = []
        for token in tokens or ["*"]:
            comparators.extend(_desugar(token))
        alternatives.append(comparators)
    return alternatives


def _partial(text: str) -> tuple[int | None, int | None, int | None, tuple[tuple[int, int | str], ...]]:
    m = _PARTIAL.match(text)
    if m is None:
        raise RangeError(f"{text!r} is not a version or version pattern")

    def num(value: str | None) -> int | None:
        return None if value is None or value in "xX*" else int(value)

    major, minor, patch = num(m["major"]), num(m["minor"]), num(m["patch"])
    # "1.x.3" is "1.x": after a wildcard, nothing counts.
    if major is None:
        minor = patch = None
    if minor is None:
        patch = None
    return major, minor, patch, _pre(m["pre"]) if patch is not None else ()


def _desugar(token: str) -> list[Comparator]:
    m = _COMPARATOR.match(token)
    assert m is not None
    op, rest = m["op"] or "", m["rest"]
    major, minor, patch, pre = _partial(rest)
    if op in ("~", "~>"):
        return _tilde(major, minor, patch, pre)
    if op == "^":
        return _caret(major, minor, patch, pre)
    if major is None:  # "*", ">=*": everything; "<*", ">*": nothing
        return [(">=", SemVer(0, 0, 0))] if op in ("", "=", ">=", "<=") else [("", SemVer(0, 0, 0))]
    if minor is None or patch is None:
        low = SemVer(major, minor or 0, 0)
        high = SemVer(major + 1, 0, 0, _ZERO) if minor is None else SemVer(major, minor + 1, 0, _ZERO)
        if op in ("", "="):
            return [(">=", low), ("<", high)]
        if op == ">":
            return [(">=", SemVer(high.major, high.minor, 0))]
        if op == ">=":
            return [(">=", low)]
        if op == "<":
            return [("<", SemVer(low.major, low.minor, 0, _ZERO))]
        return [("<", high)]  # "<="
    return [(op or "=", SemVer(major, minor, patch, pre))]


def _tilde(major: int | None, minor: int | None, patch: int | None, pre: Any) -> list[Comparator]:
    if major is None:
        return [(">=", SemVer(0, 0, 0))]
    if minor is None:
        return [(">=", SemVer(major, 0, 0)), ("<", SemVer(major + 1, 0, 0, _ZERO))]
    return [(">=", SemVer(major, minor, patch or 0, pre)), ("<", SemVer(major, minor + 1, 0, _ZERO))]


def _caret(major: int | None, minor: int | None, patch: int | None, pre: Any) -> list[Comparator]:
    if major is None:
        return [(">=", SemVer(0, 0, 0))]
    low = SemVer(major, minor or 0, patch or 0, pre)
    if major > 0 or minor is None:
        high = SemVer(major + 1, 0, 0, _ZERO)
    elif minor > 0 or patch is None:
        high = SemVer(0, minor + 1, 0, _ZERO)
    else:
        high = SemVer(0, 0, patch + 1, _ZERO)
    return [(">=", low), ("<", high)]


def _hyphen(left: str, right: str) -> list[Comparator]:
    lmajor, lminor, lpatch, lpre = _partial(left)
    low = SemVer(lmajor or 0, lminor or 0, lpatch or 0, lpre)
    rmajor, rminor, rpatch, rpre = _partial(right)
    if rmajor is None:
        return [(">=", low)]
    if rminor is None:
        return [(">=", low), ("<", SemVer(rmajor + 1, 0, 0, _ZERO))]
    if rpatch is None:
        return [(">=", low), ("<", SemVer(rmajor, rminor + 1, 0, _ZERO))]
    return [(">=", low), ("<=", SemVer(rmajor, rminor, rpatch, rpre))]


def satisfies(version: SemVer, spec: str) -> bool:
    for comparators in parse_range(spec):
        if not all(_test(op, version, bound) for op, bound in comparators):
            continue
        if not version.pre:
            return True
        # The pre-release rule: only a comparator on the same release may let a pre-release in.
        if any(bound.pre and bound.release == version.release for _, bound in comparators):
            return True
    return False


class NpmDependencies(DependencyReader):
    format = "npm"

    def source_rank(self, filename: str) -> int | None:
        return 0 if filename.endswith(".tgz") else None

    def read(self, filename: str, blob: Callable[[], BinaryIO]) -> list[Declared]:
        return parse_manifest(tar_top_member(blob, "package.json"))

    def normalize(self, name: str) -> str:
        if not valid_name(name):
            raise RangeError(f"{name!r} is not a valid npm package name")
        return name

    def version_key(self, version: str) -> Any:
        return parse_version(version).key()

    def admits(self, spec: str, version: str) -> bool:
        return satisfies(parse_version(version), spec)


def parse_manifest(text: bytes) -> list[Declared]:
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"package.json is not JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError("package.json is not an object")
    found: list[Declared] = []
    for kind in FIELDS:
        deps = manifest.get(kind)
        if not isinstance(deps, dict):
            continue
        for name, spec in deps.items():
            if not isinstance(name, str) or not isinstance(spec, str):
                continue
            package, spec, condition = name, spec.strip(), ""
            if spec.startswith("npm:"):  # an alias: "x": "npm:evil@^6" installs evil as x
                package, spec = _alias(spec.removeprefix("npm:"))
                condition = f"alias {name}"
            found.append(Declared(package=package, range=spec, kind=kind, condition=condition))
    return found


def _alias(target: str) -> tuple[str, str]:
    """``evil@^6`` -> (evil, ^6); ``@scope/x@1`` -> (@scope/x, 1); ``evil`` -> (evil, '')."""
    at = target.rfind("@")
    return (target[:at], target[at + 1 :]) if at > 0 else (target, "")
