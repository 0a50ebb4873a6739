"""``artifact-proxy package deps|dependents``: the twins of the dependency queries of the admin API
(server/deps_api.py), over the data directory like the other admin commands (cli_admin.py).

    artifact-proxy package deps --domain d --repo r --format pypi --package app --version 1.0
    artifact-proxy package dependents --domain d [--repo r] --format npm --name evil --range 6.6.6

Without ``--repo``, ``dependents`` looks at every repository of the domain. ``--json`` prints
the API's answer.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.model import RepoRef

if TYPE_CHECKING:
    from proxy.cli_admin import Outcome, Subparsers
    from proxy.server.admin_ops import AdminOps

Leaf = Callable[..., argparse.ArgumentParser]


def add_dependency_parsers(package: Subparsers, leaf: Leaf) -> None:
    """Add ``deps`` and ``dependents`` to the ``package`` command group."""
    deps = leaf(
        package, "deps", "what a held version declares it depends on", _deps, "domain", "repo", "format"
    )
    deps.add_argument("--package", required=True, help="the package name")
    deps.add_argument("--version", required=True, help="the version")
    dependents = leaf(
        package,
        "dependents",
        "which held versions depend (directly or through others) on a version of a package",
        _dependents,
        "format",
    )
    dependents.add_argument("--domain", default="default", help="the domain (default: default)")
    dependents.add_argument("--repo", help="the repository and its upstreams (default: every repository)")
    dependents.add_argument("--name", required=True, help="the package depended on, e.g. evil")
    dependents.add_argument(
        "--range", required=True, help="a version (exactly it) or a range in the format's syntax"
    )


async def _deps(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    from proxy.cli_admin import Outcome

    data = await ops.dependencies.dependencies(
        RepoRef(args.domain, args.repo), args.format, args.package, args.version
    )
    source = data["source"]
    lines = [
        f"{data['format']} {data['package']} {data['version']} in {args.domain}/{args.repo} "
        f"(read from {source['filename']} in {source['repository']})"
    ]
    lines += [f"  {dependency_line(d)}" for d in data["dependencies"]] or ["  no dependencies declared"]
    notes = [data["error"]] if data.get("error") else []
    return Outcome(data, lines, notes)


async def _dependents(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    from proxy.cli_admin import Outcome

    ref = RepoRef(args.domain, args.repo) if args.repo else None
    data = await ops.dependencies.dependents(ref, args.format, args.name, args.range, domain=args.domain)
    where = f"{args.domain}/{args.repo}" if args.repo else f"domain {args.domain}"
    versions = ", ".join(data["versions"]) or "(none)"
    lines = [f"{data['package']} {data['range']} (versions: {versions}) in {where}:"]
    lines += [f"  {dependent_line(e)}" for e in data["dependents"]] or ["  no held version depends on it"]
    return Outcome(data, lines)


def dependency_line(d: dict[str, Any]) -> str:
    text = (
        f"{d['package']}{'[' + d['extras'] + ']' if d['extras'] else ''} {d['range'] or '(any)'}  {d['kind']}"
    )
    return text + (f"  ({d['condition']})" if d["condition"] else "")


def dependent_line(e: dict[str, Any]) -> str:
    how = "direct" if e["direct"] else "transitive"
    return (
        f"{e['package']} {e['version']}  [{e['repository']}, {e['origin']}, {how}]  "
        f"{' -> '.join(e['path'])}  (declares {e['dependency']['range'] or 'any version'})"
    )
