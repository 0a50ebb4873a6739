"""Dependency tracking: what a held version declares, and who depends on a given version.

Recording: when a version is published, copied or first cached, ``DependencyRecorder`` (told by
the audit trail, like the webhooks) reads the dependencies of the stored file that carries them
with the format's reader (formats/deps*.py) in a worker thread, and keeps them in the index by
that file's digest. Every query first reads whatever is still unread in the repositories it looks
at (files stored before this feature, by the CLI, or a moment ago), so an answer never misses a
held version; reading is idempotent and never runs anything from the package.

Queries (the admin API and the CLI, server/deps_api.py and cli_deps.py):
- ``dependencies``: a held version's declared dependencies (CodeArtifact's
  ListPackageVersionDependencies);
- ``dependents``: which versions held in a repository and its upstream repositories declare a
  dependency whose range (in the format's own semantics) admits the target — the versions of
  the target package that the query's range admits, held or not when it names one version —
  directly or through other held versions, each with its path (``app@1 -> lib@2 -> evil@6.6.6``).
  "Admits" is the question a supply-chain incident asks: a range that could resolve to the
  compromised version counts, whichever version a particular build picked.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.errors import BadRequest, NotFound
from proxy.formats.deps import READERS
from proxy.formats.deps_base import Declared, DependencyReader, RangeError
from proxy.model import Digest, RepoRef
from proxy.storage.dependencies import DependencyStore, HeldFile

if TYPE_CHECKING:
    from proxy.pipeline.services import Pipeline
    from proxy.security.audit import AuditEvent

log = logging.getLogger("proxy.dependencies")

Json = dict[str, Any]
Node = tuple[str, str]  # (package, version)
RECORDED_ACTIONS = frozenset({"publish", "copy", "fetch"})
SETTLE = 0.5  # seconds the recorder waits after an event: the asset row lands after the audit event


@dataclass(frozen=True, slots=True)
class Held:
    """A version held in a repository of the chain, with the file its dependencies come from."""

    source: HeldFile
    rank: tuple[int, int, str]  # (repository position in the chain, source rank, filename)

    def node_text(self) -> str:
        return f"{self.source.package}@{self.source.version}"


class DependencyService:
    """See the module docstring. Stateless: built wherever it is needed (API, CLI, recorder)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._registry = pipeline.registry
        self._blobs = pipeline.blobs
        self._store = DependencyStore(pipeline.resolver.index)

    # --- inputs -------------------------------------------------------------------------------

    def reader(self, fmt: str) -> DependencyReader:
        reader = READERS.get(fmt)
        if reader is None:
            raise NotFound(
                f"unknown format {fmt!r} (served: {', '.join(sorted(READERS))})", detail={"format": fmt}
            )
        return reader

    def _name(self, reader: DependencyReader, name: str) -> str:
        try:
            return reader.normalize(name)
        except RangeError as exc:
            raise BadRequest(str(exc), detail={"field": "name"}) from exc

    def chain(self, ref: RepoRef) -> list[RepoRef]:
        """The repository, then its upstream repositories in resolution order (404 if unknown)."""
        ordered: list[RepoRef] = []

        def walk(current: RepoRef) -> None:
            if current in ordered:
                return
            ordered.append(current)
            domain = self._registry.domain(current.domain)
            for name in self._registry.repository(current).upstreams:
                if domain is not None and domain.repository(name) is not None:
                    walk(RepoRef(current.domain, name))

        self._registry.repository(ref)
        walk(ref)
        return ordered

    def _domain_repos(self, domain: str) -> list[RepoRef]:
        found = self._registry.domain(domain)
        if found is None:
            raise NotFound(f"domain {domain!r} does not exist", detail={"domain": domain})
        return [RepoRef(domain, r.name) for r in found.repositories]

    # --- reading ------------------------------------------------------------------------------

    async def _held(
        self, repos: Sequence[RepoRef], reader: DependencyReader, package: str | None = None
    ) -> dict[Node, Held]:
        """Each version held along ``repos`` (nearest first) with its best dependency source."""
        best: dict[Node, Held] = {}
        position = {repo: i for i, repo in enumerate(repos)}
        for held in await self._store.held_files(repos, reader.format, package):
            rank = reader.source_rank(held.filename)
            if rank is None:
                continue
            candidate = Held(held, (position[held.repo], rank, held.filename))
            key = (held.package, held.version)
            if key not in best or candidate.rank < best[key].rank:
                best[key] = candidate
        return best

    async def _read(self, reader: DependencyReader, sources: Iterable[HeldFile]) -> None:
        """Read and record the dependencies of every source not read yet (worker threads)."""
        pending = {s.digest: s for s in sources}
        done = await self._store.read_digests(pending)
        for digest, source in pending.items():
            if digest in done:
                continue
            try:
                await self._blobs.locate(Digest(digest))  # on this node's disk (storage/s3.py)
                opener = functools.partial(self._blobs.open_plain, Digest(digest))
                declared = await asyncio.to_thread(reader.read, source.filename, opener)
            except (FileNotFoundError, PermissionError) as exc:  # not an answer about the bytes
                log.warning("cannot read %s (%s): %s", source.filename, digest, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - hostile or broken archives: recorded, not raised
                log.info("no dependencies read from %s: %s", source.filename, exc)
                await self._store.record(
                    digest, reader.format, [], error=f"{type(exc).__name__}: {exc}"[:500]
                )
                continue
            await self._store.record(digest, reader.format, declared)

    async def record_package(self, ref: RepoRef, fmt: str, package: str) -> None:
        """Read what a package's versions in one repository declare (the recorder's job)."""
        reader = READERS.get(fmt)
        if reader is None:
            return
        held = await self._held([ref], reader, package)
        await self._read(reader, (h.source for h in held.values()))

    # --- queries ------------------------------------------------------------------------------

    async def dependencies(self, ref: RepoRef, fmt: str, package: str, version: str) -> Json:
        """What ``package@version``, held in the repository or its chain, declares."""
        reader = self.reader(fmt)
        package = self._name(reader, package)
        repos = self.chain(ref)
        held = await self._held(repos, reader, package)
        matches = sorted(
            (h for (_, v), h in held.items() if reader.same_version(v, version)), key=lambda h: h.rank
        )
        if not matches:
            raise NotFound(
                f"{package} {version} is not held in {ref.domain}/{ref.repository} or its upstream "
                "repositories (install or fetch it through the proxy first)",
                detail={"package": package, "version": version},
            )
        source = matches[0].source
        await self._read(reader, [source])
        declared = (await self._store.declared([source.digest]))[source.digest]
        error = (await self._store.errors([source.digest])).get(source.digest, "")
        answer: Json = {
            "domain": ref.domain,
            "repository": ref.repository,
            "format": fmt,
            "package": package,
            "version": source.version,
            "source": _source_json(source),
            "dependencies": [d.as_json() for d in declared],
        }
        if error:
            answer["error"] = f"the dependencies could not be read: {error}"
        return answer

    async def dependents(
        self, ref: RepoRef | None, fmt: str, name: str, spec: str, *, domain: str = ""
    ) -> Json:
        """Held versions whose declared ranges admit ``name`` at a version ``spec`` admits.

        ``ref`` None: every repository of ``domain``. ``spec`` is a version (exactly that
        version) or a range in the format's syntax; a malformed one is a 400.
        """
        reader = self.reader(fmt)
        name = self._name(reader, name)
        spec = spec.strip()
        if not spec:
            raise BadRequest("query parameter 'range' is required: a version or a version range")
        if not reader.is_version(spec):
            try:
                reader.check_range(spec)
            except RangeError as exc:
                raise BadRequest(f"range: {exc}", detail={"field": "range"}) from exc
        repos = self.chain(ref) if ref is not None else self._domain_repos(domain)
        held = await self._held(repos, reader)
        targets = sorted(
            {v for (p, v) in held if p == name and _safe(reader.query_admits, spec, v)}
            | ({spec} if reader.is_version(spec) else set()),
            key=lambda v: _sort_key(reader, v),
        )
        # One spelling per version: "6.6.6" asked and "6.6.6" held are one target.
        unique: list[str] = []
        for v in targets:
            if not any(reader.same_version(v, u) for u in unique):
                unique.append(v)
        found = await self._walk(reader, held, name, unique)
        return {
            "domain": ref.domain if ref is not None else domain,
            "repository": ref.repository if ref is not None else None,
            "format": fmt,
            "package": name,
            "range": spec,
            "versions": unique,
            "dependents": found,
        }

    async def _walk(
        self, reader: DependencyReader, held: dict[Node, Held], name: str, targets: list[str]
    ) -> list[Json]:
        """Breadth first from the targets up through held versions: shortest paths first."""
        await self._read(reader, (h.source for h in held.values()))
        declared = await self._store.declared(h.source.digest for h in held.values())
        depends_on: dict[str, list[tuple[Node, Declared]]] = {}
        for node, h in held.items():
            for dep in declared.get(h.source.digest, []):
                depends_on.setdefault(dep.package, []).append((node, dep))
        found: dict[Node, Json] = {}
        frontier: list[tuple[str, str, list[str]]] = [(name, t, [f"{name}@{t}"]) for t in targets]
        depth = 0
        while frontier:
            depth += 1
            following: list[tuple[str, str, list[str]]] = []
            for package, version, tail in frontier:
                for node, dep in depends_on.get(package, []):
                    if node in found or node[0] == name:
                        continue
                    if not _safe(reader.admits, dep.range, version):
                        continue
                    h = held[node]
                    path = [h.node_text(), *tail]
                    found[node] = {
                        "package": node[0],
                        "version": node[1],
                        "repository": h.source.repo.repository,
                        "origin": "published" if h.source.hosted else "cached",
                        "direct": depth == 1,
                        "dependency": dep.as_json(),
                        "path": path,
                    }
                    following.append((node[0], node[1], path))
            frontier = following
        return sorted(
            found.values(),
            key=lambda e: (len(e["path"]), e["package"], _sort_key(reader, e["version"]), e["repository"]),
        )

    async def quarantine_report(self, ref: RepoRef, fmt: str, pattern: str) -> Json:
        """Held versions that depend on what a quarantine pattern (``name@version``) hides, in
        the repository, its chain, and the repositories that resolve through it."""
        reader = READERS.get(fmt)
        name, _, version = pattern.partition("@")
        if reader is None or any(c in name for c in "*?["):
            return {"versions": [], "dependents": [], "note": "a name pattern: no dependents computed"}
        repos = self.chain(ref)
        for other in self._domain_repos(ref.domain):
            chain = self.chain(other)
            if ref in chain:
                repos += [r for r in chain if r not in repos]
        held = await self._held(repos, reader)
        version = version or "*"
        targets = [v for (p, v) in held if p == name and fnmatch.fnmatchcase(v, version)]
        if not any(c in version for c in "*?[") and reader.is_version(version):
            targets.append(version)
        unique: list[str] = []
        for v in sorted(set(targets), key=lambda v: _sort_key(reader, v)):
            if not any(reader.same_version(v, u) for u in unique):
                unique.append(v)
        return {"versions": unique, "dependents": await self._walk(reader, held, name, unique)}


def _safe(test: Any, spec: str, version: str) -> bool:
    """A declared range that is not valid in the format admits nothing (it is reported as written)."""
    try:
        return bool(test(spec, version))
    except RangeError:
        return False


def _sort_key(reader: DependencyReader, version: str) -> tuple[int, Any, str]:
    try:
        return (1, reader.version_key(version), version)
    except RangeError:
        return (0, 0, version)


def _source_json(source: HeldFile) -> Json:
    return {
        "repository": source.repo.repository,
        "filename": source.filename,
        "sha256": source.digest,
        "origin": "published" if source.hosted else "cached",
    }


class DependencyRecorder:
    """Reads the dependencies of versions as they are published, copied or cached (audit events)."""

    def __init__(self, service: DependencyService) -> None:
        self._service = service
        self._pending: set[tuple[str, str, str, str]] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def observe(self, event: AuditEvent) -> None:
        """An audit listener: never blocks, only notes which package to read."""
        if (
            event.action in RECORDED_ACTIONS
            and event.result in {"ok", "miss"}
            and event.format in READERS
            and event.domain
            and event.repository
            and event.package
        ):
            self._pending.add((event.domain, event.repository, event.format, event.package))
            self._wakeup.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(SETTLE)
            self._wakeup.clear()
            batch, self._pending = self._pending, set()
            for domain, repo, fmt, package in sorted(batch):
                try:
                    await self._service.record_package(RepoRef(domain, repo), fmt, package)
                except Exception:
                    log.exception("recording the dependencies of %s %s failed", fmt, package)

    async def lifecycle(self, app: object) -> AsyncIterator[None]:
        """An aiohttp ``cleanup_ctx`` entry: the recorder runs while the app does."""
        self._task = asyncio.create_task(self._run(), name="dependency recorder")
        try:
            yield
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
