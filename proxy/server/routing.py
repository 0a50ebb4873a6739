"""From a request path to a repository, and the path-safety checks every request passes.

Names from clients never become file-system paths (blobs are addressed by hash), but a path
with ``..``, an encoded slash or a NUL is still refused with a 400 before any handler sees it:
such a request is either a mistake or an attack, and neither should reach a parser.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource, DynamicResource, PlainResource, UrlMappingMatchInfo

from proxy.config import NAME_RE, ServerConfig
from proxy.errors import BadRequest, Handler, NotFound
from proxy.model import RepoRef

_BAD_ENCODED = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_SCOPED_NAME = re.compile(
    r"(/(?:@|%40)[a-z0-9~][a-z0-9._~-]*)%2f(?=[A-Za-z0-9~][A-Za-z0-9._~-]*(/|$))", re.IGNORECASE
)


def check_path(raw_path: str) -> None:
    """Refuse traversal and smuggling in the raw (still percent-encoded) path.

    The one encoded slash allowed is npm's scoped name, ``@scope%2fname``, as one segment.
    """
    path = raw_path.split("?", 1)[0]
    if (
        path.startswith("/")
        and "%" not in path
        and "\\" not in path
        and "\x00" not in path
        and "/." not in path
    ):
        return  # nothing encoded and no segment starting with a dot: the common case, at once
    path = _SCOPED_NAME.sub(r"\1", path)
    if _BAD_ENCODED.search(path):
        raise BadRequest("encoded '/', '\\' or NUL is not allowed in a path")
    for segment in path.split("/"):
        decoded = unquote(segment)
        if decoded in {".", ".."} or "\x00" in decoded or "\\" in decoded:
            raise BadRequest(f"path segment {segment!r} is not allowed")


@web.middleware
async def path_safety_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    check_path(request.raw_path)
    return await handler(request)


def repo_ref(request: web.Request) -> RepoRef:
    """The repository a route names; 404 (with what was not found) for names that cannot exist."""
    domain = request.match_info["domain"]
    repo = request.match_info["repo"]
    if not NAME_RE.match(domain):
        raise NotFound(f"domain {domain!r} does not exist", detail={"domain": domain})
    if not NAME_RE.match(repo):
        raise NotFound(
            f"repository {repo!r} does not exist in domain {domain!r}",
            detail={"domain": domain, "repository": repo},
        )
    return RepoRef(domain, repo)


def base_url(request: web.Request, server: ServerConfig) -> str:
    """Where clients reach this proxy: the configured public URL, else the request's own."""
    if server.public_url:
        return server.public_url
    scheme = request.scheme
    host = request.host
    if server.trust_forwarded:
        scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip() or scheme
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
    return f"{scheme}://{host}"


_FORMAT_ROUTE = re.compile(r"/\{domain\}/([a-z0-9]+)/")


def route_by_format(router: web.UrlDispatcher) -> None:
    """Resolve ``/{domain}/{format}/…`` paths among that format's routes only.

    aiohttp indexes routes by their literal path prefix, and every adapter route starts with the
    ``{domain}`` variable, so it tries them one regular expression after another in registration
    order: an npm packument was matched after some forty other routes (27 µs a request, a tenth of
    a packument hit). Routes of different formats can never match the same path (their second
    segment is a different literal), so trying only the asked format's routes for the request's
    method, in their order, finds what the full walk would find first (it skips a route of
    another method too, only noting the method for a 405). Anything else — no match there (404 and 405
    answers), paths whose first segment also starts a literal route (``/-/…``), routes added
    after a catch-all — goes through aiohttp's own walk, unchanged. Installed at startup, when
    the routes are final.
    """
    buckets: dict[tuple[str, str], list[AbstractResource]] = {}
    literal_heads: set[str] = set()
    generic_seen = False
    for resource in router.resources():
        if not isinstance(resource, (PlainResource, DynamicResource)):
            return  # sub-applications and custom resources: keep aiohttp's walk for everything
        canonical = resource.canonical
        match = _FORMAT_ROUTE.match(canonical + "/")
        if match and not generic_seen:
            for method in {route.method for route in resource}:
                buckets.setdefault((match.group(1), method), []).append(resource)
        elif canonical.startswith("/{"):
            generic_seen = True  # format routes after it are left to the full walk
        else:
            literal_heads.add(canonical.split("/", 2)[1])
    full: Callable[[web.Request], Awaitable[UrlMappingMatchInfo]] = router.resolve

    async def resolve(request: web.Request) -> UrlMappingMatchInfo:
        parts = request.rel_url.path_safe.split("/", 3)
        if len(parts) > 2 and parts[1] not in literal_heads and (parts[2], "*") not in buckets:
            for resource in buckets.get((parts[2], request.method), ()):
                match_info, _ = await resource.resolve(request)
                if match_info is not None:
                    return match_info
        return await full(request)

    router.resolve = resolve  # type: ignore[method-assign]
