"""``/-/metrics``: what the proxy is doing, in Prometheus' text format (prometheus-client).

Counted as they happen: requests by format, repository and status; cache results; bytes sent
from the cache and streamed from upstreams; upstream requests by connection and outcome, with
their latency. Read when scraped: circuit-breaker state, single-flight downloads started and
joined, blob store size and count, index size, and each connection's credential expiry. The
registry is the app's own (no global state), and a scrape runs in a worker thread because it
walks the blob store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.errors import Handler
from proxy.server.assets import BYTES_HINT
from proxy.storage.index import Index
from proxy.upstream.client import UpstreamClient
from proxy.upstream.flight import FlightGroup
from proxy.webhooks import WebhookDispatcher

FORMATS = frozenset({"pypi", "npm", "maven", "nuget"})
BLOB_WALK_SECONDS = 30.0  # the blob store is walked at most this often


class Metrics:
    """The app's counters and the collector of live values. Built in ``build_app``."""

    def __init__(
        self,
        clients: Mapping[str, UpstreamClient],
        flights: FlightGroup,
        data_dir: Path,
        webhooks: WebhookDispatcher | None = None,
        index: Index | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Measured before each scrape (a PostgreSQL index is a query away, not a file here).
        self.index = index
        self.index_bytes: int | None = None
        # Counted on every request, so plain integers (a prometheus Counter's inc takes a lock
        # and checks its labels); the collector exports them at scrape time.
        self.requests: dict[tuple[str, str, int], int] = {}
        self.cache: dict[tuple[str, str], int] = {}
        self.bytes: dict[str, int] = {"cache": 0, "upstream": 0}
        self.upstream = Counter(
            "artifact_proxy_upstream_requests",
            "Requests to external connections, by outcome (a status class or an error)",
            ["upstream", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "artifact_proxy_upstream_latency_seconds",
            "Time to an upstream's response headers",
            ["upstream"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.registry.register(_Live(clients, flights, data_dir, webhooks, self))
        for client in clients.values():
            client.observer = self.observe_upstream

    def observe_upstream(self, upstream: str, outcome: str, seconds: float | None) -> None:
        self.upstream.labels(upstream, outcome).inc()
        if seconds is not None:
            self.latency.labels(upstream).observe(seconds)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count each response once it is complete (after the error middleware made it one)."""
        response = await handler(request)
        info = request.match_info
        fmt = info.get("format") or (request.raw_path.split("/", 3)[2] if info.get("repo") else "")
        fmt = fmt if fmt in FORMATS else "-"
        repo = info.get("repo", "-") if fmt != "-" else "-"
        key = (fmt, repo, response.status)
        self.requests[key] = self.requests.get(key, 0) + 1
        result = response.headers.get("X-Cache")
        if result:
            self.cache[(fmt, result)] = self.cache.get((fmt, result), 0) + 1
            size = response.content_length or response.body_length or response.get(BYTES_HINT) or 0
            if size and response.status in {200, 206}:
                self.bytes["cache" if result in {"HIT", "STALE", "REVALIDATED"} else "upstream"] += size
        return response

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.index is not None:
            try:
                self.index_bytes = await self.index.database_bytes()
            except Exception:  # noqa: BLE001 - a scrape during an outage still answers
                self.index_bytes = None
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _Live(Collector):
    """Values read at scrape time from the objects that hold them."""

    def __init__(
        self,
        clients: Mapping[str, UpstreamClient],
        flights: FlightGroup,
        data_dir: Path,
        webhooks: WebhookDispatcher | None,
        counts: Metrics,
    ) -> None:
        self._counts = counts
        self._webhooks = webhooks
        self._clients = clients
        self._flights = flights
        self._data_dir = data_dir
        self._blob_stats: tuple[float, int, int] = (0.0, 0, 0)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # nothing to check at registration (collect walks the disk)

    def collect(self) -> Iterator[Metric]:
        counts = self._counts
        requests = CounterMetricFamily(
            "artifact_proxy_requests",
            "Requests answered, by format, repository and HTTP status",
            labels=["format", "repository", "status"],
        )
        for (fmt, repo, code), n in list(counts.requests.items()):
            requests.add_metric([fmt, repo, str(code)], n)
        yield requests
        cache = CounterMetricFamily(
            "artifact_proxy_cache_results",
            "Responses by cache result (X-Cache: HIT, MISS, STALE, REVALIDATED, LOCAL)",
            labels=["format", "result"],
        )
        for (fmt, result), n in list(counts.cache.items()):
            cache.add_metric([fmt, result], n)
        yield cache
        sent = CounterMetricFamily(
            "artifact_proxy_bytes_sent",
            "Response bytes, by where they came from (cache, upstream)",
            labels=["source"],
        )
        for source, n in list(counts.bytes.items()):
            sent.add_metric([source], n)
        yield sent
        breaker = GaugeMetricFamily(
            "artifact_proxy_circuit_open",
            "1 while a connection's circuit breaker is open",
            labels=["upstream"],
        )
        expiry = GaugeMetricFamily(
            "artifact_proxy_credential_expiry_timestamp",
            "When each connection's current upstream token expires (Unix time)",
            labels=["upstream"],
        )
        for name, client in self._clients.items():
            breaker.add_metric([name], 1.0 if client.breaker.state == "open" else 0.0)
            status = client.credentials.status() if client.credentials is not None else {}
            if status.get("expires_at"):
                expiry.add_metric([name], float(status["expires_at"]))
        yield breaker
        yield expiry
        flights = GaugeMetricFamily(
            "artifact_proxy_flights",
            "Single-flight downloads: started, joined by waiters, in progress",
            labels=["kind"],
        )
        flights.add_metric(["started"], float(self._flights.started_count))
        flights.add_metric(["joined"], float(self._flights.joined_count))
        flights.add_metric(["in_progress"], float(len(self._flights)))
        yield flights
        if self._webhooks is not None:
            hooks = GaugeMetricFamily(
                "artifact_proxy_webhook_deliveries", "Webhook deliveries by outcome", labels=["outcome"]
            )
            hooks.add_metric(["delivered"], float(self._webhooks.delivered))
            hooks.add_metric(["failed"], float(self._webhooks.failed))
            hooks.add_metric(["dropped"], float(self._webhooks.dropped))
            yield hooks
        count, size = self._blobs()
        yield GaugeMetricFamily("artifact_proxy_blobs", "Blobs in the store", value=float(count))
        yield GaugeMetricFamily("artifact_proxy_blob_bytes", "Bytes of blobs in the store", value=float(size))
        index = self._counts.index
        if index is not None and self._counts.index_bytes is not None:  # None: it did not answer
            yield GaugeMetricFamily(
                "artifact_proxy_index_bytes", index.size_help, value=float(self._counts.index_bytes)
            )

    def _blobs(self) -> tuple[int, int]:
        at, count, size = self._blob_stats
        if time.monotonic() - at < BLOB_WALK_SECONDS:
            return count, size
        count = size = 0
        for path in (self._data_dir / "blobs").rglob("*"):
            try:
                if path.is_file():
                    size += path.stat().st_size
                    count += 1
            except FileNotFoundError:
                continue
        self._blob_stats = (time.monotonic(), count, size)
        return count, size
