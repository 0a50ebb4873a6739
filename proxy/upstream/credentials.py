"""Upstream credentials: held by the proxy, injected into upstream requests, renewed ahead.

Build agents hold no upstream secret: each external connection may have one provider, behind
one interface (``current()`` and ``invalidate()``):

- ``basic`` / ``bearer``: a secret from an environment variable or a file (the file is re-read
  when it changes, for mounted Kubernetes secrets); never inline in the TOML.
- ``command``: a command that prints ``{"token": …, "expiration": ISO-8601}`` (the
  credential-process pattern), so any vault or script can supply short-lived tokens.
- ``codeartifact``: CodeArtifact's ``GetAuthorizationToken``, signed with SigV4 (sigv4.py).

Expiring tokens are renewed ahead of expiry (when 75% of the lifetime has passed or 5 minutes
before it ends, whichever is earlier; the margin is capped at a quarter of the lifetime, so a
token living two minutes is not renewed continuously), one refresh at a time however many
requests wait. While a refresh fails and the old token is still valid, the old one is used and
the refresh retried with backoff. After a 401/403 from the upstream the client invalidates,
refreshes once and retries once. ``status()`` tells expiry, last refresh and last error, never
the secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import aiohttp

from proxy.config import CredentialsConfig
from proxy.errors import UpstreamUnavailable
from proxy.upstream.discovery import (
    NPM_REGISTRY,
    PIP_INDEX_URL,
    DiscoveryError,
    npm_registry_url,
    pip_index_url,
)
from proxy.upstream.sigv4 import load_credentials, sign

log = logging.getLogger("proxy.credentials")

REFRESH_RATIO = 0.75
REFRESH_MARGIN = 300.0
MAX_BACKOFF = 60.0
FILE_CHECK_SECONDS = 1.0
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Credential:
    """An ``Authorization`` header value and when it stops working (None: never)."""

    authorization: str
    expires_at: float | None = None
    issued_at: float = 0.0

    def __repr__(self) -> str:
        return f"Credential(expires_at={self.expires_at})"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class CredentialProvider(ABC):
    """See the module docstring."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    @abstractmethod
    async def current(self) -> Credential:
        """The credential to send now; UpstreamUnavailable naming the problem if there is none."""

    @abstractmethod
    def invalidate(self) -> None:
        """The upstream refused the current credential: get a new one before the next request."""

    def status(self) -> dict[str, Any]:
        return {}

    async def aclose(self) -> None:
        return None


class StaticSecret(CredentialProvider):
    """``basic`` or ``bearer`` from an environment variable or a file (re-read on change)."""

    def __init__(self, upstream: str, config: CredentialsConfig, env: Mapping[str, str]) -> None:
        super().__init__(upstream)
        self._config = config
        self._env = env
        self._cached: tuple[float, Credential] | None = None  # (file mtime, credential)
        self._checked = 0.0

    async def current(self) -> Credential:
        secret_file = self._config.secret_file
        if self._config.secret_from_url is not None:
            if self._cached is None:
                secret = await asyncio.to_thread(
                    self._password_in_discovered_url, self._config.secret_from_url
                )
                self._cached = (0.0, self._credential(secret))
            return self._cached[1]
        if secret_file is None:
            if self._cached is None:
                self._cached = (0.0, self._credential(self._env.get(self._config.secret_env or "", "")))
            return self._cached[1]
        now = time.monotonic()
        if self._cached is not None and now - self._checked < FILE_CHECK_SECONDS:
            return self._cached[1]
        self._checked = now
        try:
            mtime = await asyncio.to_thread(lambda: secret_file.stat().st_mtime)
            if self._cached is None or self._cached[0] != mtime:
                text = await asyncio.to_thread(secret_file.read_text, encoding="utf-8")
                self._cached = (mtime, self._credential(text.strip()))
        except OSError as exc:
            if self._cached is None:
                raise UpstreamUnavailable(
                    f"credentials for upstream {self.upstream}: cannot read {secret_file}: {exc.strerror}",
                    detail={"upstream": self.upstream},
                ) from exc
        assert self._cached is not None
        return self._cached[1]

    def invalidate(self) -> None:
        self._checked = 0.0  # look at the file again at once
        if self._config.secret_from_url is not None:
            self._cached = None  # and at pip's setup: its login may have written a new token

    def _password_in_discovered_url(self, key: str) -> str:
        """The password of the URL pip's (or npm's) setup names, read again (files: in a thread)."""
        discover = {PIP_INDEX_URL: pip_index_url, NPM_REGISTRY: npm_registry_url}[key]
        try:
            return unquote(urlsplit(discover(self._env)).password or "")
        except DiscoveryError:
            return ""

    def _credential(self, secret: str) -> Credential:
        if not secret:
            raise UpstreamUnavailable(
                f"credentials for upstream {self.upstream}: the secret is empty or not set",
                detail={"upstream": self.upstream},
            )
        if self._config.type == "bearer":
            return Credential(f"Bearer {secret}")
        return Credential(basic(self._config.username, secret))


class Renewing(CredentialProvider):
    """A token that expires, renewed ahead of time by ``fetch`` (see the module docstring)."""

    def __init__(
        self,
        upstream: str,
        fetch: Callable[[], Awaitable[tuple[str, float]]],
        scheme: str,
        user: str,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(upstream)
        self._fetch = fetch
        self._close = close
        self._scheme = scheme
        self._user = user
        self._credential: Credential | None = None
        self._refresh: asyncio.Task[Credential] | None = None
        self._forced = False
        self._retry_at = 0.0
        self._failures = 0
        self.refreshes = 0
        self.last_refresh: float | None = None
        self.last_error: str | None = None

    async def current(self) -> Credential:
        cred = self._credential
        now = time.time()
        if cred is None or self._forced or (cred.expires_at is not None and now >= cred.expires_at):
            return await self._refreshed()
        if now >= self._renew_at(cred) and now >= self._retry_at:
            self._start_refresh()  # in the background: this request still uses the valid token
        return cred

    def invalidate(self) -> None:
        self._forced = True
        self._retry_at = 0.0

    def status(self) -> dict[str, Any]:
        cred = self._credential
        return {
            "expires_at": cred.expires_at if cred else None,
            "last_refresh": self.last_refresh,
            "last_error": self.last_error,
            "refreshes": self.refreshes,
        }

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh
        if self._close is not None:
            await self._close()

    @staticmethod
    def _renew_at(cred: Credential) -> float:
        assert cred.expires_at is not None
        lifetime = max(cred.expires_at - cred.issued_at, 0.0)
        # The 5-minute margin never reaches back past the first quarter of a short token's life.
        margin = min(REFRESH_MARGIN, (1 - REFRESH_RATIO) * lifetime)
        return min(cred.issued_at + REFRESH_RATIO * lifetime, cred.expires_at - margin)

    def _start_refresh(self) -> asyncio.Task[Credential]:
        if self._refresh is None:
            self._refresh = asyncio.create_task(self._do_refresh(), name=f"credentials {self.upstream}")
            self._refresh.add_done_callback(self._refreshed_done)
        return self._refresh

    def _refreshed_done(self, task: asyncio.Task[Credential]) -> None:
        self._refresh = None
        if not task.cancelled():
            task.exception()  # retrieved: waiters got it, a background refresh logged it

    async def _refreshed(self) -> Credential:
        try:
            return await asyncio.shield(self._start_refresh())
        except UpstreamUnavailable:
            raise
        except Exception as exc:
            raise UpstreamUnavailable(
                f"credentials for upstream {self.upstream} could not be obtained: {exc}",
                detail={"upstream": self.upstream},
            ) from exc

    async def _do_refresh(self) -> Credential:
        started = time.time()
        try:
            token, expires_at = await self._fetch()
        except Exception as exc:
            self._failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = time.time() + min(MAX_BACKOFF, 2.0 ** (self._failures - 1))
            log.error("credentials for upstream %s: refresh failed: %s", self.upstream, self.last_error)
            if isinstance(exc, UpstreamUnavailable):
                raise
            raise UpstreamUnavailable(
                f"credentials for upstream {self.upstream} could not be renewed: {self.last_error}",
                detail={"upstream": self.upstream},
            ) from exc
        header = f"Bearer {token}" if self._scheme == "bearer" else basic(self._user, token)
        cred = Credential(header, expires_at, started)
        self._credential = cred
        self._forced = False
        self._failures = 0
        self._retry_at = 0.0
        self.refreshes += 1
        self.last_refresh = time.time()
        self.last_error = None
        log.info("credentials for upstream %s renewed; valid %.0fs", self.upstream, expires_at - started)
        return cred


async def run_command(command: tuple[str, ...]) -> tuple[str, float]:
    """The credential-process pattern: a command prints {"token": …, "expiration": ISO-8601}."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{command[0]} did not answer within {COMMAND_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {proc.returncode}: {err.decode(errors='replace')[-200:]}")
    try:
        doc = json.loads(out)
        token = str(doc["token"])
        expiration = _timestamp(doc["expiration"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f'{command[0]} must print {{"token": …, "expiration": ISO-8601}}') from exc
    return token, expiration


def _timestamp(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    moment = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


class CodeArtifactToken:
    """GetAuthorizationToken: ``POST {endpoint}/v1/authorization-token?domain=…``, SigV4-signed."""

    def __init__(self, config: CredentialsConfig, env: Mapping[str, str]) -> None:
        self._config = config
        self._env = env
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self) -> tuple[str, float]:
        config = self._config
        endpoint = (config.endpoint_url or f"https://codeartifact.{config.region}.amazonaws.com").rstrip("/")
        query = {
            "domain": config.domain,
            "domain-owner": config.domain_owner,
            "duration": str(int(config.duration)),
        }
        url = f"{endpoint}/v1/authorization-token?{urlencode(query)}"
        aws = await asyncio.to_thread(load_credentials, self._env)
        headers = sign("POST", url, region=config.region, service="codeartifact", credentials=aws)
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        timeout = aiohttp.ClientTimeout(total=30)
        async with self._session.post(url, headers=headers, timeout=timeout) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"CodeArtifact answered {resp.status}: {text[:200]}")
            doc = json.loads(text)
        return str(doc["authorizationToken"]), _timestamp(doc["expiration"])

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def build_provider(
    upstream: str, fmt: str, config: CredentialsConfig | None, env: Mapping[str, str] | None = None
) -> CredentialProvider | None:
    """The provider a connection's ``[credentials]`` table describes (None without one)."""
    if config is None:
        return None
    env = os.environ if env is None else env
    if config.type in {"basic", "bearer"}:
        return StaticSecret(upstream, config, env)
    scheme = "bearer" if fmt == "npm" else "basic"  # CodeArtifact's npm endpoint wants Bearer
    if config.type == "command":
        command = config.command
        return Renewing(upstream, lambda: run_command(command), scheme, config.username)
    fetcher = CodeArtifactToken(config, env)
    return Renewing(upstream, fetcher, scheme, config.username, close=fetcher.aclose)
