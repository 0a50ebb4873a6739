"""``artifact-proxy warm``: fetch everything a set of lockfiles pins into a running proxy's cache.

Reads ``requirements.txt`` (pins, with or without ``--hash``), ``uv.lock``, ``package-lock.json``
(lockfile v2/v3), a list of Maven coordinates (``group:artifact:version[:ext[:classifier]]``,
one per line, in a ``*.maven``/``*.coords`` file), and NuGet's ``packages.lock.json``, and asks
the proxy for each pinned artifact and its metadata document, a bounded number at a time, over
HTTP (so the proxy's own chain, origin rules and verification apply). A build that later
installs those lockfiles then needs no upstream. Prints progress on stderr and a summary of what
failed and why.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import aiohttp

if TYPE_CHECKING:
    from tqdm import tqdm

from proxy.formats.pypi_simple import normalize


@dataclass(frozen=True, slots=True)
class Pin:
    """One thing to fetch: a metadata document and the artifacts it must lead to."""

    fmt: str
    name: str
    version: str
    hashes: frozenset[str] = frozenset()  # sha256 hex, when the lockfile says
    filename: str = ""  # when the lockfile names the file


def pep503(name: str) -> str:
    return normalize(name) or name.lower()


def read_pins(path: Path) -> list[Pin]:
    """The pins of one lockfile, by its name (blocking: reads the file)."""
    name = path.name.lower()
    text = path.read_text(encoding="utf-8")
    if name.endswith(".txt") or name.startswith("requirements"):
        return _requirements(text)
    if name == "uv.lock":
        return _uv_lock(text)
    if name == "poetry.lock":
        return _poetry_lock(text)
    if name == "pylock.toml" or (name.startswith("pylock.") and name.endswith(".toml")):
        return _pylock(text)
    if name == "pnpm-lock.yaml":
        return _pnpm_lock(text)
    if name == "yarn.lock":
        return _yarn_lock(text)
    if name == "package-lock.json":
        return _package_lock(text)
    if name == "packages.lock.json":
        return _nuget_lock(text)
    if name.endswith((".maven", ".coords")):
        return _maven(text)
    raise ValueError(f"{path}: not a lockfile warm reads (requirements.txt, uv.lock, package-lock.json, …)")


def _requirements(text: str) -> list[Pin]:
    pins: dict[tuple[str, str], set[str]] = {}
    logical = re.sub(r"\\\n", " ", text)
    for line in logical.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if m is None:
            continue
        key = (pep503(m.group(1)), m.group(3))
        pins.setdefault(key, set()).update(re.findall(r"--hash[= ]sha256:([0-9a-fA-F]{64})", line))
    return [Pin("pypi", n, v, frozenset(h.lower() for h in hashes)) for (n, v), hashes in pins.items()]


def _uv_lock(text: str) -> list[Pin]:
    doc = tomllib.loads(text)
    pins = []
    for package in doc.get("package", []):
        source = package.get("source", {})
        if "registry" not in source:
            continue  # the project itself, editable or path dependencies
        hashes = {
            str(f.get("hash", "")).removeprefix("sha256:")
            for f in [*package.get("wheels", []), package.get("sdist") or {}]
            if str(f.get("hash", "")).startswith("sha256:")
        }
        pins.append(Pin("pypi", pep503(package["name"]), str(package["version"]), frozenset(hashes)))
    return pins


def _poetry_lock(text: str) -> list[Pin]:
    pins = []
    for package in tomllib.loads(text).get("package", []):
        source = package.get("source") or {}
        if source.get("type") in {"directory", "file", "git", "url"}:
            continue
        hashes = {
            str(f.get("hash", "")).removeprefix("sha256:")
            for f in package.get("files", [])
            if str(f.get("hash", "")).startswith("sha256:")
        }
        pins.append(Pin("pypi", pep503(package["name"]), str(package["version"]), frozenset(hashes)))
    return pins


def _pylock(text: str) -> list[Pin]:
    """PEP 751 lock files."""
    pins = []
    for package in tomllib.loads(text).get("packages", []):
        if "version" not in package:
            continue  # a directory or VCS source
        files = [*package.get("wheels", []), package.get("sdist") or {}]
        hashes = {str((f.get("hashes") or {}).get("sha256", "")) for f in files} - {""}
        pins.append(Pin("pypi", pep503(package["name"]), str(package["version"]), frozenset(hashes)))
    return pins


def _pnpm_lock(text: str) -> list[Pin]:
    """pnpm-lock.yaml (v6 to v9): the keys of ``packages:`` name every pinned package."""
    pins = set()
    in_packages = False
    for line in text.splitlines():
        if not line.startswith(" ") and line.strip():
            in_packages = line.rstrip() == "packages:"
            continue
        m = re.match(r"^  '?/?((?:@[^@/\s]+/)?[^@/\s']+)@([^(':\s]+)", line) if in_packages else None
        if m is not None:
            pins.add(Pin("npm", m.group(1), m.group(2)))
    return sorted(pins, key=lambda p: (p.name, p.version))


def _yarn_lock(text: str) -> list[Pin]:
    """yarn.lock (classic): each entry's first spec names the package, ``version`` pins it."""
    pins = set()
    name = None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            spec = line.split(",")[0].strip().strip('"').rstrip(":")
            name = spec[: spec.rindex("@")] if spec.rfind("@") > 0 else None
        elif name and line.strip().startswith("version "):
            pins.add(Pin("npm", name, line.strip().split(" ", 1)[1].strip('"')))
            name = None
    return sorted(pins, key=lambda p: (p.name, p.version))


def _package_lock(text: str) -> list[Pin]:
    doc = json.loads(text)
    pins = []
    for where, entry in (doc.get("packages") or {}).items():
        if not where or entry.get("link") or not entry.get("resolved") or not entry.get("version"):
            continue
        name = entry.get("name") or where.rsplit("node_modules/", 1)[-1]
        filename = urlsplit(entry["resolved"]).path.rsplit("/", 1)[-1]
        pins.append(Pin("npm", name, entry["version"], filename=filename))
    return pins


def _nuget_lock(text: str) -> list[Pin]:
    doc = json.loads(text)
    pins = set()
    for framework in (doc.get("dependencies") or {}).values():
        for package_id, entry in framework.items():
            if entry.get("type") in {"Direct", "Transitive", "CentralTransitive"} and entry.get("resolved"):
                pins.add(Pin("nuget", package_id.lower(), str(entry["resolved"]).lower()))
    return sorted(pins, key=lambda p: (p.name, p.version))


def _maven(text: str) -> list[Pin]:
    pins = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < 3:
            raise ValueError(f"{line!r}: expected group:artifact:version[:ext[:classifier]]")
        group, artifact, version = parts[:3]
        ext = parts[3] if len(parts) > 3 else "jar"
        classifier = f"-{parts[4]}" if len(parts) > 4 else ""
        pins.append(
            Pin("maven", f"{group}:{artifact}", version, filename=f"{artifact}-{version}{classifier}.{ext}")
        )
    return pins


@dataclass(slots=True)
class WarmResult:
    fetched: int = 0
    failed: list[str] = field(default_factory=list)


def _bar(total: int) -> tqdm[Any]:
    """A progress bar on stderr (nothing when it is not a terminal). tqdm is imported here, not
    with the module, so ``serve`` processes do not hold it; importing reads files (a thread)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="pkg", desc="warm", file=sys.stderr, disable=None)


async def warm(
    endpoint: str, domain: str, repo: str, pins: Iterable[Pin], *, token: str | None, concurrency: int = 8
) -> WarmResult:
    """Fetch every pin through the proxy at ``endpoint``; never raises for one pin's failure."""
    base = f"{endpoint.rstrip('/')}/{quote(domain)}"
    todo = list(pins)
    result = WarmResult()
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    bar = await asyncio.to_thread(_bar, len(todo))
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=3600)) as http:

        async def one(pin: Pin) -> None:
            async with gate:
                try:
                    result.fetched += await _fetch(http, base, repo, pin)
                except Exception as exc:  # noqa: BLE001 - reported in the summary, never fatal
                    result.failed.append(f"{pin.fmt} {pin.name} {pin.version}: {exc}")
                bar.set_postfix_str(f"{pin.name} {pin.version}", refresh=False)
                bar.update(1)

        try:
            await asyncio.gather(*(one(p) for p in todo))
        finally:
            bar.close()
    return result


async def _get(http: aiohttp.ClientSession, url: str, accept: str | None = None) -> bytes:
    async with http.get(url, headers={"Accept": accept} if accept else {}) as resp:
        body = await resp.read()
        if resp.status != 200:
            message = body[:300].decode(errors="replace")
            raise RuntimeError(f"{resp.status} for {url}: {message}")
        return body


async def _fetch(http: aiohttp.ClientSession, base: str, repo: str, pin: Pin) -> int:
    """The pin's metadata document and artifacts; how many artifacts came."""
    if pin.fmt == "pypi":
        root = f"{base}/pypi/{quote(repo)}"
        page = json.loads(
            await _get(http, f"{root}/simple/{pin.name}/", "application/vnd.pypi.simple.v1+json")
        )
        files = [
            f for f in page.get("files", []) if _pypi_version(f["filename"], pin.name) == pin.version.lower()
        ]
        if pin.hashes:
            files = [f for f in files if f.get("hashes", {}).get("sha256") in pin.hashes]
        if not files:
            raise RuntimeError("no file of that version (and those hashes) in the index")
        for f in files:
            await _get(http, f["url"])
        return len(files)
    if pin.fmt == "npm":
        root = f"{base}/npm/{quote(repo)}"
        name = pin.name.replace("/", "%2f")
        await _get(http, f"{root}/{name}", "application/vnd.npm.install-v1+json")
        filename = pin.filename or f"{pin.name.rsplit('/', 1)[-1]}-{pin.version}.tgz"
        await _get(http, f"{root}/{pin.name}/-/{filename}")
        return 1
    if pin.fmt == "maven":
        group, artifact = pin.name.split(":", 1)
        root = f"{base}/maven/{quote(repo)}/{group.replace('.', '/')}/{artifact}"
        await _get(http, f"{root}/maven-metadata.xml")
        await _get(http, f"{root}/{pin.version}/{artifact}-{pin.version}.pom")
        if not pin.filename.endswith(".pom"):
            await _get(http, f"{root}/{pin.version}/{pin.filename}")
        return 2
    if pin.fmt == "nuget":
        root = f"{base}/nuget/{quote(repo)}"
        await _get(http, f"{root}/v3/registration/{pin.name}/index.json")
        await _get(http, f"{root}/v3-flatcontainer/{pin.name}/{pin.version}/{pin.name}.{pin.version}.nupkg")
        return 1
    raise RuntimeError(f"unknown format {pin.fmt}")


def _pypi_version(filename: str, project: str) -> str:
    """The version in a wheel or sdist file name (lower case), or '' when it does not parse."""
    stem = filename
    for suffix in (".whl", ".tar.gz", ".zip"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    parts = stem.split("-")
    if filename.endswith(".whl"):
        return parts[1].lower() if len(parts) >= 5 else ""
    for i in range(1, len(parts)):  # the name may hold '-' or '_': find where it ends
        if pep503("-".join(parts[:i])) == project:
            return "-".join(parts[i:]).lower()
    return ""


def summary(result: WarmResult, pins: int) -> list[str]:
    lines = [f"warmed {pins - len(result.failed)} of {pins} pinned package(s): {result.fetched} artifact(s)"]
    lines += [f"failed: {f}" for f in result.failed]
    return lines
