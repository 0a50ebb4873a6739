"""``artifact-proxy cluster migrate``: a single node's data directory into a cluster (issue #12).

The target is the config's: ``[index] url`` (or ``--index-url``, or ``ARTIFACT_PROXY_INDEX_URL``)
and ``[storage]`` with ``backend = "s3"``; S3 credentials come from the standard AWS variables,
and the encryption key (when the source's blobs are sealed) from the config's ``server.encryption_key_*``.
The work is storage/migrate.py's. Exit codes: 0 done, 1 refused or failed (the reason on
stderr), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import TypeAlias

import asyncpg

from proxy.cli_admin import common_options
from proxy.config import Config, ConfigError, parse_index
from proxy.errors import ProxyError
from proxy.storage.migrate import SKIPPED_TABLES, MigrationError, MigrationReport, migrate

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_cluster_parsers(sub: Subparsers) -> None:
    cluster = sub.add_parser("cluster", help="scale-out: move a single node into a cluster")
    actions: Subparsers = cluster.add_subparsers(dest="action", required=True)
    run = actions.add_parser(
        "migrate",
        help="copy a single node's data directory into the config's PostgreSQL index and bucket",
        description=(
            "Copies every referenced blob (hash-checked) into the bucket first, then every index "
            "row in one PostgreSQL transaction. The source must not be in use; the target index "
            "must be empty unless --merge. Safe to run again after a crash."
        ),
    )
    common_options(run)
    run.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        metavar="DATA_DIR",
        help="the single node's data directory (index.sqlite3, blobs/)",
    )
    run.add_argument("--index-url", help="postgresql://… (default: the config's [index] url)")
    run.add_argument(
        "--merge",
        action="store_true",
        help="the target may hold rows: add what is absent, overwrite nothing, report conflicts",
    )
    run.add_argument("--dry-run", action="store_true", help="check and count; write nothing")
    run.add_argument("--concurrency", type=int, default=4, help="blob uploads at a time (default 4)")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.set_defaults(cluster=run_migrate)


def run_migrate(config: Config, args: argparse.Namespace) -> int:
    from proxy.app import build_sealer

    try:
        index_url = parse_index({"url": args.index_url}, {}).url if args.index_url else config.index.url
        if index_url is None:
            raise ConfigError("no target index: set [index] url in the config, or pass --index-url")
        sealer = build_sealer(config.server, os.environ)
    except ConfigError as exc:
        print(f"artifact-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    progress = None
    if not args.json:
        from proxy.cli_ops import _progress

        progress = _progress("blobs")
    try:
        report = asyncio.run(
            migrate(
                args.source,
                index_url,
                config.storage,
                os.environ,
                sealer,
                merge=args.merge,
                dry_run=args.dry_run,
                concurrency=max(1, args.concurrency),
                progress=progress,
            )
        )
    except MigrationError as exc:
        print(f"artifact-proxy: {exc}", file=sys.stderr)
        return 1
    except ProxyError as exc:  # the object store's trouble (StorageUnavailable), say
        print(f"artifact-proxy: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error, asyncpg.PostgresError) as exc:
        print(f"artifact-proxy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for note in notes(report):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for line in summary(report):
            print(line)
    return 0


def notes(report: MigrationReport) -> list[str]:
    """What went wrong without stopping the migration: said on stderr, whatever the format."""
    out = [f"corrupt blob {d}: its rows were not migrated" for d in report.corrupt]
    out += [f"missing blob {d}: its rows were not migrated" for d in report.missing]
    out += [f"published file lost (republish it): {name}" for name in report.hosted_lost]
    out += [
        f"conflict: {c['asset']} is sha256:{c['target_digest']} in the target, "
        f"sha256:{c['source_digest']} in the source (the target's kept)"
        for c in report.conflicts
    ]
    if report.audit_not_merged:
        out.append(f"audit: {report.audit_not_merged}")
    return out


def summary(report: MigrationReport) -> list[str]:
    verb = "would migrate" if report.dry_run else "migrated"
    lines = [f"{verb} {report.source} into {report.index} and {report.bucket}"]
    for name, count in report.tables.items():
        extra = [
            f"{n} {what}"
            for n, what in (
                (count.present, "already there"),
                (count.skipped, "skipped (bad blob)"),
                (count.not_merged, "not merged"),
            )
            if n
        ]
        lines.append(f"  {name:<20} {count.copied:>8} row(s)" + (f"  ({', '.join(extra)})" if extra else ""))
    lines.append(f"  not migrated: {', '.join(SKIPPED_TABLES)} (a cluster's own runtime state)")
    lines.append(
        f"blobs: {report.blobs_referenced} referenced, {report.blobs_copied} "
        f"{'to copy' if report.dry_run else 'copied'} ({_size(report.bytes_copied)}), "
        f"{report.blobs_present} already in the bucket, {len(report.corrupt)} corrupt, "
        f"{len(report.missing)} missing"
    )
    lines.append(f"done in {report.seconds:.1f} s")
    return lines


def _size(n: int) -> str:
    from proxy.cli_ops import _size as size

    return size(n)
