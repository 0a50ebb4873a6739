"""``artifact-proxy gc|verify|stats``: bound, check and measure the cache (storage/lifecycle.py).

They work on the data directory, and are safe while the proxy runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from proxy.config import ConfigError, parse_duration, parse_size
from proxy.errors import BadRequest, Conflict, ProxyError
from proxy.model import Digest, RepoRef
from proxy.pipeline.services import Pipeline
from proxy.storage import bundle, lifecycle
from proxy.storage.index import Index
from proxy.storage.leases import LeaseBusy, node_id
from proxy.warm import read_pins, summary, warm


def add_ops_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    gc = sub.add_parser(
        "gc", parents=[common], help="evict least recently used cached assets to a size budget"
    )
    gc.add_argument("--max-size", required=True, help="budget for the blob store, e.g. 50GiB")
    gc.add_argument("--dry-run", action="store_true", help="say what would be evicted")
    gc.set_defaults(security=_gc)
    verify = sub.add_parser("verify", parents=[common], help="re-hash every blob; find missing ones")
    verify.add_argument("--repair", action="store_true", help="quarantine corrupt blobs, drop their rows")
    verify.set_defaults(security=_verify)
    for command in (gc, verify):
        command.add_argument(
            "--wait",
            nargs="?",
            const="1h",
            metavar="DURATION",
            help="when another process runs gc or verify --repair, wait for it (default 1h) "
            "instead of failing",
        )
    stats = sub.add_parser("stats", parents=[common], help="usage per repository and format")
    stats.set_defaults(security=_stats)
    warm = sub.add_parser("warm", parents=[common], help="fetch everything lockfiles pin into the cache")
    warm.add_argument("--domain", required=True)
    warm.add_argument("--repo", required=True)
    warm.add_argument(
        "--endpoint", help="the proxy's URL (default: server.public_url, else its listen address)"
    )
    warm.add_argument("--concurrency", type=int, default=8, help="downloads at a time (default 8)")
    warm.add_argument("files", nargs="+", type=Path, help="requirements.txt, uv.lock, package-lock.json, …")
    warm.set_defaults(security=_warm, remote=True)
    export = sub.add_parser("export", parents=[common], help="write a repository to a bundle for an air gap")
    export.add_argument("--domain", required=True)
    export.add_argument("--repo", required=True)
    export.add_argument("--since", help="only assets cached or published since (ISO-8601 or a duration)")
    export.add_argument("--sign-key-env", help="sign with the HMAC key in this environment variable")
    export.add_argument("bundle", type=Path)
    export.set_defaults(security=_export)
    imp = sub.add_parser("import", parents=[common], help="load a bundle (every digest checked)")
    imp.add_argument("--verify-key-env", help="require a signature by the HMAC key in this variable")
    imp.add_argument("bundle", type=Path)
    imp.set_defaults(security=_import)


async def _gc(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    assert pipeline is not None
    try:
        budget = parse_size(args.max_size, "--max-size")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from exc
    index = pipeline.resolver.index
    if args.dry_run:  # changes nothing: needs no turn
        report = await lifecycle.gc(index, pipeline.blobs, budget, dry_run=True)
    else:
        async with _gc_turn(index, args):
            report = await lifecycle.gc(index, pipeline.blobs, budget)
    if not args.dry_run:
        pipeline.audit.record(
            "gc", detail={"evicted": len(report.evicted), "blobs_deleted": report.blobs_deleted}
        )
    verb = "would evict" if args.dry_run else "evicted"
    lines = [f"{verb} {e['repository']} {e['format']} {e['package']} {e['filename']}" for e in report.evicted]
    lines.append(
        f"blob store: {_size(report.before)} -> {_size(report.after)} (budget {_size(budget)}); "
        f"{len(report.evicted)} cached asset(s) {verb}, {report.blobs_deleted} blob(s) "
        f"{'to delete' if args.dry_run else 'deleted'}"
    )
    data = {
        "before": report.before,
        "after": report.after,
        "budget": budget,
        "evicted": report.evicted,
        "blobs_deleted": report.blobs_deleted,
        "dry_run": args.dry_run,
    }
    return data, lines


async def _verify(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    assert pipeline is not None
    data_dir = pipeline.config.server.data_dir
    index = pipeline.resolver.index
    if args.repair:
        async with _gc_turn(index, args):
            report = await lifecycle.verify(index, pipeline.blobs, data_dir, repair=True)
    else:
        report = await lifecycle.verify(index, pipeline.blobs, data_dir)
    lines = [f"corrupt blob {d}" for d in report.corrupt] + [f"missing blob {d}" for d in report.missing]
    lines += [f"hosted file lost (republish it): {name}" for name in report.hosted_lost]
    lines += [f"corrupt cached copy of {d} replaced from the object store" for d in report.replaced]
    lines.append(
        f"checked {report.checked} blob(s): {len(report.corrupt)} corrupt, {len(report.missing)} missing"
        + (f"; removed {report.rows_removed} index row(s)" if args.repair else "")
    )
    if args.repair:
        pipeline.audit.record("verify", detail={"corrupt": report.corrupt, "missing": report.missing})
    data = {
        "checked": report.checked,
        "corrupt": report.corrupt,
        "missing": report.missing,
        "rows_removed": report.rows_removed,
        "hosted_lost": report.hosted_lost,
    }
    return data, lines


@contextlib.asynccontextmanager
async def _gc_turn(index: Index, args: argparse.Namespace) -> AsyncIterator[None]:
    """The ``gc`` lease for this run: one gc or verify --repair at a time among every process
    sharing the index (storage/lifecycle.py); Conflict (exit 1) naming the holder otherwise."""
    try:
        wait = parse_duration(args.wait, "--wait") if args.wait else 0.0
    except ConfigError as exc:
        raise BadRequest(str(exc)) from exc
    try:
        async with lifecycle.gc_lease(index, node_id(), wait=wait):
            yield
    except LeaseBusy as busy:
        waited = f" (waited {args.wait})" if wait else ""
        raise Conflict(
            f"another node is running gc or verify --repair (holder {busy.info.holder}){waited}; "
            "try again later or pass --wait"
        ) from None


async def _stats(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    assert pipeline is not None
    data = await lifecycle.stats(pipeline.resolver.index, pipeline.blobs)
    lines = [
        f"{r['repository']:<28} {r['format']:<6} hosted {r['hosted_files']:>6}  "
        f"cached {r['cached_files']:>6}  {_size(r['bytes'])}"
        for r in data["repositories"]
    ]
    lines.append(f"blob store: {data['blobs']} blob(s), {_size(data['blob_bytes'])}")
    return data, lines


async def _warm(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    pins = []
    for path in args.files:
        try:
            pins += await asyncio.to_thread(read_pins, path)
        except (OSError, ValueError) as exc:
            raise BadRequest(str(exc)) from exc
    endpoint = args.endpoint or args.default_endpoint
    token = next(
        (os.environ[n] for n in ("ARTIFACT_PROXY_TOKEN", "ARTIFACT_PROXY_ADMIN_TOKEN") if os.environ.get(n)),
        None,
    )
    result = await warm(
        endpoint, args.domain, args.repo, pins, token=token, concurrency=max(1, args.concurrency)
    )
    data = {"pins": len(pins), "artifacts": result.fetched, "failed": result.failed}
    if result.failed:
        for line in summary(result, len(pins)):
            print(line, file=sys.stderr)
        raise ProxyError(f"{len(result.failed)} of {len(pins)} pinned package(s) could not be warmed")
    return data, summary(result, len(pins))


def _key(env_name: str | None) -> bytes | None:
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise BadRequest(f"{env_name} is not set")
    return value.encode()


def _progress(what: str) -> Callable[[int, int], None]:
    """A progress bar on stderr (tqdm; nothing when stderr is not a terminal).

    tqdm is imported here, not with the module, so that ``serve`` processes do not hold it
    (about 2 MB each); importing reads files, so async callers call this from a thread.
    """
    from tqdm import tqdm

    bar: tqdm[Any] | None = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="blob", desc=what, file=sys.stderr, disable=None)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return show


async def _export(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    assert pipeline is not None
    ref = RepoRef(args.domain, args.repo)
    pipeline.registry.repository(ref)
    since = _since(args.since) if args.since else None
    manifest, bodies = await bundle.collect(pipeline.resolver.index, ref, _connections(pipeline, ref), since)
    key = _key(args.sign_key_env)
    for asset in manifest["assets"]:  # on this node's disk first (an object store's blobs)
        await pipeline.blobs.locate(Digest(asset["digest"]))
    progress = await asyncio.to_thread(_progress, "blobs")
    await asyncio.to_thread(bundle.write_bundle, args.bundle, manifest, bodies, pipeline.blobs, key, progress)
    pipeline.audit.record(
        "export", domain=ref.domain, repository=ref.repository, detail={"bundle": str(args.bundle)}
    )
    counts = {"assets": len(manifest["assets"]), "documents": len(manifest["documents"])}
    return {**counts, "signed": key is not None, "path": str(args.bundle)}, [
        f"wrote {args.bundle}: {counts['assets']} asset(s), {counts['documents']} document(s)"
        + (", signed" if key else "")
    ]


async def _import(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    assert pipeline is not None
    try:
        manifest = await asyncio.to_thread(bundle.read_manifest, args.bundle, _key(args.verify_key_env))
        ref = RepoRef(manifest["domain"], manifest["repository"])
        pipeline.registry.repository(ref)
        staging = pipeline.publisher.staging
        await asyncio.to_thread(staging.root.mkdir, parents=True, exist_ok=True)  # a fresh data dir
        await asyncio.to_thread(pipeline.blobs.prepare)
        progress = await asyncio.to_thread(_progress, "blobs")
        counts = await bundle.import_bundle(
            args.bundle, manifest, pipeline.resolver.index, pipeline.blobs, staging, progress
        )
    except (bundle.BundleError, tarfile.TarError, OSError) as exc:
        raise ProxyError(f"{args.bundle} rejected: {exc}") from exc
    pipeline.audit.record("import", domain=ref.domain, repository=ref.repository, detail=counts)
    return counts, [
        f"imported into {ref.domain}/{ref.repository}: {counts['assets']} asset(s), "
        f"{counts['blobs']} blob(s), {counts['documents']} document(s), every digest checked"
    ]


def _connections(pipeline: Pipeline, ref: RepoRef) -> list[str]:
    """The external connections along a repository's chain."""
    found: list[str] = []
    domain = pipeline.registry.domain(ref.domain)
    assert domain is not None
    stack = [ref.repository]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        repo = domain.repository(name)
        if repo is None:
            if name not in found:
                found.append(name)
            continue
        stack.extend(reversed(repo.upstreams))
    return found


def _since(text: str) -> float:
    import datetime

    try:
        return time.time() - parse_duration(text, "--since")
    except ConfigError:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
