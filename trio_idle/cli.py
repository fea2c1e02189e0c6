"""``trio-idle`` command line. Exit codes: 0 ok, 1 runtime failure, 2 configuration error."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence

import trio
from loguru import logger

from trio_idle import __version__
from trio_idle.config import OPTIONS, ConfigError, Settings, parse_settings
from trio_idle.daemon import ConnectionSource, Daemon, run_daemon
from trio_idle.logs import setup_logging
from trio_idle.source_file import FileSource
from trio_idle.source_postgres import PostgresSource

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-idle",
        description="Hold one IMAP IDLE session per mailbox and POST a scan webhook on new mail.",
    )
    parser.add_argument("--version", action="version", version=f"trio-idle {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon. Every flag has an environment variable; flags win. "
        "Secrets (ADMIN_SECRET, ENCRYPTION_KEY, DATABASE_URL's password, "
        "TRIO_IDLE_SIGNING_SECRET) are read from the environment only.",
    )
    for option in OPTIONS:
        if option.flag is None or option.secret:
            continue
        default = (
            f" (default: {option.default})" if option.default and len(option.default) < 40 else ""
        )
        serve.add_argument(
            option.flag,
            dest=option.field,
            metavar=option.env,
            help=f"{option.help}{default}; env {option.env}",
        )
    demo = commands.add_parser(
        "demo",
        help="run the whole loop locally: test IMAP server, scanning backend, daemon",
        description="Start, in one process, a test IMAP server with demo mailboxes, a small "
        "backend that blocks gambling mail, and the daemon; deliver a few messages, show the "
        "daemon's log lines and a summary, and exit 0.",
    )
    demo.add_argument("--forever", action="store_true",
                      help="keep running so you can deliver mail yourself (Ctrl-C to stop)")
    return parser


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    overrides: dict[str, str] = {}
    for option in OPTIONS:
        value = getattr(args, option.field, None)
        if value is not None:
            overrides[option.field] = value
    return parse_settings(env, overrides)


def make_source(settings: Settings) -> ConnectionSource:
    if settings.source == "file":
        assert settings.connections_file is not None
        return FileSource(settings.connections_file)
    assert settings.database_url is not None
    return PostgresSource(settings.database_url, settings.connections_query, settings.db_timeout)


async def serve(settings: Settings) -> None:
    """Run the daemon until SIGTERM/SIGINT; SIGHUP refreshes the connection list now."""
    source = make_source(settings)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run_daemon, settings, source)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    logger.info("[idle/daemon] SIGHUP: refreshing the connection list")
                    daemon.request_refresh()
                    continue
                if daemon.stopping:  # second signal: stop waiting for LOGOUTs
                    nursery.cancel_scope.cancel()
                    break
                daemon.shutdown(signal.Signals(signum).name)
                # keep listening (a second signal cuts shutdown short) until the daemon ends
                nursery.start_soon(_stop_listening_when_done, nursery, daemon)


async def _stop_listening_when_done(nursery: trio.Nursery, daemon: Daemon) -> None:
    await daemon.stopped.wait()
    nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    if args.command == "demo":
        from trio_idle.demo import run_demo  # the demo pulls in the test server

        return run_demo(forever=args.forever)
    try:
        settings = settings_from_args(args, env)
    except ConfigError as exc:
        print(f"trio-idle: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        logger.info(
            f"[idle/daemon] trio-idle {__version__} starting "
            f"(source={settings.source}, backend={settings.scan_url})"
        )
        trio.run(serve, settings)
        return 0
    parser.error(f"unknown command {args.command}")
    return EXIT_CONFIG  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
