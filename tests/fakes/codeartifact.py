"""A fake AWS CodeArtifact: the token call, and repository endpoints that demand its tokens.

``POST /v1/authorization-token?domain=…&domain-owner=…&duration=…`` checks that a SigV4
``Authorization`` header and ``X-Amz-Date`` are present and issues a token living ``lifetime``
seconds (the test's choice, whatever duration was asked). ``/pypi/{repo}/…`` and
``/npm/{repo}/…`` accept only unexpired tokens it issued (HTTP Basic ``aws:TOKEN`` for PyPI,
``Bearer`` for npm, as CodeArtifact does) and otherwise answer 401; behind the check they pass
the request to an inner fake (FakePyPI, FakeNpmRegistry) and rewrite its URLs to their own.
With ``redirect_files`` set, PyPI files answer 302 to the inner fake under another host name
(``localhost``), like CodeArtifact's redirects to S3, so a test can see what reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tests.fakes.server import FakeServer


@dataclass
class TokenCall:
    at: float
    query: dict[str, str]
    signed: bool


@dataclass
class FakeCodeArtifact(FakeServer):
    pypi_url: str = ""  # the inner FakePyPI's origin
    npm_url: str = ""  # the inner FakeNpmRegistry's origin
    lifetime: float = 2.0
    token_endpoint_down: bool = False
    redirect_files: bool = False
    calls: list[TokenCall] = field(default_factory=list)
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry
    rejected: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        super().__init__()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await super().close()

    def revoke_all(self) -> None:
        self.tokens.clear()

    def endpoint(self) -> str:
        return self.origin

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/v1/authorization-token":
            return await self._token(request)
        for fmt, inner in (("pypi", self.pypi_url), ("npm", self.npm_url)):
            prefix = f"/{fmt}/myrepo"
            if path.startswith(prefix + "/") and inner:
                if not self._authorized(request, fmt):
                    self.rejected += 1
                    return web.json_response({"message": "Unauthorized"}, status=401)
                rest = request.raw_path[len(prefix) :]
                if self.redirect_files and fmt == "pypi" and rest.startswith("/files/"):
                    target = inner.replace("127.0.0.1", "localhost") + rest
                    raise web.HTTPFound(target)
                return await self._pass(request, inner + rest, inner, self.origin + prefix)
        return web.json_response({"message": "not found"}, status=404)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        signed = request.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256 Credential=") and bool(
            request.headers.get("X-Amz-Date")
        )
        self.calls.append(TokenCall(time.time(), dict(request.query), signed))
        if not signed:
            return web.json_response({"message": "missing SigV4 signature"}, status=403)
        if self.token_endpoint_down:
            return web.json_response({"message": "service unavailable"}, status=503)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)  # long enough for a stampede to show as overlap
        finally:
            self.in_flight -= 1
        token = f"ca{len(self.calls)}-{secrets.token_hex(8)}"
        expiry = time.time() + self.lifetime
        self.tokens[token] = expiry
        return web.json_response({"authorizationToken": token, "expiration": expiry})

    def _authorized(self, request: web.Request, fmt: str) -> bool:
        header = request.headers.get("Authorization", "")
        token = ""
        if fmt == "npm" and header.startswith("Bearer "):
            token = header[7:]
        elif fmt == "pypi" and header.startswith("Basic "):
            user, _, token = base64.b64decode(header[6:]).decode().partition(":")
            if user != "aws":
                return False
        expiry = self.tokens.get(token)
        return expiry is not None and time.time() < expiry

    async def _pass(self, request: web.Request, url: str, inner: str, outer: str) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() in {"accept", "if-none-match"}}
        async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
            body = await resp.read()
            ctype = resp.headers.get("Content-Type", "application/octet-stream")
            if ctype.startswith(("text/", "application/json", "application/vnd")):
                body = body.replace(inner.encode(), outer.encode())
            out = web.Response(status=resp.status, body=body, headers={"Content-Type": ctype})
            if "ETag" in resp.headers:
                out.headers["ETag"] = resp.headers["ETag"]
            return out
