"""Scale of the index: lookups, start-up and memory with 1M assets and 200k documents.

    python bench/index_scale.py [--fresh] [--lookups 20000] [--control 0.01] [--skip-http] [--out FILE]

Generates (once; cached under ``bench/.work/index-scale/``, ``--fresh`` rebuilds) a data
directory whose SQLite index holds 1,000,000 asset rows and 200,000 metadata documents spread
over the four formats, two domains, four repositories (a chain release → team → public → one
external connection per format, and beta/mirror) and 100k packages with a long tail of sizes (1
to ~900 files), ~10k of them published (with their versions rows and npm dist-tags). The schema
is the proxy's own: its migrations run first, then the rows are bulk-inserted. A file has one
digest in every repository and the PyPI documents declare it. Blobs are not written, except
20,000 small ones for the gc measurement: lookups read the index, never a file.

Then it measures:

1. lookup latency (p50/p99/max) of the request path's index reads through the real ``Index``,
   ``Catalog`` and ``Resolver`` APIs, awaited one at a time on a uvloop event loop as a handler
   awaits them, random keys (about half misses), listings also by rows returned; alongside, the
   same on a control data set 1/100 the size with the same package shapes, in rounds that
   alternate the two so that bursts of load on a shared machine hit both: what differs between
   the two columns is what the index's size costs;
2. start-up of ``python -m proxy serve --workers 1``, and with the default number of workers,
   until ``/-/readyz`` answers 200 (median of 3); the same on an empty index as a control;
3. VmRSS/VmHWM of the serving process (``--workers 1``) after start-up, after ``--lookups`` page
   requests for random published packages, then after as many for random cached packages (pages
   built from the stored upstream documents; the proxy runs ``--offline``);
4. gc at this scale: the serving process with a gc budget it is under (a background pass every
   second), and one pass over budget (a dry run) in a process of its own while get_asset lookups
   run.

Targets (issue #11): lookup p99 < 1 ms, start-up < 2 s, RSS < 200 MB. Prints a table, writes
JSON (default ``bench/.work/index_scale.json``); exit status 0 when every target is met, 3 when
one is missed. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import Processes, child_pids, free_port, http_get, pid_alive

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from proxy.app import build_services  # noqa: E402
from proxy.config import Overrides, load_config  # noqa: E402
from proxy.formats import FORMATS  # noqa: E402
from proxy.model import RepoRef  # noqa: E402

ASSETS = 1_000_000
DOCUMENTS = 200_000
PACKAGES = 100_000
HOSTED_SHARE = 0.10
SEED = 11
FORMAT_SHARE = (("pypi", 0.35), ("npm", 0.35), ("maven", 0.20), ("nuget", 0.10))
# Repositories: (domain, name). acme: release -> team -> public -> connections; beta: mirror.
PUBLIC, TEAM, RELEASE, MIRROR = (
    RepoRef("acme", "public"),
    RepoRef("acme", "team"),
    RepoRef("acme", "release"),
    RepoRef("beta", "mirror"),
)
CONNECTION = {"pypi": "pypi", "npm": "npm", "maven": "maven", "nuget": "nuget"}
TARGET_P99_MS = 1.0
TARGET_STARTUP_S = 2.0
TARGET_RSS_MB = 200.0  # decimal MB, as VmRSS KiB * 1024 / 1e6
WORDS = (
    "core", "data", "http", "test", "util", "cloud", "auth", "json", "log", "cli", "async", "db",
    "image", "plot", "crypto", "net", "web", "ml", "parse", "queue",
)  # fmt: skip


# --- the data set -----------------------------------------------------------------------------


@dataclass(slots=True)
class Package:
    """One package of the generated index and where its files are."""

    fmt: str
    name: str
    versions: list[str]
    hosted: bool
    repos: list[RepoRef] = field(default_factory=list)

    def files(self, version: str) -> list[str]:
        """The asset filenames of one version, as the format's adapter names them."""
        if self.fmt == "pypi":
            stem = self.name.replace("-", "_")
            wheel = f"{stem}-{version}-py3-none-any.whl"
            return [wheel, f"{wheel}.metadata", f"{stem}-{version}.tar.gz"]
        if self.fmt == "npm":
            return [f"{self.name.rsplit('/', 1)[-1]}-{version}.tgz"]
        if self.fmt == "maven":
            artifact = self.name.split(":", 1)[1]
            base = f"{version}/{artifact}-{version}"
            return [f"{base}.jar", f"{base}.jar.sha1", f"{base}.pom", f"{base}.pom.sha1"]
        return [f"{self.name}.{version}.nupkg", f"{self.name}.{version}.nuspec"]


def _name(rng: random.Random, fmt: str, i: int, hosted: bool) -> str:
    word = rng.choice(WORDS)
    prefix = "acme-" if hosted else ""
    if fmt == "pypi":
        return f"{prefix}{word}-{i:06d}"
    if fmt == "npm":
        if rng.random() < 0.2:
            return f"@{'acme' if hosted else rng.choice(WORDS)}/{word}-{i:06d}"
        return f"{prefix}{word}-{i:06d}"
    if fmt == "maven":
        org = "acme" if hosted else rng.choice(WORDS)
        return f"com.{org}.{word}:{word}-{i:06d}"
    return f"{'acme.' if hosted else ''}{word}.lib{i:06d}"


def plan(scale: float = 1.0, seed: int = SEED) -> list[Package]:
    """The packages, their versions and repositories; exactly ASSETS (times scale) files."""
    wanted = round(ASSETS * scale)
    rng = random.Random(seed)
    packages: list[Package] = []
    formats = [f for f, _ in FORMAT_SHARE]
    weights = [w for _, w in FORMAT_SHARE]
    files_per_version = {"pypi": 3, "npm": 1, "maven": 4, "nuget": 2}
    for i in range(round(PACKAGES * scale)):
        fmt = rng.choices(formats, weights)[0]
        hosted = rng.random() < HOSTED_SHARE
        # Long tail: most packages have a few versions, a few have hundreds.
        count = max(1, min(400, int(rng.paretovariate(1.3) * 2.2 / files_per_version[fmt] * 2)))
        versions = [f"{1 + v // 20}.{(v // 4) % 5}.{v % 4}" for v in range(count)]
        pkg = Package(fmt, _name(rng, fmt, i, hosted), versions, hosted)
        if hosted:
            pkg.repos = [TEAM]
        else:
            roll = rng.random()
            pkg.repos = [PUBLIC] if roll < 0.65 else [MIRROR] if roll < 0.85 else [PUBLIC, MIRROR]
            if rng.random() < 0.08:
                pkg.repos.append(TEAM)  # copied down the chain when asked through team
        packages.append(pkg)
    total = sum(len(p.files(p.versions[0])) * len(p.versions) * len(p.repos) for p in packages)
    # Scale the version counts so that the files add up to exactly ASSETS.
    shrink = wanted / total
    for pkg in packages:
        pkg.versions = pkg.versions[: max(1, round(len(pkg.versions) * shrink))]
    excess = sum(len(p.files(p.versions[0])) * len(p.versions) * len(p.repos) for p in packages) - wanted
    for pkg in packages:
        while excess > 0 and len(pkg.versions) > 1:
            pkg.versions.pop()
            excess -= len(pkg.files(pkg.versions[0])) * len(pkg.repos)
        while excess < 0:
            pkg.versions.append(f"9.{len(pkg.versions)}.0")
            excess += len(pkg.files(pkg.versions[0])) * len(pkg.repos)
        if excess == 0:
            break
    return packages


def asset_rows(packages: list[Package], rng: random.Random, now: float) -> Iterator[tuple[object, ...]]:
    """Rows of ``assets`` in primary-key order (sorted inserts keep the B-tree build fast)."""
    for repo in sorted({r for p in packages for r in p.repos}, key=lambda r: (r.domain, r.repository)):
        mine = sorted((p for p in packages if repo in p.repos), key=lambda p: (p.fmt, p.name))
        for pkg in mine:
            hosted = pkg.hosted and repo == TEAM
            upstream = None if hosted else CONNECTION[pkg.fmt]
            rows = []
            for version in pkg.versions:
                for filename in pkg.files(version):
                    origin = None if hosted else f"http://127.0.0.1:9/{pkg.fmt}/{pkg.name}/{filename}"
                    rows.append(
                        (
                            repo.domain,
                            repo.repository,
                            pkg.fmt,
                            pkg.name,
                            filename,
                            version,
                            file_digest(pkg.fmt, pkg.name, filename),
                            rng.randint(200, 5_000_000),
                            "application/octet-stream",
                            origin,
                            upstream,
                            int(hosted),
                            now - rng.random() * 86400 * 365,
                            now - rng.random() * 86400 * 30,
                        )
                    )
            rows.sort(key=lambda r: str(r[4]))
            yield from rows


def file_digest(fmt: str, package: str, filename: str) -> str:
    """The same file has the same digest in every repository, and the documents declare it."""
    return hashlib.sha256(f"{fmt}/{package}/{filename}".encode()).hexdigest()


def _document(pkg_fmt: str, name: str, versions: list[str]) -> tuple[str, bytes, str]:
    """(key, body, content type) of the upstream document of a package, roughly real-sized."""
    if pkg_fmt == "pypi":
        stem = name.replace("-", "_")
        files = [
            {
                "filename": f"{stem}-{v}-py3-none-any.whl",
                "url": f"https://files.example.org/packages/{stem}-{v}-py3-none-any.whl",
                "hashes": {"sha256": file_digest("pypi", name, f"{stem}-{v}-py3-none-any.whl")},
                "requires-python": ">=3.8",
                "core-metadata": {
                    "sha256": file_digest("pypi", name, f"{stem}-{v}-py3-none-any.whl.metadata")
                },
            }
            for v in versions
        ]
        body = {"meta": {"api-version": "1.1"}, "name": name, "versions": versions, "files": files}
        return f"pypi:{name}", json.dumps(body).encode(), "application/vnd.pypi.simple.v1+json"
    if pkg_fmt == "npm":
        packument = {
            "name": name,
            "dist-tags": {"latest": versions[-1]},
            "versions": {
                v: {
                    "name": name,
                    "version": v,
                    "dependencies": {"left-pad": "^1.0.0"},
                    "dist": {
                        "tarball": f"https://registry.example.org/{name}/-/{name.rsplit('/', 1)[-1]}-{v}.tgz",
                        "integrity": "sha512-" + "A" * 86 + "==",
                        "shasum": "0" * 40,
                    },
                }
                for v in versions
            },
            "time": dict.fromkeys(versions, "2024-01-01T00:00:00.000Z"),
        }
        return f"npm:{name}", json.dumps(packument).encode(), "application/json"
    if pkg_fmt == "maven":
        group, artifact = name.split(":", 1)
        listed = "".join(f"<version>{v}</version>" for v in versions)
        xml = (
            f"<metadata><groupId>{group}</groupId><artifactId>{artifact}</artifactId><versioning>"
            f"<latest>{versions[-1]}</latest><release>{versions[-1]}</release>"
            f"<versions>{listed}</versions><lastUpdated>20240101000000</lastUpdated>"
            "</versioning></metadata>"
        )
        path = f"{group.replace('.', '/')}/{artifact}/maven-metadata.xml"
        return f"maven:{path}", xml.encode(), "text/xml"
    return f"nuget:{name}", json.dumps({"versions": versions}).encode(), "application/json"


def document_rows(
    packages: list[Package], rng: random.Random, now: float, wanted: int
) -> Iterator[tuple[object, ...]]:
    """DOCUMENTS rows: every cached package's document, maven checksum documents, and the
    documents of packages whose metadata was read but no file fetched (resolvers do that a lot)."""
    made = 0

    def row(key: str, body: bytes, ctype: str, fmt: str) -> tuple[object, ...]:
        fetched = now - rng.random() * 86400
        return (
            CONNECTION[fmt],
            key,
            f"http://127.0.0.1:9/{key}",
            body,
            ctype,
            f'"{rng.getrandbits(64):x}"',
            None,
            None,
            fetched,
            fetched + 600,
        )

    cached = [p for p in packages if not p.hosted]
    for pkg in cached:
        key, body, ctype = _document(pkg.fmt, pkg.name, pkg.versions)
        yield row(key, body, ctype, pkg.fmt)
        made += 1
        if pkg.fmt == "maven":
            yield row(f"{key}.sha1", b"0" * 40, "text/plain", pkg.fmt)
            made += 1
    i = 0
    while made < wanted:
        fmt = rng.choices([f for f, _ in FORMAT_SHARE], [w for _, w in FORMAT_SHARE])[0]
        name = _name(rng, fmt, len(packages) + i, False)
        versions = [f"0.{v}.0" for v in range(rng.randint(1, 12))]
        key, body, ctype = _document(fmt, name, versions)
        yield row(key, body, ctype, fmt)
        made += 1
        i += 1


def version_rows(packages: list[Package], now: float) -> Iterator[tuple[object, ...]]:
    """``versions`` rows (and the attributes publish records) of the published packages."""
    for pkg in packages:
        if not pkg.hosted:
            continue
        for version in pkg.versions:
            if pkg.fmt == "pypi":
                attrs: dict[str, Any] = {"requires_python": ">=3.9", "summary": f"{pkg.name} library"}
            elif pkg.fmt == "npm":
                manifest = {"name": pkg.name, "version": version, "dependencies": {"left-pad": "^1.0.0"}}
                attrs = {"manifest": manifest, "sha512": "A" * 86 + "==", "sha1": "0" * 40, "tags": []}
            elif pkg.fmt == "nuget":
                attrs = {"catalog": {"id": pkg.name, "version": version, "description": "lib"}}
            else:
                attrs = {}
            yield (
                TEAM.domain,
                TEAM.repository,
                pkg.fmt,
                pkg.name,
                version,
                "Published",
                json.dumps(attrs),
                now,
                now,
            )


CONFIG = """[server]
listen = "127.0.0.1:{port}"
data_dir = "{data_dir}"
auth = false
offline = true

[upstreams.pypi]
format = "pypi"
url = "http://127.0.0.1:9/simple/"

[upstreams.npm]
format = "npm"
url = "http://127.0.0.1:9/npm/"

[upstreams.maven]
format = "maven"
url = "http://127.0.0.1:9/maven2/"

[upstreams.nuget]
format = "nuget"
url = "http://127.0.0.1:9/nuget/v3/index.json"

[[domains]]
name = "acme"

[[domains.repositories]]
name = "public"
upstreams = ["pypi", "npm", "maven", "nuget"]

[[domains.repositories]]
name = "team"
upstreams = ["public"]

[[domains.repositories]]
name = "release"
upstreams = ["team"]

[[domains]]
name = "beta"

[[domains.repositories]]
name = "mirror"
upstreams = ["pypi", "npm", "maven", "nuget"]
"""


def write_config(path: Path, data_dir: Path, port: int, extra: str = "") -> None:
    """The proxy's config; ``extra`` lines go into ``[server]``."""
    text = CONFIG.format(port=port, data_dir=data_dir).replace("offline = true\n", f"offline = true\n{extra}")
    path.write_text(text, encoding="utf-8")


def load(config_path: Path) -> Any:
    return load_config(Overrides(config_file=config_path), {})


async def _migrate_and_seed(config_path: Path) -> int:
    """Run the proxy's own migrations and seed the configured repositories (as serve would)."""
    services = build_services(load(config_path), upstreams=False)
    await services.index.open()
    try:
        await services.pipeline.registry.seed(load(config_path))
        return await services.index.schema_version()
    finally:
        await services.index.close()


def generate(work: Path, scale: float) -> dict[str, Any]:
    """Build the data directory under ``work`` (see the module docstring)."""
    if work.exists():
        shutil.rmtree(work)
    data_dir = work / "data"
    data_dir.mkdir(parents=True)
    config_path = work / "proxy.toml"
    write_config(config_path, data_dir, 0)
    started = time.monotonic()
    schema = asyncio.run(_migrate_and_seed(config_path))
    packages = plan(scale)
    rng = random.Random(SEED + 1)
    now = time.time()
    db = sqlite3.connect(data_dir / "index.sqlite3", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # generation only; the proxy runs with FULL
        counts: dict[str, int] = {}
        for table, sql, rows in (
            ("assets", _insert("assets", 14), asset_rows(packages, rng, now)),
            (
                "documents",
                _insert("documents", 10),
                document_rows(packages, rng, now, round(DOCUMENTS * scale)),
            ),
            ("versions", _insert("versions", 9), version_rows(packages, now)),
        ):
            counts[table] = _bulk(db, sql, rows)
            print(f"  {table}: {counts[table]:,} rows ({time.monotonic() - started:.0f}s)", flush=True)
        tags = [
            (TEAM.domain, TEAM.repository, "npm", p.name, "latest", p.versions[-1], now)
            for p in packages
            if p.hosted and p.fmt == "npm"
        ]
        counts["package_tags"] = _bulk(db, _insert("package_tags", 7), iter(tags))
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    meta = {
        "schema_version": schema,
        "rows": counts,
        "packages": len(packages),
        "hosted_packages": sum(p.hosted for p in packages),
        "packages_by_format": {f: sum(p.fmt == f for p in packages) for f, _ in FORMAT_SHARE},
        "generate_s": round(time.monotonic() - started, 1),
        "index_bytes": (data_dir / "index.sqlite3").stat().st_size,
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


_COLUMNS = {
    "assets": "domain, repository, format, package, filename, version, digest, size, content_type, "
    "origin_url, upstream, hosted, fetched_at, last_accessed",
    "documents": "upstream, doc_key, url, body, content_type, etag, last_modified, serial, fetched_at, "
    "expires_at",
    "versions": "domain, repository, format, package, version, status, attributes, created_at, updated_at",
    "package_tags": "domain, repository, format, package, tag, version, updated_at",
}


def _insert(table: str, n: int) -> str:
    return f"INSERT INTO {table} ({_COLUMNS[table]}) VALUES ({','.join('?' * n)})"


def _bulk(db: sqlite3.Connection, sql: str, rows: Iterator[tuple[object, ...]], batch: int = 50_000) -> int:
    """executemany in batches, one transaction per 250k rows."""
    total = 0
    db.execute("BEGIN")
    while True:
        chunk = [r for _, r in zip(range(batch), rows, strict=False)]
        if not chunk:
            break
        db.executemany(sql, chunk)
        total += len(chunk)
        if total % 250_000 == 0:
            db.execute("COMMIT")
            db.execute("BEGIN")
    db.execute("COMMIT")
    return total


# --- measurements -----------------------------------------------------------------------------


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return {"n": len(ordered), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": ordered[-1] / 1e6}


def _sample_keys(work: Path, n: int, seed: int) -> dict[str, list[Any]]:
    """Random existing keys (hits) read from the index, plus as many misses."""
    rng = random.Random(seed)
    db = sqlite3.connect(f"file:{work / 'data' / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        # Random rows in one pass (OFFSET or ORDER BY random() would scan 1M rows per key).
        total = db.execute("SELECT count(*) FROM assets").fetchone()[0]
        every = max(1, total // min(n, 2000))
        assets = db.execute(
            "SELECT domain, repository, format, package, filename FROM assets WHERE abs(random()) % ? = 0",
            (every,),
        ).fetchall()
        docs = db.execute("SELECT upstream, doc_key FROM documents").fetchall()
        hosted = db.execute(
            "SELECT DISTINCT format, package FROM versions WHERE domain=? AND repository=?",
            (TEAM.domain, TEAM.repository),
        ).fetchall()
        cached = db.execute(
            "SELECT DISTINCT format, package FROM assets WHERE domain=? AND repository=? "
            "AND format IN ('pypi', 'npm')",
            (PUBLIC.domain, PUBLIC.repository),
        ).fetchall()
    finally:
        db.close()
    return {"assets": assets, "docs": rng.sample(docs, min(n, len(docs))), "hosted": hosted, "cached": cached}


async def measure_lookups(work: Path, n: int, seed: int) -> dict[str, Any]:
    """Latency of each hot lookup, awaited one at a time on the event loop (see docstring)."""
    keys = await asyncio.to_thread(_sample_keys, work, n, seed)
    config = load(work / "proxy.toml")
    services = build_services(config, upstreams=False)
    index = services.index
    resolver = services.pipeline.resolver
    catalog = services.pipeline.registry._catalog  # the app's own Catalog
    adapters = {cls.name: cls(services.pipeline) for cls in FORMATS}
    await index.open()
    await services.pipeline.registry.reload()
    rng = random.Random(seed + 1)
    repos = [PUBLIC, TEAM, RELEASE, MIRROR]

    def asset_key() -> tuple[RepoRef, str, str, str]:
        d, r, f, p, fn = rng.choice(keys["assets"])
        if rng.random() < 0.5:  # a miss: a file of the package not in the index, or elsewhere
            return (
                (rng.choice(repos), f, p, fn + ".missing")
                if rng.random() < 0.5
                else (rng.choice(repos), f, p, fn)
            )
        return RepoRef(d, r), f, p, fn

    def doc_key() -> tuple[str, str]:
        up, key = rng.choice(keys["docs"])
        return (up, key) if rng.random() < 0.5 else (up, key + "-missing")

    def hosted_pkg() -> tuple[str, str]:
        if rng.random() < 0.5:
            fmt, package = rng.choice(keys["hosted"])
            return str(fmt), str(package)
        return ("pypi", f"no-such-{rng.randrange(10**9)}")

    async def get_asset() -> object:
        ref, f, p, fn = asset_key()
        return await index.get_asset(ref, f, p, fn)

    async def get_document() -> object:
        return await index.get_document(*doc_key())

    async def package_assets() -> object:
        ref, f, p, _ = asset_key()
        return await index.package_assets(ref, f, p)

    async def versions() -> object:
        fmt, pkg = hosted_pkg()
        return await catalog.versions(TEAM, fmt, pkg)

    async def hosted_files() -> object:
        fmt, pkg = hosted_pkg()
        resolver.index_changed_elsewhere()  # no policy cached: every call reads the index
        return await resolver.hosted_files(RELEASE, adapters[fmt], pkg)

    async def chain_stored() -> object:
        # The chain walk for a file: release -> team -> public. Misses only (a hit further up
        # the chain would copy the row down, a write).
        _, f, p, fn = asset_key()
        return await resolver.stored_asset(RELEASE, f, p, fn + ".absent")

    async def negative() -> object:
        return await index.get_negative(*doc_key())

    async def ping() -> object:
        await index.ping()  # SELECT 1: the floor (the hop to SQLite's thread and back)
        return None

    ops: dict[str, Callable[[], Awaitable[object]]] = {
        "ping (SELECT 1)": ping,
        "get_asset": get_asset,
        "get_document": get_document,
        "get_negative": negative,
        "package_assets": package_assets,
        "versions": versions,
        "hosted_files(release chain)": hosted_files,
        "stored_asset(release chain miss)": chain_stored,
    }
    results: dict[str, Any] = {}
    try:
        for name, op in ops.items():
            for _ in range(200):  # warm-up: statements prepared, pages touched once
                await op()
            samples: list[int] = []
            by_size: dict[str, list[int]] = {}
            for _ in range(n):
                t0 = time.perf_counter_ns()
                found = await op()
                took = time.perf_counter_ns() - t0
                samples.append(took)
                if isinstance(found, list):  # listings: the cost follows the rows returned
                    by_size.setdefault(_size_bucket(len(found)), []).append(took)
            results[name] = {"samples": samples, "by_size": by_size}
        # EXPLAIN QUERY PLAN of the statements above, so a full scan shows up in the report.
        plans: dict[str, list[str]] = {}
        for label, sql in _PLANNED.items():
            async with index.db.execute(f"EXPLAIN QUERY PLAN {sql}", [""] * sql.count("?")) as cur:
                plans[label] = [str(r[3]) for r in await cur.fetchall()]
        results["query_plans"] = plans
    finally:
        await index.close()
    return results


def run_lookups(works: dict[str, Path], n: int, rounds: int = 4) -> dict[str, Any]:
    """``n`` lookups per operation and data set, in rounds that alternate the data sets, so a
    burst of load on the (shared) machine falls on both alike."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    merged: dict[str, dict[str, Any]] = {label: {} for label in works}
    for r in range(rounds):
        for label, work in works.items():
            raw = runner(measure_lookups(work, n // rounds, SEED + 10 * r))
            for op, got in raw.items():
                if op == "query_plans":
                    merged[label]["query_plans"] = got
                    continue
                into = merged[label].setdefault(op, {"samples": [], "by_size": {}})
                into["samples"] += got["samples"]
                for bucket, values in got["by_size"].items():
                    into["by_size"].setdefault(bucket, []).extend(values)
    out: dict[str, Any] = {}
    for label, ops in merged.items():
        out[label] = {"query_plans": ops.pop("query_plans")}
        for op, got in ops.items():
            out[label][op] = _percentiles(got["samples"])
            if got["by_size"]:
                out[label][op]["by_rows_returned"] = {
                    k: _percentiles(v) for k, v in sorted(got["by_size"].items())
                }
    labels = list(works)
    print(f"  {'p50 / p99 / max in ms':34}" + "".join(f"{label:>26}" for label in labels))
    for op in out[labels[0]]:
        if op == "query_plans":
            continue
        rows = [(op, [out[label][op] for label in labels])]
        for bucket in out[labels[0]][op].get("by_rows_returned", {}):
            by = [out[label][op].get("by_rows_returned", {}).get(bucket) for label in labels]
            rows.append((f"    {bucket} rows returned", by))
        for name, stats in rows:
            cells = "".join(
                f"{s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {s['max_ms']:7.1f}  " if s else f"{'-':>26}"
                for s in stats
            )
            print(f"  {name:34}{cells}")
    return out


def _size_bucket(rows: int) -> str:
    for top in (0, 10, 100):
        if rows <= top:
            return f"<= {top:3d}"
    return ">  100"


_PLANNED = {
    "get_asset": "SELECT * FROM assets WHERE domain=? AND repository=? AND format=? AND package=? "
    "AND filename=?",
    "package_assets": "SELECT * FROM assets WHERE domain=? AND repository=? AND format=? AND package=? "
    "ORDER BY filename",
    "get_document": "SELECT * FROM documents WHERE upstream=? AND doc_key=?",
    "versions": "SELECT * FROM versions WHERE domain=? AND repository=? AND format=? AND package=? "
    "ORDER BY package, created_at",
    "tags": "SELECT tag, version FROM package_tags WHERE domain=? AND repository=? AND format=? "
    "AND package=?",
    "origin_rules": "SELECT pattern FROM origin_rules WHERE domain=? AND repository=? AND format=?",
    "quarantine": "SELECT pattern FROM quarantine WHERE domain=? AND repository=? AND format=?",
}


def _serve_argv(work: Path, workers: int | None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(work / "proxy.toml"),
        "--log-level",
        "WARNING",
    ]
    return argv + (["--workers", str(workers)] if workers else [])


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1])
    return out


def start_proxy(
    procs: Processes, work: Path, workers: int | None, extra: str = ""
) -> tuple[subprocess.Popen[bytes], int, float]:
    """Start the proxy; return it, its port and the seconds until /-/readyz said 200."""
    port = free_port()
    write_config(work / "proxy.toml", work / "data", port, extra)
    log = work / "proxy.log"
    t0 = time.monotonic()
    proc = procs.start(_serve_argv(work, workers), log=log, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/-/readyz"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy exited with {proc.returncode}; see {log}")
        try:
            status, _, _ = http_get(url, timeout=1.0)
            if status == 200:
                return proc, port, time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > 120:
            raise RuntimeError(f"the proxy was not ready after 120 s; see {log}")
        time.sleep(0.005)


def measure_startup(procs: Processes, work: Path, workers: int | None, runs: int = 3) -> dict[str, Any]:
    times = []
    for _ in range(runs):
        proc, _, took = start_proxy(procs, work, workers)
        times.append(took)
        procs.stop(proc)
    label = workers or "default"
    print(f"  start-up (--workers {label}): " + ", ".join(f"{t:.2f}" for t in times) + " s")
    return {"runs_s": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3)}


async def _http_load(port: int, paths: list[str], concurrency: int = 8) -> dict[str, Any]:
    import aiohttp

    statuses: dict[int, int] = {}
    samples: list[int] = []
    queue = list(reversed(paths))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

        async def worker() -> None:
            while queue:
                path = queue.pop()
                t0 = time.perf_counter_ns()
                async with session.get(path) as resp:
                    await resp.read()
                samples.append(time.perf_counter_ns() - t0)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"statuses": {str(k): v for k, v in sorted(statuses.items())}, **_percentiles(samples)}


def _page_path(repo: RepoRef, fmt: str, package: str) -> str:
    if fmt == "pypi":
        return f"/{repo.domain}/pypi/{repo.repository}/simple/{package}/"
    return f"/{repo.domain}/npm/{repo.repository}/{package.replace('/', '%2f')}"


def measure_memory(procs: Processes, work: Path, n: int) -> dict[str, Any]:
    """RSS of the single serving process after start-up, after ``n`` requests for the pages of
    random published packages (team), then after ``n`` more for random cached packages whose
    pages come from the stored upstream documents (public; offline, so served stale)."""
    keys = _sample_keys(work, 10, SEED)
    proc, port, _ = start_proxy(procs, work, 1)
    phases: dict[str, Any] = {}
    try:
        time.sleep(1.0)  # let the start-up settle (background tasks start)
        pids = [proc.pid, *child_pids(proc.pid)]
        phases["after_startup_kib"] = {str(p): _status_kib(p) for p in pids}
        print(f"  after start-up: {phases['after_startup_kib']}")
        rng = random.Random(SEED + 4)
        for label, repo, names in (("published", TEAM, keys["hosted"]), ("cached", PUBLIC, keys["cached"])):
            names = [(f, p) for f, p in names if f in ("pypi", "npm")]
            paths = [_page_path(repo, *rng.choice(names)) for _ in range(n)]
            load = asyncio.run(_http_load(port, paths))
            rss = {str(p): _status_kib(p) for p in pids if pid_alive(p)}
            phases[f"after_{label}_pages_kib"] = rss
            phases[f"http_{label}"] = load
            print(
                f"  after {n} pages of {label} packages ({len(names):,} to pick from): {rss}; "
                f"statuses {load['statuses']}, p50 {load['p50_ms']:.2f} ms, p99 {load['p99_ms']:.2f} ms"
            )
    finally:
        procs.stop(proc)
    return phases


GC_BLOBS = 20_000  # blob files made for the least recently used cached rows, so gc has work
GC_BLOB_BYTES = 1000
GC_CONFIG = 'gc_max_size = "1TiB"\ngc_interval = "1s"\n'


def _make_blobs(work: Path) -> None:
    """Blob files for the GC_BLOBS least recently used cached Maven and NuGet rows (once; kept
    with the data): random bytes, the rows' digests set to theirs, so every blob is intact.
    (Their upstream documents declare no file hashes, so no mutation is reported either.)"""
    data = work / "data"
    if (data / "blobs-made").exists():
        return
    rng = random.Random(SEED + 6)
    db = sqlite3.connect(data / "index.sqlite3", isolation_level=None)
    try:
        rows = db.execute(
            "SELECT domain, repository, format, package, filename FROM assets "
            "WHERE hosted = 0 AND format IN ('maven', 'nuget') ORDER BY last_accessed, fetched_at LIMIT ?",
            (GC_BLOBS,),
        ).fetchall()
        root = data / "blobs" / "sha256"
        updates = []
        for row in rows:
            body = rng.randbytes(GC_BLOB_BYTES)
            digest = hashlib.sha256(body).hexdigest()
            (root / digest[:2]).mkdir(parents=True, exist_ok=True)
            (root / digest[:2] / digest).write_bytes(body)
            updates.append((digest, GC_BLOB_BYTES, *row))
        db.execute("BEGIN")
        db.executemany(
            "UPDATE assets SET digest=?, size=? WHERE domain=? AND repository=? AND format=? "
            "AND package=? AND filename=?",
            updates,
        )
        db.execute("COMMIT")
    finally:
        db.close()
    (data / "blobs-made").touch()


async def gc_probe(work: Path) -> dict[str, Any]:
    """In a process of its own: one gc over budget (a dry run: the data set stays as it is)
    while get_asset lookups run every millisecond; the process's peak memory and their latency."""
    from proxy.storage import lifecycle

    services = build_services(load(work / "proxy.toml"), upstreams=False)
    index = services.index
    await index.open()
    rng = random.Random(SEED + 5)
    async with index.db.execute(
        "SELECT domain, repository, format, package, filename FROM assets WHERE abs(random()) % 500 = 0"
    ) as cur:
        keys = [tuple(r) for r in await cur.fetchall()]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
    before = _status_kib(os.getpid())
    samples: list[int] = []
    running = True

    async def lookups() -> None:
        while running:
            d, r, f, p, fn = rng.choice(keys)
            t0 = time.perf_counter_ns()
            await index.get_asset(RepoRef(d, r), f, p, fn)
            samples.append(time.perf_counter_ns() - t0)
            await asyncio.sleep(0.001)

    task = asyncio.create_task(lookups())
    t0 = time.monotonic()
    budget = GC_BLOBS * GC_BLOB_BYTES // 2
    report = await lifecycle.gc(index, services.blobs, budget, dry_run=True)
    took = time.monotonic() - t0
    running = False
    await task
    after = _status_kib(os.getpid())
    await index.close()
    return {
        "budget": budget,
        "before_bytes": report.before,
        "would_evict": len(report.evicted),
        "seconds": round(took, 2),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "lookups_during_gc": _percentiles(samples),
    }


def measure_gc(procs: Processes, work: Path) -> dict[str, Any]:
    """Memory of gc at this scale: (a) the serving process with a gc budget it is under, after a
    few background passes; (b) one pass over budget in a process of its own, with lookups."""
    _make_blobs(work)
    proc, _, _ = start_proxy(procs, work, 1, GC_CONFIG)
    try:
        time.sleep(8.0)  # the housekeeping task looks every 2 s, gc_interval is 1 s
        serving = _status_kib(proc.pid)
    finally:
        procs.stop(proc)
    write_config(work / "proxy.toml", work / "data", 0)
    out = subprocess.run(
        [sys.executable, __file__, "--gc-probe", "--work", str(work)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    lk = probe["lookups_during_gc"]
    print(f"  serving process, background gc under budget: {serving}")
    print(
        f"  one gc over budget ({probe['would_evict']} rows to evict, {probe['seconds']} s): "
        f"peak {probe['rss_after_kib']['VmHWM'] / 1024:.0f} MiB "
        f"(from {probe['rss_before_kib']['VmRSS'] / 1024:.0f});"
        f" get_asset meanwhile p50 {lk['p50_ms']:.3f} ms p99 {lk['p99_ms']:.2f} ms max {lk['max_ms']:.0f} ms"
    )
    return {"serving_under_budget_kib": serving, "over_budget_probe": probe}


def measure_empty_startup(procs: Processes, work: Path) -> dict[str, Any]:
    """The same start-ups on an empty index: what the machine and interpreter cost alone."""
    empty = work.parent / "index-scale-empty"
    (empty / "data").mkdir(parents=True, exist_ok=True)
    write_config(empty / "proxy.toml", empty / "data", 0)
    asyncio.run(_migrate_and_seed(empty / "proxy.toml"))
    print("start-up on an empty index (control):")
    return {
        "workers_1": measure_startup(procs, empty, 1),
        "workers_default": measure_startup(procs, empty, None),
    }


def prepare(work: Path, scale: float, fresh: bool) -> tuple[dict[str, Any], int, float]:
    """The data set at ``work`` (made if missing or ``fresh``), migrated to the proxy's schema."""
    if fresh or not (work / "meta.json").exists():
        sizes = f"{round(ASSETS * scale):,} assets and {round(DOCUMENTS * scale):,} documents"
        print(f"generating {sizes} in {work} ...", flush=True)
        meta = generate(work, scale)
    else:
        meta = json.loads((work / "meta.json").read_text(encoding="utf-8"))
        print(f"reusing {work} (--fresh to rebuild)")
    write_config(work / "proxy.toml", work / "data", 0)
    # Migrations added since the data set was made run once here, not inside a timed start-up.
    t0 = time.monotonic()
    schema = asyncio.run(_migrate_and_seed(work / "proxy.toml"))
    return meta, schema, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fresh", action="store_true", help="regenerate the data directory")
    parser.add_argument("--lookups", type=int, default=20_000, help="lookups per measurement")
    parser.add_argument("--work", type=Path, help="data set directory (default bench/.work/index-scale)")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/.work/index_scale.json)")
    parser.add_argument("--scale", type=float, default=1.0, help="data set size relative to 1M assets")
    parser.add_argument(
        "--control",
        type=float,
        default=0.01,
        help="scale of a control data set with the same package shapes, measured alongside (0: none): "
        "it tells the cost of the index's size from that of result sizes and of the machine",
    )
    parser.add_argument("--skip-http", action="store_true", help="only the in-process lookups")
    parser.add_argument("--gc-probe", action="store_true", help=argparse.SUPPRESS)  # measure_gc's child
    args = parser.parse_args(argv)
    suffix = "" if args.scale == 1 else f"-x{args.scale:g}"
    work: Path = (args.work or HERE / ".work" / f"index-scale{suffix}").resolve()
    args.out = args.out or HERE / ".work" / f"index_scale{suffix}.json"
    if args.gc_probe:
        print(json.dumps(asyncio.run(gc_probe(work))))
        return 0
    meta, schema, migrate_s = prepare(work, args.scale, args.fresh)
    works = {f"{meta['rows']['assets']:,} assets": work}
    if args.control:
        control = work.parent / f"index-scale-x{args.control:g}"
        control_meta, _, _ = prepare(control, args.control, args.fresh)
        works[f"control: {control_meta['rows']['assets']:,}"] = control
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
        },
        "dataset": meta,
        "schema_version": schema,
        "migrate_and_seed_s": round(migrate_s, 3),
    }
    print(f"data set: {meta['rows']}, index {meta['index_bytes'] / 2**20:.0f} MiB")
    print(f"lookups in process ({args.lookups} per operation, one at a time on the event loop):")
    lookups = run_lookups(works, args.lookups)
    result["lookups"] = lookups.pop(next(iter(works)))
    if lookups:
        result["lookups_control"] = {"data_set": next(iter(lookups)), **next(iter(lookups.values()))}
    procs = Processes()
    try:
        if not args.skip_http:
            print("start-up until /-/readyz answers 200:")
            result["startup_workers_1"] = measure_startup(procs, work, 1)
            result["startup_workers_default"] = {
                "workers": os.cpu_count(),
                **measure_startup(procs, work, None),
            }
            print("memory of the serving process (--workers 1):")
            result["memory"] = measure_memory(procs, work, args.lookups)
            print("gc at this scale:")
            result["gc"] = measure_gc(procs, work)
            result["startup_empty_index"] = measure_empty_startup(procs, work)
    finally:
        procs.stop_all()
    result["machine"]["loadavg_after"] = os.getloadavg()
    verdict = _verdict(result)
    result["targets"] = verdict
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print("targets:")
    for name, (value, target, ok) in verdict.items():
        print(f"  {name:40} {value:>10} (target {target}) {'ok' if ok else 'MISSED'}")
    print(f"wrote {args.out}")
    return 0 if all(ok for _, _, ok in verdict.values()) else 3


def _verdict(result: dict[str, Any]) -> dict[str, tuple[Any, Any, bool]]:
    out: dict[str, tuple[Any, Any, bool]] = {}
    for name, r in result["lookups"].items():
        if name != "query_plans":
            out[f"lookup p99 {name} (ms)"] = (
                round(r["p99_ms"], 3),
                f"< {TARGET_P99_MS}",
                r["p99_ms"] < TARGET_P99_MS,
            )
    for key in ("startup_workers_1", "startup_workers_default"):
        if key in result:
            s = result[key]["median_s"]
            out[f"{key} median (s)"] = (s, f"< {TARGET_STARTUP_S}", s < TARGET_STARTUP_S)
    if "gc" in result:
        for label, kib in (
            ("VmHWM serving process, background gc (MB)", result["gc"]["serving_under_budget_kib"]["VmHWM"]),
            (
                "VmHWM one gc pass over budget (MB)",
                result["gc"]["over_budget_probe"]["rss_after_kib"]["VmHWM"],
            ),
        ):
            mb = round(kib * 1024 / 1e6, 1)
            out[label] = (mb, f"< {TARGET_RSS_MB}", mb < TARGET_RSS_MB)
    if "memory" in result:
        for when in ("after_startup_kib", "after_published_pages_kib", "after_cached_pages_kib"):
            for pid, vm in result["memory"][when].items():
                for k in ("VmRSS", "VmHWM"):
                    mb = round(vm.get(k, 0) * 1024 / 1e6, 1)
                    out[f"{k} {when.removesuffix('_kib')} pid {pid} (MB)"] = (
                        mb,
                        f"< {TARGET_RSS_MB}",
                        mb < TARGET_RSS_MB,
                    )
    return out


if __name__ == "__main__":
    sys.exit(main())
