"""The admin API under ``/-/api/v1``: the HTTP shell around ``server/admin_ops.py``.

``AdminRoutes`` it parses bodies and query strings, raises the errors of ``proxy/errors.py`` (the error
middleware renders them), and never writes an error status itself. The rules live in the
services (``pipeline/registry.py``, ``pipeline/packages.py``); here are only the checks that
belong to the interface: formats by name, package names made canonical by their adapter, fields
present and of the right type. ``docs/openapi.yaml`` describes the endpoints:

    /-/api/v1/domains                                             GET, POST
    /-/api/v1/domains/{domain}                                    GET, DELETE
      …/repositories                                              GET, POST
      …/repositories/{repo}                                       GET, DELETE
      …/repositories/{repo}/upstreams                             PUT
      …/repositories/{repo}/packages[?format=]                    GET
      …/repositories/{repo}/packages/{format}/{package}           GET
      …/packages/{format}/{package}/versions/{version}            DELETE
      …/packages/{format}/{package}/versions/{version}/status     PUT
      …/packages/{format}/{package}/versions/{version}/copy       POST
      …/repositories/{repo}/origin-rules[?format=]                GET
      …/repositories/{repo}/origin-rules/{format}[?pattern=]      PUT, DELETE
      …/repositories/{repo}/quarantine[?format=]                  GET
      …/repositories/{repo}/quarantine/{format}[?pattern=]        PUT, DELETE
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy.errors import BadRequest, Handler, NotFound
from proxy.model import RepoRef
from proxy.pipeline.services import Pipeline
from proxy.server.admin_ops import AdminOps, Json, parse_min_release_age
from proxy.server.routing import repo_ref

API = "/-/api/v1"


class AdminRoutes:
    """The HTTP shell around :class:`AdminOps`; see the module docstring for the endpoints."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.ops = AdminOps(pipeline)

    def register(self, router: web.UrlDispatcher) -> None:
        domains = f"{API}/domains"
        repos = f"{domains}/{{domain}}/repositories"
        repo = f"{repos}/{{repo}}"
        version = f"{repo}/packages/{{format}}/{{package}}/versions/{{version}}"
        _resource(router, domains, GET=self.list_domains, POST=self.create_domain)
        _resource(router, f"{domains}/{{domain}}", GET=self.get_domain, DELETE=self.delete_domain)
        _resource(router, repos, GET=self.list_repositories, POST=self.create_repository)
        _resource(router, repo, GET=self.get_repository, DELETE=self.delete_repository)
        _resource(router, f"{repo}/upstreams", PUT=self.set_upstreams)
        _resource(router, f"{repo}/packages", GET=self.list_packages)
        _resource(router, f"{repo}/packages/{{format}}/{{package}}", GET=self.get_package)
        _resource(router, version, DELETE=self.delete_version)
        _resource(router, f"{version}/status", PUT=self.set_status)
        _resource(router, f"{version}/copy", POST=self.copy_version)
        _resource(router, f"{repo}/origin-rules", GET=self.list_origin_rules)
        _resource(
            router, f"{repo}/origin-rules/{{format}}", PUT=self.put_origin_rule, DELETE=self.del_origin_rule
        )
        _resource(router, f"{repo}/quarantine", GET=self.list_quarantine)
        _resource(
            router, f"{repo}/quarantine/{{format}}", PUT=self.put_quarantine, DELETE=self.del_quarantine
        )
        router.add_route("*", f"{API}/{{tail:.*}}", self.no_endpoint)

    async def no_endpoint(self, request: web.Request) -> web.StreamResponse:
        raise NotFound(f"no admin endpoint {request.path} (see docs/openapi.yaml)")

    # --- domains ------------------------------------------------------------------------------

    async def list_domains(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.ops.domains())

    async def create_domain(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request, {"name"})
        created = await self.ops.create_domain(_text(body, "name"))
        return _created(created, f"{API}/domains/{created['name']}")

    async def get_domain(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.ops.domain(request.match_info["domain"]))

    async def delete_domain(self, request: web.Request) -> web.StreamResponse:
        await self.ops.delete_domain(request.match_info["domain"])
        return web.Response(status=204)

    # --- repositories -------------------------------------------------------------------------

    async def list_repositories(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.ops.repositories(request.match_info["domain"]))

    async def create_repository(self, request: web.Request) -> web.StreamResponse:
        domain = request.match_info["domain"]
        body = await _body(
            request,
            {"name", "upstreams", "description", "min_release_age", "allow_redeploy", "anonymous_read"},
        )
        age = body.get("min_release_age")
        created = await self.ops.create_repository(
            domain,
            _text(body, "name"),
            _names(body, "upstreams", default=[]),
            description=_text(body, "description", default=""),
            min_release_age=0.0 if age is None else parse_min_release_age(age),
            allow_redeploy=_flag(body, "allow_redeploy"),
            anonymous_read=_flag(body, "anonymous_read"),
        )
        return _created(created, f"{API}/domains/{domain}/repositories/{created['name']}")

    async def get_repository(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        return web.json_response(self.ops.repository(ref.domain, ref.repository))

    async def set_upstreams(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        body = await _body(request, {"upstreams"})
        changed = await self.ops.set_upstreams(ref.domain, ref.repository, _names(body, "upstreams"))
        return web.json_response(changed)

    async def delete_repository(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        await self.ops.delete_repository(ref.domain, ref.repository)
        return web.Response(status=204)

    # --- packages -----------------------------------------------------------------------------

    async def list_packages(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        found = await self.ops.packages(ref.domain, ref.repository, request.query.get("format") or None)
        return web.json_response(found)

    async def get_package(self, request: web.Request) -> web.StreamResponse:
        ref, fmt, package = _package_path(request)
        return web.json_response(await self.ops.package(ref.domain, ref.repository, fmt, package))

    async def set_status(self, request: web.Request) -> web.StreamResponse:
        ref, fmt, package = _package_path(request)
        body = await _body(request, {"status"})
        changed = await self.ops.set_status(
            ref.domain, ref.repository, fmt, package, request.match_info["version"], _text(body, "status")
        )
        return web.json_response(changed)

    async def delete_version(self, request: web.Request) -> web.StreamResponse:
        ref, fmt, package = _package_path(request)
        await self.ops.delete_version(ref.domain, ref.repository, fmt, package, request.match_info["version"])
        return web.Response(status=204)

    async def copy_version(self, request: web.Request) -> web.StreamResponse:
        ref, fmt, package = _package_path(request)
        body = await _body(request, {"to"})
        to = _text(body, "to")
        copied = await self.ops.copy_version(
            ref.domain, ref.repository, fmt, package, request.match_info["version"], to
        )
        where = f"{API}/domains/{ref.domain}/repositories/{to}/packages/{fmt}/{copied['package']}"
        return _created(copied, where)

    # --- origin rules and quarantine ------------------------------------------------------------

    async def list_origin_rules(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        fmt = request.query.get("format") or None
        return web.json_response(await self.ops.origin_rules(ref.domain, ref.repository, fmt))

    async def put_origin_rule(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        body = await _body(request, {"pattern", "publish", "upstream"})
        rule = await self.ops.put_origin_rule(
            ref.domain,
            ref.repository,
            request.match_info["format"],
            _text(body, "pattern"),
            publish=_text(body, "publish"),
            upstream=_text(body, "upstream"),
        )
        return web.json_response(rule)

    async def del_origin_rule(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        pattern = _query(request, "pattern")
        await self.ops.delete_origin_rule(ref.domain, ref.repository, request.match_info["format"], pattern)
        return web.Response(status=204)

    async def list_quarantine(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        fmt = request.query.get("format") or None
        return web.json_response(await self.ops.quarantine(ref.domain, ref.repository, fmt))

    async def put_quarantine(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        body = await _body(request, {"pattern", "reason"})
        entry = await self.ops.put_quarantine(
            ref.domain,
            ref.repository,
            request.match_info["format"],
            _text(body, "pattern"),
            reason=_text(body, "reason", default=""),
        )
        return web.json_response(entry)

    async def del_quarantine(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        pattern = _query(request, "pattern")
        await self.ops.delete_quarantine(ref.domain, ref.repository, request.match_info["format"], pattern)
        return web.Response(status=204)


# --- HTTP helpers ------------------------------------------------------------------------------


def _resource(router: web.UrlDispatcher, path: str, **handlers: Handler) -> None:
    """One path with its methods; any other method gets a 405 naming the allowed ones."""
    resource = router.add_resource(path)
    for method, handler in handlers.items():
        resource.add_route(method, handler)
        if method == "GET":
            resource.add_route("HEAD", handler)
    allowed = set(handlers) | ({"HEAD"} if "GET" in handlers else set())
    resource.add_route("*", _not_allowed(allowed))


def _not_allowed(allowed: set[str]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)

    return handler


def _created(data: Json, location: str) -> web.StreamResponse:
    return web.json_response(data, status=201, headers={"Location": location})


def _package_path(request: web.Request) -> tuple[RepoRef, str, str]:
    return repo_ref(request), request.match_info["format"], request.match_info["package"]


def _query(request: web.Request, key: str) -> str:
    value = request.query.get(key)
    if not value:
        raise BadRequest(f"query parameter {key!r} is required")
    return value


async def _body(request: web.Request, allowed: set[str]) -> Json:
    """The request body as a JSON object holding only ``allowed`` fields."""
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("the request needs a JSON object body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(
            f"unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})",
            detail={"field": unknown[0]},
        )
    return body


def _text(body: Mapping[str, Any], key: str, *, default: str | None = None) -> str:
    value = body.get(key)
    if value is None:
        if default is None:
            raise BadRequest(f"field {key!r} is required", detail={"field": key})
        return default
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string", detail={"field": key})
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"field {key!r} must be true or false", detail={"field": key})
    return value


def _names(body: Mapping[str, Any], key: str, *, default: list[str] | None = None) -> list[str]:
    value = body.get(key)
    if value is None:
        if default is None:
            raise BadRequest(f"field {key!r} is required", detail={"field": key})
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"field {key!r} must be a list of names", detail={"field": key})
    return value


# --- JSON shapes -------------------------------------------------------------------------------
