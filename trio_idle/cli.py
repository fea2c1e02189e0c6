"""``trio-idle`` command line. Exit codes: 0 ok, 1 runtime failure, 2 configuration error.

Commands: ``serve`` (``--once``: connect everything once, report, exit), ``check``
(validate the configuration and every row, ``--login`` tries each IMAP login),
``encrypt`` (secret on stdin → token), ``decrypt --check`` (tokens on stdin → do they
decrypt; plaintext is never printed), ``status`` (the running daemon's ``/status`` as a
table; exit 3 when it is unreachable) and ``demo``. ``--log-level``/``--log-format`` work
for every command that logs, and ``--env-file PATH`` (systemd's EnvironmentFile= syntax,
:mod:`trio_idle.core.env_file`) for every command but ``demo``. Secrets are never taken
from argv. A failure inside trio is reported by the exceptions inside its exception group.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Container, Mapping, Sequence
from typing import Any, Final

import trio
from loguru import logger

from trio_idle import __version__
from trio_idle.accounts.source_file import FileSource
from trio_idle.accounts.source_postgres import PostgresSource
from trio_idle.cluster.listener import CHANNEL, TRIGGER, NotifySql, run_notify_script
from trio_idle.cluster.membership import MEMBERSHIP_TABLE, PostgresMembership
from trio_idle.core.config import (
    GROUPS,
    OPTIONS,
    ConfigError,
    Settings,
    parse_settings,
    process_secrets,
)
from trio_idle.core.env_file import EnvFileError, read_env_file, shown_key
from trio_idle.core.errors import EXIT_CONFIG, describe, leaf_exceptions
from trio_idle.core.logs import protect_secrets, setup_logging, traceback_frames
from trio_idle.core.scrub import Scrubber, redact_url, url_secrets
from trio_idle.imap.asyncio_loop import open_asyncio_loop
from trio_idle.oauth_commands import (
    OAUTH_FIELDS,
    add_oauth_parser,
    required_settings,
    run_oauth_command,
)
from trio_idle.operator_commands import (
    DEFAULT_CHECK_CONCURRENCY,
    decrypt_check_command,
    encrypt_command,
    once_report,
    run_check,
    wait_for_first_outcomes,
)
from trio_idle.ops.status_client import (
    StatusUnavailable,
    fetch_status,
    format_unavailable,
    render,
    status_url,
    verdict,
)
from trio_idle.runtime.daemon import Daemon, run_daemon
from trio_idle.runtime.refresher import ConnectionSource
from trio_idle.runtime.supervision import StartupError
from trio_idle.state.postgres import PostgresBackend
from trio_idle.state.tables import POSTGRES_MIGRATIONS

#: the ``trio-idle db`` actions
DB_ACTIONS = ("migrate", "install-notify", "remove-notify")
EXIT_FAILURE = 1
#: the settings every command that logs takes
LOG_FIELDS = frozenset({"log_level", "log_format", "log_email"})
#: the settings the crypto commands take (they need nothing else)
CRYPTO_FIELDS = frozenset({"key_derivation"}) | LOG_FIELDS
#: the settings ``trio-idle db`` takes
DB_FIELDS = frozenset({"db_timeout", "notify_table"}) | LOG_FIELDS
STATUS_FIELDS = frozenset({"health_addr", "status_addr"}) | LOG_FIELDS
#: the settings ``check`` reads: the connection list, what a LOGIN needs (IMAP, its
#: timers, OAuth2 tokens from the backend or the provider, rotated ones in the state
#: store); not the daemon's health port, scans, cluster or garbage collection
CHECK_FIELDS = (
    frozenset(o.field for o in OPTIONS if o.group in {"connections", "imap", "oauth"})
    | frozenset({"connect_timeout", "command_timeout", "logout_timeout", "connect_rate"})
    | frozenset({"backend_url", "secret_header", "token_path", "token_timeout"})
    | frozenset({"token_refresh_ahead", "http_trust_env", "state", "state_path"})
    | frozenset({"db_timeout", "node_env"})
    | LOG_FIELDS
)


def _group_title(name: str) -> str:
    """A settings group's heading: the first sentence of its docstring."""
    doc = inspect.cleandoc(GROUPS[name].__doc__ or name)
    return " ".join(doc.split("\n\n")[0].split()).removesuffix(".")


def _add_setting_flags(parser: argparse.ArgumentParser, only: Container[str] | None = None) -> None:
    """One flag per non-secret setting (``only``: restrict to these fields), under one
    heading per settings group, so ``--help`` lists what the command reads, grouped."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        if option.flag is None or option.secret:
            continue
        if only is not None and option.field not in only:
            continue
        if option.group not in sections:
            sections[option.group] = parser.add_argument_group(_group_title(option.group))
        default = (
            f" (default: {option.default})" if option.default and len(option.default) < 40 else ""
        )
        text = f"{option.help}{default}; env {option.env}"
        sections[option.group].add_argument(
            option.flag,
            dest=option.field,
            metavar=option.env,
            # argparse %-formats help texts: a literal '%' in a help or default would crash
            # --help, so escape whatever the table says
            help=text.replace("%", "%%"),
        )


def _add_env_file_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="read variables from this file first, with systemd's EnvironmentFile= rules "
        "(no $ expansion, quotes and backslashes as systemd reads them; docs/operations.md); "
        "its values win over the environment, flags win over both",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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
        f"Secrets ({', '.join(o.env for o in OPTIONS if o.secret)}) are read from the "
        "environment only (argv is visible in ps).",
    )
    _add_setting_flags(serve)
    serve.add_argument(
        "--once",
        action="store_true",
        help="start every session of the first refresh, wait until each has connected or "
        "failed once, print a report, shut down; exit 0 if all connected, else 1",
    )
    check = commands.add_parser(
        "check",
        help="validate the configuration and every connection (optionally log in)",
        description="Validate the configuration, read the connection source, decrypt every "
        "row and (with --login) try an IMAP LOGIN per connection. Prints a table; exit 1 if "
        "anything failed. No secret is printed.",
    )
    _add_setting_flags(check, CHECK_FIELDS)
    check.add_argument("--login", action="store_true", help="also try LOGIN (then LOGOUT)")
    check.add_argument(
        "--concurrency",
        type=_positive,
        default=DEFAULT_CHECK_CONCURRENCY,
        metavar="N",
        help=f"logins in progress at once (default: {DEFAULT_CHECK_CONCURRENCY})",
    )
    encrypt = commands.add_parser(
        "encrypt",
        help="encrypt an IMAP password (stdin or prompt) into an iv:tag:ciphertext token",
        description="Read a password from stdin (one trailing newline removed) or, on a "
        "terminal, from a no-echo prompt, and print the token the backend stores. Needs "
        "ENCRYPTION_KEY only. The password is never taken from the command line.",
    )
    _add_setting_flags(encrypt, CRYPTO_FIELDS)
    encrypt.add_argument(
        "--iv-size",
        type=int,
        choices=(12, 16),
        default=16,
        help="IV length in bytes (default 16, like the Node backend)",
    )
    decrypt = commands.add_parser(
        "decrypt",
        help="check that tokens decrypt (--check); never prints passwords",
        description="With --check: read tokens from stdin, one per line (optionally "
        "'LABEL TOKEN'), and report for each whether it decrypts with ENCRYPTION_KEY. "
        "Plaintext passwords are never printed, so --check is required.",
    )
    _add_setting_flags(decrypt, CRYPTO_FIELDS)
    decrypt.add_argument("--check", action="store_true", help="report only (required)")
    db = commands.add_parser(
        "db",
        help="database maintenance (the shared Postgres state store)",
        description="`trio-idle db migrate` creates the tables of the Postgres state store "
        "(TRIO_IDLE_STATE=postgres: mailbox state, rotated OAuth2 refresh tokens) and the "
        "membership table of shared mode in the DATABASE_URL database. `db install-notify` "
        "adds a trigger on the connection table (TRIO_IDLE_NOTIFY_TABLE) that NOTIFYs "
        "the daemons' listeners (TRIO_IDLE_LISTEN_URL) of every change; `db remove-notify` "
        "drops it again. Each is safe to run again.",
    )
    db.add_argument("action", choices=DB_ACTIONS, help="what to do")
    _add_setting_flags(db, DB_FIELDS)
    status = commands.add_parser(
        "status",
        help="the running daemon's /status as a table (exit 0 ok, 1 not ok, 2 config, 3 "
        "unreachable)",
        description="Ask the running daemon (TRIO_IDLE_STATUS_ADDR, else "
        "TRIO_IDLE_HEALTH_ADDR; token TRIO_IDLE_STATUS_TOKEN from the environment) for its "
        "/status and print one line per connection: state, account health, last push, last "
        "scan, last error. Exit 0: every connection watched and healthy, daemon ready; 1: "
        "some not (or not ready); 2: configuration error or token refused; 3: daemon "
        "unreachable.",
    )
    _add_setting_flags(status, STATUS_FIELDS)
    status.add_argument("--connection", metavar="ID", help="show and judge this connection only")
    demo = commands.add_parser(
        "demo",
        help="run the whole loop locally: test IMAP server, scanning backend, daemon",
        description="Start, in one process, a test IMAP server with demo mailboxes, a small "
        "backend that blocks gambling mail, and the daemon; deliver a few messages, show the "
        "daemon's log lines and a summary, and exit 0.",
    )
    demo.add_argument(
        "--forever",
        action="store_true",
        help="keep running so you can deliver mail yourself (Ctrl-C to stop)",
    )
    oauth_authorize = add_oauth_parser(commands)
    _add_setting_flags(oauth_authorize, OAUTH_FIELDS)
    for command in (serve, check, encrypt, decrypt, db, status, oauth_authorize):
        _add_env_file_flag(command)
    return parser


def settings_from_args(
    args: argparse.Namespace, env: Mapping[str, str], **parse_options: Any
) -> Settings:
    overrides: dict[str, str] = {}
    for option in OPTIONS:
        value = getattr(args, option.field, None)
        if value is not None:
            overrides[option.field] = value
    return parse_settings(env, overrides, **parse_options)


def make_source(settings: Settings, env: Mapping[str, str] | None = None) -> ConnectionSource:
    if settings.connections.source == "file":
        assert settings.connections.connections_file is not None
        return FileSource(settings.connections.connections_file, env)
    assert settings.connections.database_url is not None
    return PostgresSource(
        settings.connections.database_url,
        settings.connections.connections_query,
        settings.process.db_timeout,
    )


async def serve(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT; SIGHUP refreshes the connection list now."""
    source = make_source(settings, environ)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(
            functools.partial(run_daemon, settings, source, environ=environ)
        )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    logger.info("[idle/daemon] SIGHUP: refreshing the connection list")
                    daemon.request_refresh()
                    continue
                if daemon.status().stopping:  # second signal: stop waiting for LOGOUTs
                    nursery.cancel_scope.cancel()
                    break
                daemon.shutdown(signal.Signals(signum).name)
                # keep listening (a second signal cuts shutdown short) until the daemon ends
                nursery.start_soon(_stop_listening_when_done, nursery, daemon)


async def _stop_listening_when_done(nursery: trio.Nursery, daemon: Daemon) -> None:
    await daemon.wait_stopped()
    nursery.cancel_scope.cancel()


async def serve_once(settings: Settings, environ: Mapping[str, str] | None = None) -> int:
    """``serve --once``: start, wait for every session's first outcome, report, shut down.

    The report goes to stdout; exit code 0 only if every connection is being watched.
    A signal (SIGTERM/SIGINT) ends the wait early and reports what is known.
    """
    source = make_source(settings, environ)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(
            functools.partial(run_daemon, settings, source, environ=environ)
        )
        complete = False
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as waiting:
                waiting.start_soon(_cancel_on_signal, signals, waiting.cancel_scope)
                complete = await wait_for_first_outcomes(daemon)
                waiting.cancel_scope.cancel()
        code, report = once_report(daemon, timed_out=not complete)
        print(report, flush=True)
        daemon.shutdown("--once: report printed")
        with trio.move_on_after(settings.process.shutdown_timeout + 1):
            await daemon.wait_stopped()
        nursery.cancel_scope.cancel()
    return code


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def _startup_error(exc: BaseException) -> StartupError | None:
    """The :class:`StartupError` inside ``exc`` (possibly nested in exception groups)."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _startup_error(inner)) is not None:
                return found
    return None


def _debug_frames(command: str, exc: BaseException) -> None:
    """At DEBUG, where each exception inside ``exc`` was raised (one line each)."""
    for leaf in leaf_exceptions(exc):
        logger.debug(f"[idle/{command}] {type(leaf).__name__} at {traceback_frames(leaf)}")


def _run_trio(fn: Callable[[], Any], command: str = "serve") -> Any:
    """``trio.run`` that turns a failure into exit code 1 and one line naming its cause:
    a :class:`StartupError` as ``cannot start``, any other error by the exceptions inside
    the nursery's exception group (never just ``ExceptionGroup: ...``), the traceback's
    frames at DEBUG. Ctrl-C and ``SystemExit`` go on as they are."""
    try:
        return trio.run(fn)
    except BaseException as exc:
        found = _startup_error(exc)
        if found is not None:
            logger.error(f"[idle/daemon] cannot start: {found}")
            return EXIT_FAILURE
        leaves = leaf_exceptions(exc)
        if not all(isinstance(leaf, Exception) for leaf in leaves):
            raise
        scrub = Scrubber(limit=300)
        logger.error(f"[idle/{command}] failed: {describe(exc, scrub)}")
        _debug_frames(command, exc)
        return EXIT_FAILURE


async def migrate_state_table(settings: Settings) -> int:
    """``trio-idle db migrate``: create the Postgres state tables and the membership
    table of shared mode (idempotent)."""
    assert settings.connections.database_url is not None
    try:
        async with open_asyncio_loop():
            with trio.fail_after(settings.process.db_timeout):
                await PostgresBackend(settings.connections.database_url).migrate()
                # shared mode's membership table; harmless (and unused) for one instance
                await PostgresMembership(settings.connections.database_url).migrate()
    except Exception as exc:  # one clear line naming the cause, never the DSN
        text = describe(
            exc, Scrubber(url_secrets(settings.connections.database_url.reveal()), limit=300)
        )
        print(f"trio-idle: db migrate failed: {text}", file=sys.stderr)
        _debug_frames("db", exc)
        return 1
    for table, _statement in POSTGRES_MIGRATIONS:
        print(f"trio-idle: table {table} is ready")
    print(f"trio-idle: table {MEMBERSHIP_TABLE} is ready")
    return 0


async def notify_trigger(settings: Settings, action: str) -> int:
    """``trio-idle db install-notify`` / ``remove-notify``: add or drop the NOTIFY
    trigger on the connection table (idempotent; :class:`~trio_idle.cluster.listener.NotifySql`)."""
    assert settings.connections.database_url is not None
    sql = NotifySql(settings.cluster.notify_table)
    script = sql.install if action == "install-notify" else sql.remove
    try:
        async with open_asyncio_loop():
            await run_notify_script(
                settings.connections.database_url, script, settings.process.db_timeout
            )
    except Exception as exc:  # one clear line naming the cause, never the DSN
        text = describe(
            exc, Scrubber(url_secrets(settings.connections.database_url.reveal()), limit=300)
        )
        print(f"trio-idle: db {action} failed: {text}", file=sys.stderr)
        _debug_frames("db", exc)
        return 1
    if action == "install-notify":
        print(
            f"trio-idle: trigger {TRIGGER} on {sql.table} notifies channel {CHANNEL}; "
            "set TRIO_IDLE_LISTEN_URL (a direct connection) for the daemons to listen"
        )
    else:
        print(f"trio-idle: trigger {TRIGGER} on {sql.table} removed (or was not there)")
    return 0


async def status_command(settings: Settings, url: str, connection: str | None) -> int:
    """``trio-idle status``: print the daemon's ``/status`` as a table
    (:mod:`trio_idle.ops.status_client`); its exit code."""
    assert settings.health.status_token is not None  # status_url checked it
    try:
        body = await fetch_status(url, settings.health.status_token)
    except StatusUnavailable as problem:
        for line in format_unavailable(problem):
            print(line, file=sys.stderr)
        return problem.code
    print(render(body, connection), flush=True)
    return verdict(body, connection).code


#: seconds a thread may hold the GIL while another waits (CPython's default: 0.005); see
#: where ``serve`` sets it
GIL_SWITCH_INTERVAL: Final = 0.0005


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    if args.command == "demo":
        try:
            from trio_idle.demo import run_demo  # the demo runs on the test kit
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] != "trio_idle_testing":
                raise
            print(
                "trio-idle: demo: needs the test kit, which the daemon's install does not "
                "carry: pip install ./testkit from the repository (nox -s demo does it)",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        return run_demo(forever=args.forever)
    if args.command == "decrypt" and not args.check:
        print(
            "trio-idle: decrypt: refusing to print passwords; use --check to verify tokens",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if getattr(args, "env_file", None) is not None:
        try:
            loaded = read_env_file(args.env_file)
        except EnvFileError as exc:
            print(f"trio-idle: configuration error: --env-file {exc}", file=sys.stderr)
            return EXIT_CONFIG
        for name in loaded.ignored:  # systemd ignores these too
            print(
                f"trio-idle: {args.env_file}: ignoring {shown_key(name)}: not a variable "
                "name (no 'export', no spaces)",
                file=sys.stderr,
            )
        for number in loaded.ambiguous_comments:
            print(
                f"trio-idle: {args.env_file}: line {number}: a comment ends with a backslash; "
                "systemd before 254 reads the next line as part of the comment: remove it",
                file=sys.stderr,
            )
        if env is os.environ:  # libraries (proxies, TLS, libpq-style) read it as well
            os.environ.update(loaded.values)
        else:
            env = {**env, **loaded.values}
    crypto_only = args.command in ("encrypt", "decrypt")
    try:
        if crypto_only:
            settings = settings_from_args(
                args, env, require=("encryption_key",), require_source=False
            )
        elif args.command == "status":
            settings = settings_from_args(args, env, require=(), require_source=False)
            url = status_url(settings)
        elif args.command == "oauth":
            settings = settings_from_args(
                args, env, require=required_settings(args), require_source=False
            )
        elif args.command == "db":
            settings = settings_from_args(args, env, require=(), require_source=False)
            if settings.connections.database_url is None:
                raise ConfigError("DATABASE_URL", f"is required for `trio-idle db {args.action}`")
        else:
            settings = settings_from_args(args, env)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"trio-idle: configuration error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    # the daemon splits its lines like console.log / console.error (docs/operations.md);
    # a command whose stdout is its report keeps every log line off it
    daemon_mode = args.command == "serve" and not args.once
    setup_logging(
        settings.log.log_level,
        settings.log.log_format,
        split=daemon_mode,
        show_email=settings.log.log_email,
    )
    protect_secrets(process_secrets(settings))
    if args.command == "serve":
        if settings.process.gc_mode == "tuned":
            # Full collections walk every object: ~1 s at 10,000 sessions, stalling every
            # session (p99 push latency 1 s). Young generations still run; the daemon does
            # one full collection after each refresh (docs/performance.md).
            gc.set_threshold(700, 10, 1_000_000)
        # A refresh parses and validates the rows in a worker thread. While it runs, each
        # time the loop releases the GIL (every socket call, every TLS read and write) it
        # waits for the worker to give the GIL back, which CPython makes it do only every
        # switch interval (5 ms by default): at 10,000 TLS sessions the loop fell behind by
        # hundreds of milliseconds for the length of a refresh (docs/performance.md).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        logger.info(
            f"[idle/daemon] trio-idle {__version__} starting "
            f"(source={settings.connections.source}, "
            f"backend={redact_url(settings.webhook.scan_url)})"
            + (" for one check (--once)" if args.once else "")
        )
        if args.once:
            code: int = _run_trio(functools.partial(serve_once, settings, env))
            return code
        code = int(_run_trio(functools.partial(serve, settings, env)) or 0)
        # Everything is closed and flushed. The interpreter's final full collection would
        # walk every object the sessions left (≈ 1.4 s at 10,000 TLS sessions, past
        # SHUTDOWN_TIMEOUT); frozen objects are skipped and the OS takes the memory back.
        gc.freeze()
        return code
    if args.command == "check":
        source = make_source(settings, env)
        check = functools.partial(
            run_check, settings, source, sys.stdout, login=args.login, concurrency=args.concurrency
        )
        return int(_run_trio(check, "check"))
    if args.command == "status":
        return int(
            _run_trio(functools.partial(status_command, settings, url, args.connection), "status")
        )
    if args.command == "db":
        if args.action == "migrate":
            return int(_run_trio(functools.partial(migrate_state_table, settings), "db"))
        return int(_run_trio(functools.partial(notify_trigger, settings, args.action), "db"))
    if args.command == "oauth":
        return run_oauth_command(args, settings, sys.stdout, sys.stderr, _run_trio)
    if args.command == "encrypt":
        return encrypt_command(settings, sys.stdin, sys.stdout, sys.stderr, iv_size=args.iv_size)
    if args.command == "decrypt":
        return decrypt_check_command(settings, sys.stdin, sys.stdout)
    parser.error(f"unknown command {args.command}")
    return EXIT_CONFIG  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
