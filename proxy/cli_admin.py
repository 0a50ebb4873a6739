"""The administration commands: the twins of the admin API (``/-/api/v1``, server/admin.py).

``domain``, ``repo``, ``package``, ``origin`` and ``quarantine`` call the same operations
(server/admin_ops.py) on the same services, built over the data directory without the HTTP
server, so ``--json`` prints exactly what the API answers. They work whether or not a proxy is
running on the data directory: SQLite in WAL mode lets both write, and a running proxy notices
the change within a few seconds. Exit codes: 0 done, 1 refused (the message of the error the API
would answer with, on stderr), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import aiohttp

from proxy.app import Services, build_services
from proxy.cli_deps import add_dependency_parsers, dependent_line
from proxy.cli_ops import add_ops_parsers
from proxy.cli_security import add_security_parsers, run_security, wants_local
from proxy.config import Config, ConfigError
from proxy.errors import ProxyError
from proxy.pipeline.services import Pipeline
from proxy.security.audit import ACTOR, Actor
from proxy.server.admin_ops import AdminOps, parse_min_release_age
from proxy.storage.catalog import VERSION_STATUSES

# --- administration: the twins of the admin API ----------------------------------------------------


def common_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--data-dir``: every subcommand takes them, after its name."""
    parser.add_argument("--config", type=Path, help="TOML config file (default: embedded default)")
    parser.add_argument("--data-dir", type=Path, help="data directory (index, blobs, tmp)")


@dataclass
class Outcome:
    """What an admin command says: the API's JSON (None for deletes, like its 204) and prose."""

    data: Any = None
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # on stderr, whatever the output format


Command = Callable[[AdminOps, argparse.Namespace], Awaitable[Outcome]]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def administer(config: Config, args: argparse.Namespace) -> int:
    """Run an admin command against the data directory; print its outcome; 0, 1 or 2."""
    try:
        outcome = asyncio.run(_administer(config, args))
    except ProxyError as exc:
        print(f"artifact-proxy: {exc.message}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"artifact-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"artifact-proxy: data directory {config.server.data_dir}: {exc}", file=sys.stderr)
        return 1
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        if outcome.data is not None:
            print(json.dumps(outcome.data, indent=2))
    else:
        for line in outcome.lines:
            print(line)
    return 0


async def _administer(config: Config, args: argparse.Namespace) -> Outcome:
    run: Command = args.run
    async with open_services(config) as pipeline:
        return await run(AdminOps(pipeline), args)


def administer_security(config: Config, args: argparse.Namespace) -> int:
    """Run a ``token`` or ``audit`` command (cli_security.py); print its outcome; 0, 1 or 2."""

    server = config.server
    args.default_endpoint = server.public_url or (
        f"{'https' if server.tls_cert else 'http'}://{server.host}:{server.port}"
    )

    async def go() -> tuple[Any, list[str]]:
        if not wants_local(args):
            return await run_security(None, args)
        async with open_services(config) as pipeline:
            return await run_security(pipeline, args)

    try:
        data, lines = asyncio.run(go())
    except ProxyError as exc:
        print(f"artifact-proxy: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error, aiohttp.ClientError) as exc:
        print(f"artifact-proxy: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        for line in lines:
            print(line)
    return 0


@contextlib.asynccontextmanager
async def open_services(config: Config) -> AsyncIterator[Pipeline]:
    """The services ``build_app`` wires, over the data directory, without HTTP or upstream clients.

    The data directory is not prepared the way ``serve`` prepares it: removing leftover temp
    files would cut off the downloads of a proxy running on it. The config seeds the index only
    when the index has no domain yet; after that the CLI shows and changes what the index holds,
    exactly as the running proxy sees it (which rewrites the config's repositories when it starts).
    """
    await asyncio.to_thread(config.server.data_dir.mkdir, parents=True, exist_ok=True)
    services = build_services(config, upstreams=False)
    pipeline = services.pipeline
    try:
        await services.index.open()
        if pipeline.registry.domains() or await _has_domains(services):
            await pipeline.registry.reload()
        else:
            await pipeline.registry.seed(config)
        # Audit records made here name the operator's account: the CLI acts with the data
        # directory's own authority, not a token's.
        ACTOR.set(Actor(f"cli:{getpass.getuser()}", "", "local"))
        yield pipeline
    finally:
        with contextlib.suppress(Exception):
            await pipeline.audit.flush()
        await services.flights.aclose()
        await services.documents.aclose()
        await services.index.close()
        await services.blobs.close()


async def _has_domains(services: Services) -> bool:
    await services.pipeline.registry.reload()
    return bool(services.pipeline.registry.domains())


def add_admin_parsers(sub: Subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common_options(common)
    common.add_argument("--json", action="store_true", help="print the admin API's JSON answer")

    def group(name: str, help: str) -> Subparsers:
        parser = sub.add_parser(name, help=help)
        actions: Subparsers = parser.add_subparsers(dest="action", required=True)
        return actions

    def leaf(actions: Subparsers, name: str, help: str, run: Command, *need: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, parents=[common], help=help)
        parser.set_defaults(run=run)
        for option in need:
            parser.add_argument(f"--{option}", required=True, help=_HELP.get(option))
        return parser

    add_security_parsers(sub, common)
    add_ops_parsers(sub, common)

    domain = group("domain", "list, create and delete domains")
    leaf(domain, "list", "list the domains", _domain_list)
    leaf(domain, "create", "create a domain", _domain_create, "name")
    leaf(domain, "delete", "delete a domain without repositories", _domain_delete, "name")

    repo = group("repo", "list, create, describe, change and delete repositories")
    leaf(repo, "list", "list a domain's repositories", _repo_list, "domain")
    create = leaf(repo, "create", "create a repository", _repo_create, "domain", "name")
    create.add_argument(
        "--upstream", action="extend", nargs="+", default=[], metavar="NAME", help=_HELP["upstream"]
    )
    create.add_argument("--description", default="", help="what the repository is for")
    create.add_argument("--min-release-age", type=_age, default=0.0, help=_HELP["min-release-age"])
    create.add_argument(
        "--allow-redeploy",
        action="store_true",
        help="let Maven release files be deployed again with other bytes (off: immutable)",
    )
    create.add_argument(
        "--anonymous-read", action="store_true", help="let clients without a token read the repository"
    )
    leaf(repo, "describe", "show a repository", _repo_describe, "domain", "name")
    upstreams = leaf(
        repo, "set-upstreams", "replace a repository's upstreams", _repo_upstreams, "domain", "name"
    )
    chosen = upstreams.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--upstream", action="extend", nargs="+", metavar="NAME", help=_HELP["upstream"])
    chosen.add_argument("--no-upstreams", action="store_true", help="leave the repository without upstreams")
    leaf(repo, "delete", "delete a repository and its rows", _repo_delete, "domain", "name")

    package = group("package", "list and describe packages; change, delete and copy versions")
    listing = leaf(package, "list", "list a repository's packages", _package_list, "domain", "repo")
    listing.add_argument("--format", help="only this format")
    where = ("domain", "repo", "format", "package")
    leaf(package, "describe", "show a package's versions and files", _package_describe, *where)
    status = leaf(package, "set-status", "set a version's status", _package_status, *where, "version")
    status.add_argument("--status", required=True, choices=VERSION_STATUSES)
    leaf(package, "delete", "delete a version and its files", _package_delete, *where, "version")
    leaf(package, "copy", "copy a version into another repository", _package_copy, *where, "version", "to")
    add_dependency_parsers(package, leaf)

    origin = group("origin", "package origin controls: where packages may come from")
    get = leaf(origin, "get", "list a repository's origin rules", _origin_get, "domain", "repo")
    get.add_argument("--format", help="only this format")
    rule = leaf(
        origin, "set", "set the rule for a package or prefix", _origin_set, "domain", "repo", "format"
    )
    rule.add_argument("--pattern", required=True, help=_HELP["pattern"])
    for switch in ("publish", "upstream"):
        rule.add_argument(
            f"--{switch}", choices=("ALLOW", "BLOCK"), default="ALLOW", help=_HELP[f"{switch}-switch"]
        )
    leaf(origin, "delete", "delete a rule", _origin_delete, "domain", "repo", "format", "pattern")

    quarantine = group("quarantine", "versions that are never served")
    entries = leaf(quarantine, "list", "list a repository's quarantine", _quarantine_list, "domain", "repo")
    entries.add_argument("--format", help="only this format")
    add = leaf(
        quarantine, "add", "quarantine a package or version", _quarantine_add, "domain", "repo", "format"
    )
    add.add_argument("--pattern", required=True, help="'package' or 'package@version' (wildcards allowed)")
    add.add_argument("--reason", default="", help="why (shown in the 404 clients get)")
    leaf(
        quarantine,
        "remove",
        "lift a quarantine entry",
        _quarantine_remove,
        "domain",
        "repo",
        "format",
        "pattern",
    )


_HELP = {
    "domain": "the domain",
    "name": "the name",
    "repo": "the repository",
    "format": "the package format (pypi)",
    "package": "the package name (made canonical: My_Pkg is my-pkg)",
    "version": "the version",
    "to": "the destination repository (same domain)",
    "pattern": "a package name, or a prefix ending in '*'",
    "upstream": "upstream repositories or connections, in resolution order",
    "min-release-age": "hide upstream versions younger than this: seconds or a duration such as 3d",
    "publish-switch": "may versions be published here (default ALLOW)",
    "upstream-switch": "may versions come from upstreams (default ALLOW)",
}


def _age(text: str) -> float:
    try:
        return parse_min_release_age(text)
    except ProxyError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


# --- the commands: call the operation, say what happened ----------------------------------------


async def _domain_list(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = ops.domains()
    lines = [
        f"{d['name']}  repositories: {', '.join(d['repositories']) or '(none)'}" for d in data["domains"]
    ]
    return Outcome(data, lines or ["no domains"])


async def _domain_create(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    return Outcome(await ops.create_domain(args.name), [f"created domain {args.name}"])


async def _domain_delete(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    await ops.delete_domain(args.name)
    return Outcome(None, [f"deleted domain {args.name}"])


async def _repo_list(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = ops.repositories(args.domain)
    lines = [_repo_line(r) for r in data["repositories"]]
    return Outcome(data, lines or [f"no repositories in domain {args.domain}"])


async def _repo_create(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = await ops.create_repository(
        args.domain,
        args.name,
        args.upstream,
        args.description,
        args.min_release_age,
        allow_redeploy=args.allow_redeploy,
        anonymous_read=args.anonymous_read,
    )
    return Outcome(data, [f"created {_repo_line(data)}"])


async def _repo_describe(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    r = ops.repository(args.domain, args.name)
    lines = [
        f"{r['domain']}/{r['name']}",
        f"  description:     {r['description'] or '-'}",
        f"  upstreams:       {', '.join(r['upstreams']) or '(none)'}",
        f"  min release age: {_duration(r['min_release_age'])}",
        f"  allow redeploy:  {'yes' if r['allow_redeploy'] else 'no'}",
        f"  anonymous read:  {'yes' if r['anonymous_read'] else 'no'}",
        f"  downstreams:     {', '.join(r['downstreams']) or '(none)'}",
        f"  defined in:      {'the config file' if r['from_config'] else 'the index (API or CLI)'}",
    ]
    return Outcome(r, lines)


async def _repo_upstreams(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = await ops.set_upstreams(args.domain, args.name, [] if args.no_upstreams else args.upstream)
    return Outcome(data, [f"changed {_repo_line(data)}"], _config_note(ops, args, "change it"))


async def _repo_delete(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    await ops.delete_repository(args.domain, args.name)
    return Outcome(
        None, [f"deleted repository {args.domain}/{args.name}"], _config_note(ops, args, "deletion")
    )


async def _package_list(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = await ops.packages(args.domain, args.repo, args.format)
    lines = [f"{p['format']}  {p['package']}  ({p['origin']})" for p in data["packages"]]
    return Outcome(data, lines or [f"no packages in {args.domain}/{args.repo}"])


async def _package_describe(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    d = await ops.package(args.domain, args.repo, args.format, args.package)
    origin = d["origin"]
    lines = [
        f"{d['format']} {d['package']} in {d['domain']}/{d['repository']}",
        f"  origin rule: {origin['rule'] or '(none)'}",
        f"  upstream versions: {origin['upstream_blocked'] or 'allowed'}",
        f"  publishing: {origin['publish_blocked'] or 'allowed'}",
    ]
    for v in d["versions"]:
        lines.append(f"  {v['version']}  {v['status']}  ({v['origin']})")
        lines += [
            f"      {a['filename']}  {a['size']} bytes  sha256:{a['sha256']}" for a in v.get("assets", [])
        ]
    return Outcome(d, lines)


async def _package_status(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = await ops.set_status(args.domain, args.repo, args.format, args.package, args.version, args.status)
    return Outcome(data, [f"{data['package']} {data['version']} is now {data['status']}"])


async def _package_delete(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    await ops.delete_version(args.domain, args.repo, args.format, args.package, args.version)
    return Outcome(None, [f"deleted {args.package} {args.version} from {args.domain}/{args.repo}"])


async def _package_copy(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = await ops.copy_version(args.domain, args.repo, args.format, args.package, args.version, args.to)
    return Outcome(data, [f"copied {data['package']} {data['version']} from {args.repo} to {args.to}"])


async def _origin_get(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = await ops.origin_rules(args.domain, args.repo, args.format)
    lines = [_rule_line(r) for r in data["rules"]]
    return Outcome(data, lines or [f"no origin rules in {args.domain}/{args.repo}"])


async def _origin_set(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = await ops.put_origin_rule(
        args.domain, args.repo, args.format, args.pattern, args.publish, args.upstream
    )
    return Outcome(data, [f"set {_rule_line(data)}"])


async def _origin_delete(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    await ops.delete_origin_rule(args.domain, args.repo, args.format, args.pattern)
    return Outcome(None, [f"deleted origin rule {args.pattern}"])


async def _quarantine_list(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = await ops.quarantine(args.domain, args.repo, args.format)
    lines = [_quarantine_line(e) for e in data["entries"]]
    return Outcome(data, lines or [f"nothing quarantined in {args.domain}/{args.repo}"])


async def _quarantine_add(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    data = await ops.put_quarantine(args.domain, args.repo, args.format, args.pattern, args.reason)
    dependents = data.get("dependents", {}).get("dependents", [])
    lines = [f"quarantined {_quarantine_line(data)}"]
    if dependents:
        lines += ["held versions that depend on it:"] + [f"  {dependent_line(e)}" for e in dependents]
    return Outcome(data, lines)


async def _quarantine_remove(ops: AdminOps, args: argparse.Namespace) -> Outcome:
    await ops.delete_quarantine(args.domain, args.repo, args.format, args.pattern)
    return Outcome(None, [f"lifted quarantine {args.pattern}"])


def _repo_line(r: dict[str, Any]) -> str:
    line = f"{r['domain']}/{r['name']} <- {', '.join(r['upstreams']) or '(no upstreams)'}"
    if r["min_release_age"]:
        line += f"  [min release age {_duration(r['min_release_age'])}]"
    return line + (f"  {r['description']}" if r["description"] else "")


def _rule_line(r: dict[str, Any]) -> str:
    return f"{r['format']}  {r['pattern']}  publish={r['publish']}  upstream={r['upstream']}"


def _quarantine_line(e: dict[str, Any]) -> str:
    return f"{e['format']}  {e['pattern']}" + (f"  ({e['reason']})" if e["reason"] else "")


def _duration(seconds: float) -> str:
    if not seconds:
        return "none"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _config_note(ops: AdminOps, args: argparse.Namespace, what: str) -> list[str]:
    if not ops.from_config(args.domain, args.name):
        return []
    return [
        f"{args.domain}/{args.name} is defined in the config file, and the proxy restores it from "
        f"the file when it starts: {what} there too"
    ]
