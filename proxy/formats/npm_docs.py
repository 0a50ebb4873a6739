"""npm packuments, parsed and rendered. Pure functions.

A packument lists every version of a package with its manifest; each manifest's ``dist`` names
the tarball and its hashes (``shasum``: SHA-1 hex; ``integrity``: Subresource Integrity, usually
``sha512-<base64>``). Parsed, each version becomes one listed file (its tarball) carrying the
manifest; rendered, the manifests come back with ``dist.tarball`` pointing at the proxy and the
hashes untouched. Two renderings: the full document (``application/json``) and the abbreviated
one npm, pnpm and yarn ask for by default (``application/vnd.npm.install-v1+json``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from proxy.model import ListedFile, Listing

ABBREVIATED = "application/vnd.npm.install-v1+json"
FULL = "application/json"
# \Z, not $: "$" also matches before a trailing newline.
_NAME_RE = re.compile(r"^(?:@[a-z0-9-~][a-z0-9-._~]*/)?[A-Za-z0-9-~][A-Za-z0-9-._~]*\Z")
# Manifest fields an installer needs: what the registry's abbreviated form keeps.
_ABBREVIATED_FIELDS = (
    "name",
    "version",
    "deprecated",
    "dependencies",
    "optionalDependencies",
    "devDependencies",
    "bundleDependencies",
    "bundledDependencies",
    "peerDependencies",
    "peerDependenciesMeta",
    "acceptDependencies",
    "bin",
    "directories",
    "dist",
    "engines",
    "cpu",
    "os",
    "libc",
    "funding",
    "_hasShrinkwrap",
    "hasInstallScript",
)
_SKIP_TOP = frozenset({"versions", "dist-tags", "time", "_attachments", "_rev", "_id"})


def valid_name(name: str) -> bool:
    return len(name) <= 214 and bool(_NAME_RE.match(name)) and not name.startswith((".", "_"))


def sri_to_hashes(integrity: str | None, shasum: str | None) -> dict[str, str]:
    """Hex digests from an SRI string (every algorithm in it) and a SHA-1 ``shasum``."""
    hashes: dict[str, str] = {}
    for token in (integrity or "").split():
        algo, _, b64 = token.partition("-")
        algo = algo.lower()
        if algo not in {"sha1", "sha256", "sha384", "sha512"} or not b64:
            continue
        try:
            hashes[algo] = base64.b64decode(b64.split("?")[0], validate=True).hex()
        except (binascii.Error, ValueError):
            continue
    if shasum and re.fullmatch(r"[0-9a-fA-F]{40}", shasum):
        hashes.setdefault("sha1", shasum.lower())
    return hashes


def hex_to_sri(algo: str, hexdigest: str) -> str:
    return f"{algo}-{base64.b64encode(bytes.fromhex(hexdigest)).decode()}"


def tarball_filename(url: str) -> str:
    """The last path segment of a tarball URL (``name-1.0.0.tgz``)."""
    return urlsplit(url).path.rsplit("/", 1)[-1]


def parse_packument(body: bytes, source: str) -> Listing:
    """A packument as a listing: one file per version, the manifest in its ``extra``."""
    doc = orjson.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("a packument is a JSON object")
    times: Mapping[str, Any] = doc.get("time") or {}
    files: list[ListedFile] = []
    for version, manifest in (doc.get("versions") or {}).items():
        if not isinstance(manifest, dict):
            continue
        dist = manifest.get("dist") or {}
        url = dist.get("tarball")
        if not isinstance(url, str) or not url:
            continue
        extra: dict[str, Any] = {"manifest": manifest}
        if isinstance(times.get(version), str):
            extra["upload_time"] = times[version]
        files.append(
            ListedFile(
                filename=tarball_filename(url),
                url=url,
                source=source,
                hashes=sri_to_hashes(dist.get("integrity"), dist.get("shasum")),
                version=str(version),
                extra=extra,
            )
        )
    meta = {k: v for k, v in doc.items() if k not in _SKIP_TOP}
    return Listing(
        package=str(doc.get("name", "")),
        files=tuple(files),
        versions=tuple(f.version for f in files if f.version),
        extra={"dist-tags": dict(doc.get("dist-tags") or {}), "time": dict(times), "meta": meta},
    )


def _version_key(version: str) -> tuple[Any, ...]:
    """Sort key for semver-ish versions: numbers numerically, pre-releases before releases."""
    core, _, pre = version.partition("-")
    nums = tuple(int(p) if p.isdigit() else -1 for p in core.split("+")[0].split("."))
    return (nums, 0 if pre else 1, pre)


def render(
    name: str,
    listing: Listing,
    tarball_url: Callable[[str], str],
    *,
    abbreviated: bool,
) -> bytes:
    """The packument for the visible versions, tarball URLs rewritten, hashes untouched."""
    versions: dict[str, Any] = {}
    for entry in listing.files:
        if entry.hidden or not entry.version:
            continue
        manifest = dict(entry.extra.get("manifest") or {})
        dist = dict(manifest.get("dist") or {})
        dist["tarball"] = tarball_url(entry.filename)
        manifest["dist"] = dist
        if abbreviated:
            manifest = {k: manifest[k] for k in _ABBREVIATED_FIELDS if k in manifest}
        versions[entry.version] = manifest
    tags = {t: v for t, v in (listing.extra.get("dist-tags") or {}).items() if v in versions}
    if versions and "latest" not in tags:
        releases = [v for v in versions if "-" not in v] or list(versions)
        tags["latest"] = max(releases, key=_version_key)
    times = listing.extra.get("time") or {}
    kept_times = {k: v for k, v in times.items() if k in versions or k in {"created", "modified"}}
    if abbreviated:
        doc: dict[str, Any] = {"name": name, "dist-tags": tags, "versions": versions}
        if "modified" in times:
            doc["modified"] = times["modified"]
        # Publish times, one short string per version: what age-gating clients (pnpm's
        # minimumReleaseAge, yarn's npmMinimalAgeGate) need, without the full document.
        doc["time"] = kept_times
        return orjson.dumps(doc)
    meta = dict(listing.extra.get("meta") or {})
    doc = {"_id": name, **meta, "name": name, "dist-tags": tags, "versions": versions, "time": kept_times}
    # npm's unpublish echoes the revision in its URLs; any stable token serves.
    doc["_rev"] = f"1-{hashlib.sha256(','.join(sorted(versions)).encode()).hexdigest()[:32]}"
    return orjson.dumps(doc)


def version_document(listing: Listing, spec: str, tarball_url: Callable[[str], str]) -> bytes | None:
    """``GET /{name}/{version-or-tag}``: one manifest, or None."""
    tags = listing.extra.get("dist-tags") or {}
    version = tags.get(spec, spec)
    for entry in listing.files:
        if entry.version == version and not entry.hidden:
            manifest = dict(entry.extra.get("manifest") or {})
            manifest["dist"] = {**(manifest.get("dist") or {}), "tarball": tarball_url(entry.filename)}
            return orjson.dumps(manifest)
    return None
