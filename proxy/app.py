"""``build_app(config)``: the only place that constructs and wires.

The request path, in order:

 1. ``request_id_middleware``  tags the request; the id goes into logs and error bodies
 2. ``error_middleware``       turns every exception into a JSON error; never a traceback
    ``body_deadline_middleware`` a request body that stalls for ``client_timeout``: a 408
 3. ``path_safety_middleware`` refuses ``..``, encoded slashes and NUL with a 400
 4. router                     ``/-/…`` system routes; ``/{domain}/{format}/{repo}/…`` adapter
                               routes; anything else a JSON 404 naming what was not found
 5. adapter handler            parses the path into "metadata of P" or "asset A of P"
 6. resolver                   hot cache → index → repository chain → document cache
                               (freshness, stale-if-error) or flight group (single-flight fetch,
                               staged, verified, committed, indexed)
 7. send                       sendfile for hits; a tail of the staging file for misses
 8. access log                 one line: status, X-Cache, bytes, duration, request id

Resources open and close in ``cleanup_ctx``: data directories, index, upstream sessions, flights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.config import Config, ConfigError, ServerConfig
from proxy.errors import Conflict, NotFound, error_middleware
from proxy.formats import FORMATS
from proxy.model import RepoRef
from proxy.pipeline.documents import DocumentCache
from proxy.pipeline.fetch import Fetcher
from proxy.pipeline.packages import PackageService
from proxy.pipeline.publish import Publisher
from proxy.pipeline.registry import RepositoryRegistry
from proxy.pipeline.resolve import Resolver
from proxy.pipeline.services import Pipeline
from proxy.security.access import ADMIN_TOKEN_ENV, DEFAULT_PERMISSION, AccessControl
from proxy.security.audit import AuditLog
from proxy.security.policy import Policies
from proxy.security.tokens import TokenStore
from proxy.server.admin import API as ADMIN_API
from proxy.server.admin import AdminRoutes
from proxy.server.assets import AssetSender
from proxy.server.changes import ChangeWatcher
from proxy.server.deps_api import DependencyRoutes
from proxy.server.metrics import Metrics
from proxy.server.middleware import body_deadline_middleware, request_id_middleware
from proxy.server.pages import PageStore
from proxy.server.routing import path_safety_middleware, route_by_format
from proxy.server.security_api import SecurityRoutes
from proxy.server.system import SystemRoutes
from proxy.server.workers import WorkerRole
from proxy.storage import lifecycle
from proxy.storage.backends import build_blob_store
from proxy.storage.catalog import Catalog
from proxy.storage.crypto import Sealer, StaticKeys
from proxy.storage.generation import Generation
from proxy.storage.hot import HotCache
from proxy.storage.index import Index
from proxy.storage.leases import LeaseBusy, node_id
from proxy.storage.local import LocalBlobStore
from proxy.storage.locks import KeyLockGroup, KeyLocks
from proxy.storage.page_files import PageFiles
from proxy.storage.staging import StagingArea
from proxy.upstream.client import UpstreamClient
from proxy.upstream.credentials import build_provider, shared_renewal
from proxy.upstream.flight import FlightGroup
from proxy.webhooks import WebhookDispatcher

log = logging.getLogger("proxy.app")

PIPELINE = web.AppKey("pipeline", Pipeline)
FLIGHTS = web.AppKey("flights", FlightGroup)
TOUCH_INTERVAL = 30.0
WATCH_INTERVAL = 2.0
SENDFILE_THREADS = 128


@dataclass(frozen=True, slots=True)
class Services:
    """Everything ``build_services`` constructs: the pipeline and the resources it stands on."""

    pipeline: Pipeline
    index: Index
    blobs: LocalBlobStore
    staging: StagingArea
    flights: FlightGroup
    documents: DocumentCache
    clients: dict[str, UpstreamClient]
    page_files: PageFiles
    webhooks: WebhookDispatcher


def open_index(config: Config) -> Index:
    """The SQLite file in the data directory, or the cluster's PostgreSQL (``[index] url``)."""
    if config.index.url is not None:
        from proxy.storage.postgres import PostgresIndex  # asyncpg only where a cluster needs it

        return PostgresIndex(config.index.url, config.index.pool_size, config.index.startup_wait)
    data_dir = config.server.data_dir
    return Index(data_dir / "index.sqlite3", Generation(data_dir / "generation"))


def key_locks(config: Config, worker: WorkerRole | None) -> KeyLockGroup | None:
    """Who takes turns on a cold key: nobody else (one process), this machine's workers (an
    flock per key), or every node of the cluster (an advisory lock on top of the flock)."""
    local = KeyLocks(config.server.data_dir / "locks") if worker else None
    if config.index.url is None:
        return local
    from proxy.storage.cluster import ClusterLocks

    return ClusterLocks(config.index.url, local)


def build_services(
    config: Config,
    *,
    upstreams: bool = True,
    sendfile_pool: Executor | None = None,
    worker: WorkerRole | None = None,
) -> Services:
    """Construct the services for ``config`` (the CLI uses them without HTTP or upstreams).

    ``worker``: this is one of several processes serving the data directory (server/workers.py):
    its pages go to a directory of its own and cold keys take cross-process locks.
    """
    data_dir = config.server.data_dir
    index = open_index(config)
    sealer = build_sealer(config.server, os.environ)
    blobs = build_blob_store(data_dir, config.storage, os.environ, sealer)
    # A worker stages in a directory of its own, which it clears when it (re)starts: the
    # supervisor restarts a worker that died, and its leftovers go with it.
    staging = StagingArea(data_dir / "tmp" / (f"worker-{worker.index}" if worker else ""), sealer)
    page_files = PageFiles(data_dir / "pages" / (f"worker-{worker.index}" if worker else ""))
    hot = HotCache(
        config.server.hot_cache_entries, config.server.memory_cache_size, on_page_drop=page_files.retire
    )
    # Expiring upstream tokens are renewed once for all processes sharing the index (sealed
    # with the encryption key; without one, each process renews its own: upstream/credentials.py).
    shared = shared_renewal(index, sealer, config.upstreams) if upstreams else None
    clients = (
        {
            name: UpstreamClient(up, build_provider(name, up.format, up.credentials, shared=shared))
            for name, up in config.upstreams.items()
        }
        if upstreams
        else {}
    )
    server = config.server
    locks = key_locks(config, worker)
    # A worker waits for another's download at most as long as that download may take.
    flights = (
        FlightGroup(locks, server.asset_timeout + 30, data_dir / "tmp")
        if locks is not None
        else FlightGroup()
    )
    audit = AuditLog(index, fetches=server.audit_fetches, file=server.audit_file)
    webhooks = WebhookDispatcher(config.webhooks)
    audit.subscribe(webhooks.observe)
    tokens = TokenStore(
        index, server.token_default_duration, server.token_min_duration, server.token_max_duration
    )
    documents = DocumentCache(index, config.server, locks)
    catalog = Catalog(index)
    registry = RepositoryRegistry(catalog, config.upstreams)
    fetcher = Fetcher(config.server, blobs, staging)
    resolver = Resolver(
        config, registry, index, catalog, hot, blobs, fetcher, documents, clients, flights, audit
    )
    registry.on_change(resolver.index_changed_elsewhere)
    pipeline = Pipeline(
        config=config,
        resolver=resolver,
        publisher=Publisher(resolver, catalog, blobs, staging, fetcher, config.server.max_upload_size, audit),
        registry=registry,
        packages=PackageService(resolver, catalog, index, audit),
        hot=hot,
        blobs=blobs,
        sender=AssetSender(blobs, sendfile_pool),
        pages=PageStore(hot, page_files, sendfile_pool),
        audit=audit,
        tokens=tokens,
        policies=Policies(index),
    )
    return Services(pipeline, index, blobs, staging, flights, documents, clients, page_files, webhooks)


def build_app(
    config: Config,
    reload_config: Callable[[], Config] | None = None,
    worker: WorkerRole | None = None,
) -> web.Application:
    """Construct every service for ``config`` and wire them into an aiohttp application.

    ``reload_config`` reads the configuration again (SIGHUP and ``POST /-/api/v1/reload``).
    ``worker``: one of several processes (server/workers.py); the supervisor already migrated
    the index, seeded repositories and cleared temp files, and gc runs in worker 0 only.
    """
    data_dir = config.server.data_dir
    # Cache hits stream by os.sendfile from these threads; they mostly wait in poll(), so many
    # are cheap, and their number bounds concurrent large sendfile transfers.
    sendfile_pool = ThreadPoolExecutor(max_workers=SENDFILE_THREADS, thread_name_prefix="sendfile")
    services = build_services(config, sendfile_pool=sendfile_pool, worker=worker)
    pipeline = services.pipeline
    index, blobs, staging = services.index, services.blobs, services.staging
    flights, documents, clients = services.flights, services.documents, services.clients
    registry, resolver = pipeline.registry, pipeline.resolver

    access = AccessControl(
        config.server,
        pipeline.tokens,
        registry,
        pipeline.audit,
        os.environ.get(ADMIN_TOKEN_ENV) or None,
        pipeline.policies,
    )
    metrics = Metrics(clients, flights, data_dir, services.webhooks, index)

    async def catch_up() -> None:
        """Another process committed a change: drop every in-memory view of the index."""
        pipeline.tokens.forget_verified()  # a token revoked elsewhere stops working here too
        resolver.index_changed_elsewhere()
        await registry.reload()
        await pipeline.policies.load()

    assert index.changes is not None
    watcher = ChangeWatcher(index.changes, catch_up)
    app = web.Application(
        middlewares=[
            request_id_middleware,
            metrics.middleware,
            error_middleware,
            body_deadline_middleware(config.server.client_timeout),
            watcher.middleware,
            path_safety_middleware,
            access.middleware,
        ],
    )
    app[PIPELINE] = pipeline
    app[FLIGHTS] = flights
    if worker is not None:  # which worker answered: for operators reading per-worker metrics

        async def name_worker(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["X-Proxy-Worker"] = str(worker.index)

        app.on_response_prepare.append(name_worker)

    SystemRoutes(index, data_dir, pipeline.audit, clients, blobs).register(app.router)
    app.router.add_get("/-/metrics", metrics.handle)
    SecurityRoutes(pipeline.tokens, pipeline.audit, access, pipeline.policies).register(app.router)

    async def reload() -> dict[str, int]:
        """Apply the config file's domains and repositories again, without a restart. Connections
        and server settings are fixed at startup: a change to them is refused, not half-applied."""
        if reload_config is None:
            raise Conflict("this proxy was not started from a config it can read again")
        fresh = await asyncio.to_thread(reload_config)
        if fresh.upstreams != config.upstreams or fresh.server != config.server:
            raise Conflict("the upstream connections or server settings changed: restart to apply them")
        await registry.seed(fresh)
        pipeline.audit.record("reload", detail={"domains": len(fresh.domains)})
        log.info("configuration reloaded: %d domain(s)", len(fresh.domains))
        return {
            "domains": len(fresh.domains),
            "repositories": sum(len(d.repositories) for d in fresh.domains),
        }

    async def reload_handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(await reload())

    access.require(app.router.add_post(f"{ADMIN_API}/reload", reload_handler), "admin", "proxy")
    # The dependency queries (before the admin API's catch-all); the recorder reads what each
    # publish, copy or cache fill declares, told by the audit trail like the webhooks.
    dependencies = DependencyRoutes(pipeline)
    dependencies.register(app.router)
    pipeline.audit.subscribe(dependencies.recorder.observe)
    AdminRoutes(pipeline).register(app.router)
    for route in app.router.routes():  # the admin API: admin of the domain in the path, or of all
        info = route.resource.get_info() if route.resource is not None else {}
        template = str(info.get("formatter") or info.get("path") or "")
        if template.startswith(f"{ADMIN_API}/domains") and route.method != "HEAD":
            access.require(route, "admin", "domain" if "{domain}" in template else "proxy")
    known = {cls.name for cls in FORMATS}
    for cls in FORMATS:
        adapter = cls(pipeline)
        for spec in adapter.routes():
            path = f"/{{domain}}/{cls.name}/{{repo}}{spec.suffix}"
            if spec.method == "GET":
                route = app.router.add_get(path, spec.handler)
            else:
                route = app.router.add_route(spec.method, path, spec.handler)
            access.require(route, spec.permission or DEFAULT_PERMISSION[spec.method], "repository")

    async def not_found(request: web.Request) -> web.StreamResponse:
        domain = request.match_info.get("domain", "")
        fmt = request.match_info.get("format", "")
        repo = request.match_info.get("repo", "")
        if domain and repo and not access.enabled:
            # Named only with access control off: this route checks no token, and telling which
            # repositories exist to anyone who asks is an existence oracle (invariant 9).
            registry.repository(RepoRef(domain, repo))  # 404 naming the domain or repository
        if fmt and fmt not in known:
            raise NotFound(
                f"unknown format {fmt!r} (served: {', '.join(sorted(known))})",
                detail={"format": fmt},
            )
        raise NotFound(f"no such endpoint: {request.path}")

    app.router.add_route("*", "/{domain}/{format}/{repo}/{tail:.*}", not_found)
    app.router.add_route("*", "/{tail:.*}", not_found)

    async def index_routes(app: web.Application) -> None:
        route_by_format(app.router)  # once the routes are final (see server/routing.py)

    app.on_startup.append(index_routes)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        removed = await asyncio.to_thread(_prepare_dirs, staging, blobs, services.page_files)
        if removed:
            log.info("removed %d leftover temp files from an earlier run", removed)
        await index.open()
        if worker is None:
            await registry.seed(config)
        else:
            await registry.reload()
        await pipeline.policies.load()
        if config.server.admin_token_file is not None:
            access.use_admin_secret(await asyncio.to_thread(_read_secret, config.server.admin_token_file))
        pipeline.audit.start()
        services.webhooks.start()
        loop = asyncio.get_running_loop()
        if worker is not None:
            # Ctrl-C reaches the whole process group and the supervisor sends each worker one
            # SIGTERM for it: a second signal would cut the graceful shutdown short.
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        reloads: set[asyncio.Future[None]] = set()  # kept until done (a task nobody holds may vanish)
        hup = getattr(signal, "SIGHUP", None)
        if reload_config is not None and hup is not None:

            def on_hup() -> None:
                async def run() -> None:
                    try:
                        await reload()
                    except Exception as exc:  # noqa: BLE001 - a bad reload keeps the running config
                        log.error("reload on SIGHUP refused: %s", getattr(exc, "message", exc))

                reloads.add(task := asyncio.ensure_future(run()))
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(hup, on_hup)
        for client in clients.values():
            await client.start()
        toucher = asyncio.create_task(
            _housekeeping(index, watcher, resolver, services.page_files, pipeline, config, blobs, worker),
            name="housekeeping",
        )
        if not config.server.auth:
            log.warning(
                "access control is OFF (server.auth = false): anyone who reaches this port may publish"
            )
        elif not access.has_admin:
            log.warning(
                "no bootstrap admin: set %s or server.admin_token_file to administer over HTTP",
                ADMIN_TOKEN_ENV,
            )
        log.info(
            "ready: data in %s, %d upstream(s), offline=%s",
            data_dir,
            len(clients),
            config.server.offline,
        )
        try:
            yield
        finally:
            if reload_config is not None and hup is not None:
                loop.remove_signal_handler(hup)
            toucher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await toucher
            await flights.aclose()
            await documents.aclose()
            await flights.close_locks()
            for client in clients.values():
                await client.close()
            with contextlib.suppress(Exception):
                await resolver.flush_touches()
                await pipeline.tokens.flush_last_used()
            await services.webhooks.aclose()
            try:
                await pipeline.audit.aclose()
            except Exception:
                log.exception("could not write the last audit records")
            await index.close()
            await blobs.close()
            sendfile_pool.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(dependencies.recorder.lifecycle)
    return app


def build_sealer(server: ServerConfig, env: Mapping[str, str]) -> Sealer | None:
    """Encryption at rest, when a key is configured (blocking when it reads a key file)."""
    try:
        if server.encryption_key_file is not None:
            return Sealer(StaticKeys.from_file(server.encryption_key_file))
        if server.encryption_key_env:
            if not env.get(server.encryption_key_env):
                raise ConfigError(f"server.encryption_key_env: {server.encryption_key_env} is not set")
            return Sealer(StaticKeys.from_env(env, server.encryption_key_env))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"server.encryption_key_*: {exc}") from exc
    return None


def _read_secret(path: Path) -> str:
    secret = path.read_text(encoding="utf-8").strip()
    if len(secret) < 32:
        raise ConfigError(f"server.admin_token_file: {path} must hold a secret of at least 32 characters")
    return secret


def _prepare_dirs(staging: StagingArea, blobs: LocalBlobStore, page_files: PageFiles) -> int:
    blobs.prepare()
    page_files.prepare()
    return staging.prepare()


async def _housekeeping(
    index: Index,
    watcher: ChangeWatcher,
    resolver: Resolver,
    page_files: PageFiles,
    pipeline: Pipeline,
    config: Config,
    blobs: LocalBlobStore,
    worker: WorkerRole | None,
) -> None:
    """Every few seconds: catch up with other processes' changes; now and then, access times
    and gc (tried in one worker only, and run by one process of all that share the index at a
    time: the ``gc`` lease, storage/leases.py; a round another holds it for is skipped)."""
    last_touch = last_gc = time.monotonic()
    gc_here = worker is None or worker.index == 0
    holder = node_id()
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        try:
            # Requests catch up before they are served; this keeps an idle worker current too.
            # (Not SQLite's data_version: other workers' audit and access-time writes move it.)
            if index.changes is not None and index.changes.changed():
                await watcher.catch_up()
                log.info("the index was changed by another process; reloaded repositories")
            if time.monotonic() - last_touch >= TOUCH_INTERVAL:
                last_touch = time.monotonic()
                await resolver.flush_touches()
                await asyncio.to_thread(page_files.sweep)
                await pipeline.tokens.flush_last_used()
            budget = config.server.gc_max_size
            if gc_here and budget and time.monotonic() - last_gc >= config.server.gc_interval:
                last_gc = time.monotonic()
                await resolver.flush_touches()  # eviction goes by last access: make it current
                try:
                    async with lifecycle.gc_lease(index, holder):
                        report = await lifecycle.gc(index, blobs, budget)
                except LeaseBusy as busy:
                    log.info("gc: skipped this round, %s is running gc or verify", busy.info.holder)
                    continue
                if report.evicted or report.blobs_deleted:
                    resolver.index_changed_elsewhere()
                    log.info(
                        "gc: %d cached asset(s) evicted, %d blob(s) deleted; %d -> %d bytes (budget %d)",
                        len(report.evicted),
                        report.blobs_deleted,
                        report.before,
                        report.after,
                        budget,
                    )
        except Exception:
            log.exception("housekeeping failed; retrying")
