"""The dependency queries of the admin API (``/-/api/v1``), the HTTP shell of
pipeline/dependencies.py. Like the rest of the admin API they need ``admin`` on the domain
(app.py requires it of every ``/-/api/v1/domains/…`` route):

    …/repositories/{repo}/packages/{format}/{package}/versions/{version}/dependencies   GET
    …/repositories/{repo}/dependents/{format}?name=…&range=…                            GET
    /-/api/v1/domains/{domain}/dependents/{format}?name=…&range=…                       GET (every repository)

``range`` is a version (exactly that one) or a range in the format's own syntax.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import BadRequest
from proxy.model import RepoRef
from proxy.pipeline.dependencies import DependencyRecorder, DependencyService
from proxy.pipeline.services import Pipeline
from proxy.server.routing import repo_ref

API = "/-/api/v1"


class DependencyRoutes:
    """Registers the routes above; must come before the admin API's catch-all."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.service = DependencyService(pipeline)
        self.recorder = DependencyRecorder(self.service)

    def register(self, router: web.UrlDispatcher) -> None:
        domain = f"{API}/domains/{{domain}}"
        repo = f"{domain}/repositories/{{repo}}"
        version = f"{repo}/packages/{{format}}/{{package}}/versions/{{version}}"
        router.add_get(f"{version}/dependencies", self.dependencies)
        router.add_get(f"{repo}/dependents/{{format}}", self.dependents)
        router.add_get(f"{domain}/dependents/{{format}}", self.domain_dependents)

    async def dependencies(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        answer = await self.service.dependencies(
            repo_ref(request), info["format"], info["package"], info["version"]
        )
        return web.json_response(answer)

    async def dependents(self, request: web.Request) -> web.StreamResponse:
        name, spec = _query(request, "name"), _query(request, "range")
        ref: RepoRef = repo_ref(request)
        return web.json_response(await self.service.dependents(ref, request.match_info["format"], name, spec))

    async def domain_dependents(self, request: web.Request) -> web.StreamResponse:
        name, spec = _query(request, "name"), _query(request, "range")
        answer = await self.service.dependents(
            None, request.match_info["format"], name, spec, domain=request.match_info["domain"]
        )
        return web.json_response(answer)


def _query(request: web.Request, key: str) -> str:
    value = request.query.get(key, "").strip()
    if not value:
        raise BadRequest(f"query parameter {key!r} is required", detail={"field": key})
    return value
