"""``artifact-proxy`` subcommands: parse arguments, call services, print.

Every subcommand takes ``--config`` and ``--data-dir`` after its name, so scripts and containers
can use the same options everywhere. Flags win over ``ARTIFACT_PROXY_*`` variables, which win
over the file.
The administration commands live in cli_admin.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from proxy import __version__
from proxy.cli_admin import add_admin_parsers, administer, administer_security, common_options
from proxy.cli_cluster import add_cluster_parsers
from proxy.config import Config, ConfigError, Overrides, load_config
from proxy.server.workers import WorkerRole, become_worker, default_count, supervise

log = logging.getLogger("proxy.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="artifact-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"artifact-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    common_options(serve)
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8080)")
    serve.add_argument("--offline", action="store_true", default=None, help="never contact upstreams")
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate chain (PEM)")
    serve.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    serve.add_argument("--log-level", default=os.environ.get("ARTIFACT_PROXY_LOG_LEVEL", "INFO"))
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("ARTIFACT_PROXY_LOG_FORMAT", "text"),
        help="text lines, or one JSON object per line (access lines with their fields)",
    )
    serve.add_argument(
        "--workers",
        type=_worker_count,  # applied to the variable's value too: a bad one is a usage error
        default=os.environ.get("ARTIFACT_PROXY_WORKERS") or None,
        help="processes serving the port (default: the number of CPUs; 1: a single process)",
    )
    serve.add_argument("--worker", type=WorkerRole.parse, help=argparse.SUPPRESS)  # set by the supervisor

    check = sub.add_parser("check-config", help="validate the configuration and print it")
    common_options(check)
    add_admin_parsers(sub)
    add_cluster_parsers(sub)
    return parser


def _worker_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes (1 or more), got {value!r}")
    return count


def load(args: argparse.Namespace) -> Config:
    flags = Overrides(
        config_file=args.config,
        listen=getattr(args, "listen", None),
        data_dir=args.data_dir,
        offline=getattr(args, "offline", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
    )
    return load_config(flags.over(Overrides.from_env(os.environ)), os.environ)


def serve(
    config: Config,
    log_level: str,
    log_format: str = "text",
    reload_config: Callable[[], Config] | None = None,
    worker: WorkerRole | None = None,
) -> int:
    from proxy.app import build_app
    from proxy.observability import AccessLogger, setup_logging

    setup_logging(log_level, log_format)
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    for name, upstream in config.upstreams.items():
        log.info("upstream %s (%s): %s", name, upstream.format, upstream.url)
    for note in config.notes:
        log.warning("%s", note)
    ssl_context = None
    if config.server.tls_cert is not None and config.server.tls_key is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
    status = 1
    try:
        web.run_app(
            build_app(config, reload_config=reload_config, worker=worker),
            host=config.server.host,
            port=config.server.port,
            reuse_port=worker is not None,
            ssl_context=ssl_context,
            access_log_class=AccessLogger,
            shutdown_timeout=config.server.shutdown_timeout,
            keepalive_timeout=config.server.client_timeout,
            print=lambda text: log.info("%s", text.strip()),
            loop=loop,
        )
        status = 0
    except ConnectionError as exc:  # the cluster's index database never answered (no traceback)
        print(f"artifact-proxy: {exc}", file=sys.stderr)
    except Exception:
        if worker is None:
            raise
        log.exception("worker %d failed", worker.index)  # printed here: os._exit skips it
    finally:
        if worker is not None:
            # A SIGTERM that lands while the app is still starting ends run_app before the
            # cleanup that closes the index, and its SQLite thread would keep the process
            # alive forever; a worker has nothing left to do once run_app returns.
            logging.shutdown()
            os._exit(status)
        else:
            # A single process stopped while starting (run_app ends before the cleanup that
            # closes the index) would wait for ever on the index's non-daemon thread, as a worker
            # would; whatever such threads are left once run_app returns have nothing to do.
            left = [
                t.name
                for t in threading.enumerate()
                if t.is_alive() and not t.daemon and t is not threading.main_thread()
            ]
            if left:
                log.info("exiting without waiting for threads: %s", ", ".join(left))
                logging.shutdown()
                os._exit(status)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(args)
    except ConfigError as exc:
        print(f"artifact-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        if args.worker is not None:
            become_worker()
        elif (args.workers or default_count()) > 1:
            from proxy.observability import setup_logging

            setup_logging(args.log_level, args.log_format)
            return supervise(
                config, list(sys.argv[1:] if argv is None else argv), args.workers or default_count()
            )
        return serve(
            config, args.log_level, args.log_format, reload_config=lambda: load(args), worker=args.worker
        )
    if getattr(args, "cluster", None) is not None:
        return int(args.cluster(config, args))
    if getattr(args, "security", None) is not None:
        return administer_security(config, args)
    if getattr(args, "run", None) is not None:
        return administer(config, args)
    if args.command == "check-config":
        print(f"listen {config.server.host}:{config.server.port}, data in {config.server.data_dir}")
        for name, up in config.upstreams.items():
            print(f"upstream {name}: {up.format} {up.url}")
        for domain in config.domains:
            for repo in domain.repositories:
                print(f"repository {domain.name}/{repo.name} <- {', '.join(repo.upstreams) or '(none)'}")
        return 0
    return 2
