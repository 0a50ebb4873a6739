"""One external connection: a pooled HTTP session with timeouts, retries, a breaker and a fence.

The fence: requests go only to the connection's own origin or to hosts its ``allow_hosts``
names, redirects are followed by hand and checked the same way, and any host other than the
configured origin must resolve to public addresses only (no loopback, private, link-local or
cloud-metadata ranges), so an upstream document cannot make the proxy fetch from the inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fnmatch
import ipaddress
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from proxy import __version__
from proxy.config import UpstreamConfig
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.upstream.breaker import CircuitBreaker, CircuitOpen
from proxy.upstream.credentials import CredentialProvider

log = logging.getLogger("proxy.upstream")

MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 10.0
USER_AGENT = f"artifact-proxy/{__version__}"


class BlockedTarget(UpstreamUnavailable):
    """A URL outside what this connection may contact."""


class InternalAddress(OSError):
    """A host that resolved only to internal addresses: a refusal, not an upstream failure (it
    must neither be retried nor count towards the breaker, or a hostile document could open the
    circuit of the real upstream)."""


# Addresses that reach the inside of a network: loopback, private, shared (CGNAT), link-local
# (which holds cloud metadata services), unspecified, multicast and reserved ranges.
_INTERNAL_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
)


def _is_public(address: str) -> bool:
    """False for any address in an internal range (IPv4-mapped IPv6 checked as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not any(ip.version == net.version and ip in net for net in _INTERNAL_NETWORKS)


class GuardedResolver(AbstractResolver):
    """DNS that refuses non-public answers for every host except the trusted origins."""

    def __init__(self, trusted_hosts: frozenset[str]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._trusted = trusted_hosts

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() in self._trusted:
            return results
        public = [r for r in results if _is_public(r["host"])]
        if not public:
            raise InternalAddress(f"{host} resolves only to non-public addresses; refusing to connect")
        return public

    async def close(self) -> None:
        await self._inner.close()


class UpstreamClient:
    """HTTP access to one external connection. Never sends client credentials anywhere."""

    def __init__(self, config: UpstreamConfig, credentials: CredentialProvider | None = None) -> None:
        self.config = config
        self.credentials = credentials  # injected only into requests to the connection's own origin
        # Told of every upstream request (metrics): connection, outcome, seconds to headers.
        self.observer: Callable[[str, str, float | None], None] = _ignore
        self.name = config.name
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown)
        self._origin = config.origin
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Upstream TLS is always verified: against the system's CAs, plus a connection's own
        # bundle when it has one (a private registry behind an internal CA).
        tls = await asyncio.to_thread(self._tls_context)  # reads CA files: off the loop
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            # The origin and hosts named exactly in allow_hosts are trusted to resolve anywhere
            # (an internal registry); patterns and every other host must resolve publicly.
            resolver=GuardedResolver(
                frozenset({self._origin[1]} | {h for h in self.config.allow_hosts if "*" not in h})
            ),
            ttl_dns_cache=300,
            ssl=tls,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT},
            trust_env=False,
        )

    def _tls_context(self) -> ssl.SSLContext:
        tls = ssl.create_default_context()
        if self.config.ca_bundle is not None:
            tls.load_verify_locations(cafile=self.config.ca_bundle)
        return tls

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.credentials is not None:
            await self.credentials.aclose()

    async def _authorization(self, url: str) -> str | None:
        """The credential for ``url``: only ever for the connection's own origin."""
        if self.credentials is None:
            return None
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if (parts.scheme, (parts.hostname or "").lower(), port) != self._origin:
            return None  # a redirect to a CDN or a pre-signed URL gets no credential
        return (await self.credentials.current()).authorization

    def timeout(self, total: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=total, connect=self.config.connect_timeout, sock_read=self.config.read_timeout
        )

    def check_target(self, url: str) -> None:
        """Refuse URLs this connection may not contact (see the module docstring)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in {"http", "https"} or not host:
            raise BlockedTarget(f"upstream {self.name}: refusing non-HTTP URL {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if (parts.scheme, host, port) == self._origin:
            return
        if not any(fnmatch.fnmatchcase(host, pattern) for pattern in self.config.allow_hosts):
            raise BlockedTarget(
                f"upstream {self.name}: host {host} is not allowed for this connection "
                "(add it to allow_hosts)"
            )
        with contextlib.suppress(ValueError):
            if not _is_public(host):
                raise BlockedTarget(f"upstream {self.name}: refusing non-public address {host}")

    @contextlib.asynccontextmanager
    async def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        total_timeout: float | None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET with redirects checked by hand and retries before the body is read.

        Yields the response for any status below 500 other than 429; raises
        :class:`UpstreamUnavailable` / :class:`UpstreamTimeout` naming this upstream otherwise.
        """
        if self._session is None:
            raise UpstreamUnavailable(f"upstream {self.name} is not started")
        attempts = self.config.retries + 1
        timeout = self.timeout(total_timeout)
        last_error: UpstreamUnavailable | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._backoff(attempt, last_error))
            try:
                self.breaker.before_request()
            except CircuitOpen as exc:
                raise UpstreamUnavailable(
                    f"upstream {self.name} is failing; skipped ({exc})",
                    detail={"upstream": self.name},
                ) from None
            recorded = False
            started = time.monotonic()
            try:
                try:
                    response = await self._follow(url, headers or {}, timeout)
                except (TimeoutError, aiohttp.ServerTimeoutError):
                    self.observer(self.name, "timeout", None)
                    raise
                except (aiohttp.ClientError, OSError):
                    self.observer(self.name, "error", None)
                    raise
                self.observer(self.name, f"{response.status // 100}xx", time.monotonic() - started)
                if response.status >= 500 or response.status == 429:
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                    response.release()
                    if response.status >= 500:
                        self.breaker.record_failure()
                    else:
                        self.breaker.record_success()
                    recorded = True
                    last_error = UpstreamUnavailable(
                        f"upstream {self.name} answered {response.status} for {url}",
                        detail={"upstream": self.name, "upstream_status": response.status},
                    )
                    last_error.retry_after = retry_after  # type: ignore[attr-defined]
                    continue
                self.breaker.record_success()
                recorded = True
            except BlockedTarget:
                self.breaker.record_success()
                recorded = True
                raise
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                self.breaker.record_failure()
                recorded = True
                last_error = UpstreamTimeout(
                    f"upstream {self.name} timed out for {url}", detail={"upstream": self.name}
                )
                last_error.__cause__ = exc
                continue
            except (aiohttp.ClientError, OSError) as exc:
                # A target refused after DNS, or a URL that cannot be fetched at all (127.1,
                # 0177.0.0.1): what a document named, not an outage of the upstream.
                internal = isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
                    exc.os_error, InternalAddress
                )
                if internal or isinstance(exc, aiohttp.InvalidURL):
                    self.breaker.record_success()
                    recorded = True
                    raise BlockedTarget(
                        f"upstream {self.name}: refusing {url}: {_describe(exc)}",
                        detail={"upstream": self.name},
                    ) from None
                self.breaker.record_failure()
                recorded = True
                last_error = UpstreamUnavailable(
                    f"upstream {self.name} unreachable for {url}: {_describe(exc)}",
                    detail={"upstream": self.name},
                )
                continue
            finally:
                if not recorded:  # cancelled mid-request: let the next probe through
                    self.breaker.record_failure()
            try:
                yield response
            finally:
                response.release()
            return
        assert last_error is not None
        log.warning("%s", last_error.message)
        raise last_error

    async def forward(
        self, method: str, url: str, *, content_type: str | None, body: bytes, limit: int
    ) -> tuple[int, str, bytes]:
        """One request passed through (npm audit, npm search): no retries, bounded answer.

        Only the body and its content type travel: no client header, so no client credential.
        """
        if self._session is None:
            raise UpstreamUnavailable(f"upstream {self.name} is not started")
        self.check_target(url)
        try:
            self.breaker.before_request()
        except CircuitOpen as exc:
            raise UpstreamUnavailable(
                f"upstream {self.name} is failing; skipped ({exc})", detail={"upstream": self.name}
            ) from None
        headers = {"Content-Type": content_type} if content_type else {}
        authorization = await self._authorization(url)
        if authorization is not None:
            headers["Authorization"] = authorization
        try:
            async with self._session.request(
                method,
                url,
                data=body or None,
                headers=headers,
                allow_redirects=False,
                timeout=self.timeout(self.config.metadata_timeout),
            ) as resp:
                data = await resp.content.read(limit + 1)
                if len(data) > limit:
                    raise UpstreamUnavailable(f"upstream {self.name}: answer larger than {limit} bytes")
                self.breaker.record_success()
                return resp.status, resp.headers.get("Content-Type", "application/json"), data
        except TimeoutError as exc:
            self.breaker.record_failure()
            raise UpstreamTimeout(
                f"upstream {self.name} timed out for {url}", detail={"upstream": self.name}
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            self.breaker.record_failure()
            raise UpstreamUnavailable(
                f"upstream {self.name} unreachable for {url}: {_describe(exc)}",
                detail={"upstream": self.name},
            ) from exc

    async def _follow(
        self, url: str, headers: Mapping[str, str], client_timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        reauthorized = False
        previous_scheme = urlsplit(url).scheme
        for _ in range(MAX_REDIRECTS + 2):
            self.check_target(url)
            scheme = urlsplit(url).scheme
            if previous_scheme == "https" and scheme != "https":
                raise BlockedTarget(f"upstream {self.name}: refusing a redirect from https to {url!r}")
            previous_scheme = scheme
            hop_headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            authorization = await self._authorization(url)
            if authorization is not None:
                hop_headers["Authorization"] = authorization
            response = await self._session.get(
                url, headers=hop_headers, allow_redirects=False, timeout=client_timeout
            )
            if response.status in {401, 403} and authorization is not None and not reauthorized:
                # Revoked or expired early: one new credential, one more try.
                response.release()
                assert self.credentials is not None
                self.credentials.invalidate()
                reauthorized = True
                continue
            if response.status in {301, 302, 303, 307, 308} and "Location" in response.headers:
                location = urljoin(url, response.headers["Location"])
                response.release()
                url = location
                continue
            return response
        raise UpstreamUnavailable(f"upstream {self.name}: too many redirects", detail={"upstream": self.name})

    @staticmethod
    def _backoff(attempt: int, last_error: Any) -> float:
        retry_after = getattr(last_error, "retry_after", None)
        if retry_after is not None:
            return float(min(retry_after, MAX_RETRY_AFTER))
        return float(min(5.0, 0.2 * 2 ** (attempt - 1)) * (0.5 + random.random()))


def _ignore(upstream: str, outcome: str, seconds: float | None) -> None:
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After``: delta seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, as HTTP-dates are
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
