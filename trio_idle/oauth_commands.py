"""``trio-idle oauth authorize``: a user signs in at Google or Microsoft once, and the
refresh token the daemon needs comes out encrypted (or goes into the connections file).

Two ways to sign in (the decisions are pure, in :mod:`trio_idle.auth.authorization`; the
sockets and HTTP are here):

* the browser (default): the authorization code grant with PKCE and a loopback redirect
  (RFC 8252): a one-shot listener on ``127.0.0.1`` at a random port (``--port`` to choose
  one, e.g. for ``ssh -L``), a fresh ``state`` and verifier per run; the command prints the
  URL to open, waits for the browser's redirect (at most ``--wait``), checks its
  ``state``, then trades the code for tokens;
* ``--device`` (Microsoft): the device authorization grant (RFC 8628): the command prints
  a URL and a short code to enter on any device, then polls the token endpoint at the
  pace the provider asks for.

Output: the refresh token encrypted with ``ENCRYPTION_KEY`` (the ``iv:tag:ciphertext``
format of stored passwords) on stdout; or, with ``--entry ID``, written into that entry
of the connections file (``encrypted_refresh_token``; an atomic, minimal edit:
:mod:`trio_idle.accounts.source_file_edit`); or, only with ``--show-token``, in clear text
after a warning. Everything else (instructions, results, errors) goes to stderr.

Guarantees: the client secret is read from the environment only (argv is visible in
``ps``); no token, code, verifier or secret is printed, logged or put in an error (except
the token itself under ``--show-token``); text from the provider is scrubbed of them
and cut. Exit codes: 0 signed in, 1 the sign-in failed, 2 bad input (one line naming the
flag or variable).
"""

from __future__ import annotations

import argparse
import html
import json
from collections.abc import Callable
from typing import Any, Final, TextIO

import attrs
import h11
import httpx
import trio

from trio_idle.accounts.providers import OAUTH_PROVIDERS, oauth_endpoints
from trio_idle.accounts.source_file_edit import (
    EntryEditError,
    find_entry,
    replace_file,
    set_entry_string,
)
from trio_idle.auth.authorization import (
    TRANSIENT,
    CallbackCode,
    CallbackRefused,
    DeviceAuthorization,
    Flow,
    PollAgain,
    PollOutcome,
    PollSchedule,
    SignInClient,
    SignInFailed,
    authorization_url,
    check_endpoint_url,
    classify_poll_reply,
    code_exchange_body,
    device_poll_body,
    device_request_body,
    loopback_redirect_uri,
    new_flow,
    parse_callback,
    parse_device_authorization,
    poll_device,
    refresh_token_of,
)
from trio_idle.auth.oauth_provider import MAX_REPLY_BYTES, parse_token_reply
from trio_idle.backend.client import HttpClient, HttpFailure, Limits, Problem, Timeouts
from trio_idle.core.config import Settings
from trio_idle.core.crypto import derive_key, encrypt_password
from trio_idle.core.scrub import PLAIN, Scrubber
from trio_idle.core.secret import Secret
from trio_idle.core.values import parse_duration
from trio_idle.ops.http_serve import Received, Refused, encode_response, read_request

#: the settings ``oauth authorize`` takes as flags (besides its own)
OAUTH_FIELDS: Final = frozenset(
    {
        "key_derivation",
        "connections_file",
        "microsoft_tenant",
        "oauth_timeout",
        "http_trust_env",
        "log_level",
        "log_format",
        "log_email",
    }
)
#: the TOML key the refresh token goes to (:mod:`trio_idle.accounts.source_file`)
TOKEN_KEY: Final = "encrypted_refresh_token"
DEFAULT_WAIT: Final = "5m"
#: how long one browser connection to the loopback listener may take to send its request
CALLBACK_READ_TIMEOUT: Final = 10.0
_MAX_CALLBACK_HEAD: Final = 16 * 1024
_PREFIX: Final = "trio-idle: oauth authorize"


class FlagError(Exception):
    """Bad input: ``str()`` is ``<flag or variable>: <what is wrong>``."""

    def __init__(self, flag: str, text: str) -> None:
        super().__init__(f"{flag}: {text}")


def add_oauth_parser(commands: Any) -> argparse.ArgumentParser:
    """``trio-idle oauth authorize`` on the CLI's subparsers; returns the ``authorize``
    parser (the caller adds the settings flags of :data:`OAUTH_FIELDS` and ``--env-file``)."""
    oauth = commands.add_parser(
        "oauth",
        help="OAuth2 sign-up: get a user's refresh token (oauth authorize)",
        description="OAuth2 sign-up for Google and Microsoft mailboxes (docs/providers.md).",
    )
    actions = oauth.add_subparsers(dest="oauth_action", metavar="ACTION")
    authorize = actions.add_parser(
        "authorize",
        help="sign a user in at the provider and print their refresh token, encrypted",
        description="Run the provider's sign-in (browser with PKCE and a 127.0.0.1 redirect, "
        "or --device for Microsoft) and print the refresh token encrypted with "
        "ENCRYPTION_KEY, or write it into the connections file entry --entry. The client "
        "id comes from --client-id or TRIO_IDLE_<PROVIDER>_CLIENT_ID, the client secret "
        "from TRIO_IDLE_<PROVIDER>_CLIENT_SECRET in the environment only. Exit 0 signed "
        "in, 1 failed, 2 bad input.",
    )
    authorize.add_argument(
        "--provider", metavar="NAME", help=f"one of {', '.join(OAUTH_PROVIDERS)}"
    )
    authorize.add_argument("--client-id", metavar="ID", help="the app's client id at the provider")
    authorize.add_argument(
        "--client-secret",
        metavar="SECRET",
        help="refused (argv is visible in ps): set TRIO_IDLE_<PROVIDER>_CLIENT_SECRET in the "
        "environment or an --env-file",
    )
    authorize.add_argument(
        "--device",
        action="store_true",
        help="sign in on another device with a code (RFC 8628; Microsoft), for machines "
        "without a browser",
    )
    authorize.add_argument(
        "--entry",
        metavar="ID",
        help="write the encrypted token into this [[connection]] entry of the connections "
        "file (TRIO_IDLE_CONNECTIONS_FILE) instead of printing it",
    )
    authorize.add_argument(
        "--show-token",
        action="store_true",
        help="print the refresh token in clear text (dangerous: it reads the mailbox)",
    )
    authorize.add_argument(
        "--port", metavar="N", help="loopback port of the redirect (default: a random one)"
    )
    authorize.add_argument(
        "--wait",
        metavar="DURATION",
        help=f"how long to wait for the browser's redirect (default {DEFAULT_WAIT})",
    )
    authorize.add_argument("--auth-url", metavar="URL", help="authorization endpoint override")
    authorize.add_argument("--token-url", metavar="URL", help="token endpoint override")
    authorize.add_argument("--device-url", metavar="URL", help="device code endpoint override")
    return authorize  # type: ignore[no-any-return]


@attrs.frozen
class AuthorizeOptions:
    """What one ``oauth authorize`` run does, checked."""

    client: SignInClient
    device: bool
    show_token: bool
    entry: str | None
    connections_file: str | None
    port: int
    wait: float
    http_timeout: float
    trust_env: bool


def _url(flag: str, text: str) -> str:
    try:
        return check_endpoint_url(text)
    except ValueError as exc:
        raise FlagError(flag, str(exc)) from None


def authorize_options(args: argparse.Namespace, settings: Settings) -> AuthorizeOptions:
    """Check the flags against each other and the settings; :class:`FlagError` names the
    first flag (or variable) that is wrong. Reads the connections file for ``--entry``."""
    if getattr(args, "oauth_action", None) != "authorize":
        raise FlagError("oauth", "expected an action: trio-idle oauth authorize --provider ...")
    provider = (args.provider or "").strip().lower()
    endpoints = oauth_endpoints(provider)
    if endpoints is None:
        raise FlagError("--provider", f"required: one of {', '.join(OAUTH_PROVIDERS)}")
    upper = provider.upper()
    if args.client_secret is not None:
        raise FlagError(
            "--client-secret",
            "secrets are not taken from the command line (visible in ps): set "
            f"TRIO_IDLE_{upper}_CLIENT_SECRET in the environment or an --env-file",
        )
    oauth = settings.oauth
    client_id = args.client_id or (
        oauth.google_client_id if provider == "google" else oauth.microsoft_client_id
    )
    if not client_id or not client_id.strip():
        raise FlagError("--client-id", f"required (or set TRIO_IDLE_{upper}_CLIENT_ID)")
    secret = oauth.google_client_secret if provider == "google" else oauth.microsoft_client_secret
    if secret is None and endpoints.secret_required:
        raise FlagError(
            f"TRIO_IDLE_{upper}_CLIENT_SECRET",
            f"is required for {provider} (its token endpoint refuses clients without one)",
        )
    tenant = oauth.microsoft_tenant
    token_url = _url(
        "--token-url" if args.token_url else f"TRIO_IDLE_{upper}_TOKEN_URL",
        args.token_url or (oauth.google_token_url if provider == "google" else oauth.microsoft_url),
    )
    auth_url = _url(
        "--auth-url", args.auth_url or endpoints.authorization_url.replace("{tenant}", tenant)
    )
    device_url = None
    if args.device:
        default = endpoints.device_url.replace("{tenant}", tenant) if endpoints.device_url else None
        if not (args.device_url or default):
            raise FlagError(
                "--device",
                f"{provider} grants IMAP access through the browser sign-in only; drop --device",
            )
        device_url = _url("--device-url", args.device_url or default or "")
        if args.port is not None:
            raise FlagError("--port", "is for the browser sign-in; --device has no redirect")
    elif args.device_url is not None:
        raise FlagError("--device-url", "is only used with --device")
    port = 0
    if args.port is not None:
        if not args.port.isdigit() or not 0 < int(args.port) < 65536:
            raise FlagError("--port", f"expected a port number 1-65535, got {args.port[:20]!r}")
        port = int(args.port)
    try:
        wait = parse_duration(args.wait or DEFAULT_WAIT)
    except ValueError as exc:
        raise FlagError("--wait", str(exc)) from None
    if wait <= 0:
        raise FlagError("--wait", "must be positive")
    connections_file = settings.connections.connections_file
    if args.entry is not None:
        if args.show_token:
            raise FlagError("--show-token", "cannot be combined with --entry")
        if connections_file is None:
            raise FlagError(
                "--entry",
                "needs the connections file: set TRIO_IDLE_CONNECTIONS_FILE or --connections-file",
            )
        _check_entry(connections_file, args.entry)
    client = SignInClient(
        provider=provider,
        client_id=client_id.strip(),
        client_secret=secret,
        authorization_url=auth_url,
        token_url=token_url,
        device_url=device_url,
        scope=endpoints.scope,
        extra=endpoints.extra,
    )
    return AuthorizeOptions(
        client=client,
        device=args.device,
        show_token=args.show_token,
        entry=args.entry,
        connections_file=connections_file,
        port=port,
        wait=wait,
        http_timeout=oauth.oauth_timeout,
        trust_env=settings.webhook.http_trust_env,
    )


def _check_entry(path: str, entry_id: str) -> None:
    """Before anyone signs in: the entry exists and the edit will work (a dry run)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        set_entry_string(data, entry_id, TOKEN_KEY, "0" * 32)
    except OSError as exc:
        raise FlagError("--entry", f"cannot read {path}: {exc.strerror}") from None
    except EntryEditError as exc:
        raise FlagError("--entry", f"{path} {exc}") from None


def required_settings(args: argparse.Namespace) -> tuple[str, ...]:
    """What the settings must hold: ``ENCRYPTION_KEY`` unless the token is shown in clear."""
    return () if getattr(args, "show_token", False) else ("encryption_key",)


# ------------------------------------------------------------------------------ the run


class _Http:
    """POSTs a form to the provider through the daemon's one HTTP client
    (:class:`~trio_idle.backend.client.HttpClient`: per-phase timeouts and a deadline on
    the whole attempt, the reply capped at :data:`MAX_REPLY_BYTES`, no redirects, no
    cookies); a failure becomes :class:`SignInFailed` with scrubbed text naming the limit
    that fired."""

    def __init__(self, client: HttpClient, scrubber: Scrubber) -> None:
        self._client = client
        self.scrubber = scrubber

    async def post(self, url: str, body: bytes, what: str) -> tuple[int, dict[str, str], bytes]:
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "accept": "application/json",
        }
        outcome = await self._client.request("POST", url, content=body, headers=headers)
        if isinstance(outcome, HttpFailure):
            if outcome.problem is Problem.TOO_LARGE:
                raise SignInFailed(f"{what} sent a reply larger than 64 KiB")
            raise SignInFailed(self.scrubber.scrub(outcome.text(what), 200))
        return outcome.status, dict(outcome.headers), outcome.body


async def authorize(
    options: AuthorizeOptions,
    *,
    key: bytes | None,
    out: TextIO,
    err: TextIO,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """Run the sign-in and deliver the token; the exit code. Cancellation ends the run
    (the listener and HTTP client closed, nothing written)."""
    client = options.client
    scrubber = Scrubber(client.secrets(), limit=200)
    http_client = HttpClient(
        timeouts=Timeouts.within(options.http_timeout),
        limits=Limits(2, max_reply_bytes=MAX_REPLY_BYTES),
        trust_env=options.trust_env,
        transport=transport,
    )
    try:
        http = _Http(http_client, scrubber)
        try:
            if options.device:
                token = await _device_sign_in(client, http, options, err)
            else:
                token = await _browser_sign_in(client, http, options, err)
        except SignInFailed as exc:
            print(f"{_PREFIX}: {exc}", file=err, flush=True)
            return 1
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await http_client.aclose()
    return _deliver(options, token, key, out, err)


def _deliver(
    options: AuthorizeOptions, token: Secret, key: bytes | None, out: TextIO, err: TextIO
) -> int:
    provider = options.client.provider
    if options.show_token:
        print(
            f"{_PREFIX}: WARNING: the refresh token follows in clear text. Whoever has it "
            "can read this mailbox until the user revokes the app's access; do not leave it "
            "in a terminal log, a shell history or a ticket.",
            file=err,
            flush=True,
        )
        print(token.reveal(), file=out, flush=True)
        return 0
    assert key is not None  # required_settings() asked for ENCRYPTION_KEY
    encrypted = encrypt_password(token.reveal(), key, iv_size=16)
    if options.entry is None:
        print(encrypted, file=out, flush=True)
        print(
            f"{_PREFIX}: signed in at {provider}; the refresh token, encrypted with "
            "ENCRYPTION_KEY, is on stdout: put it in encrypted_refresh_token (connections "
            'file) or "encryptedRefreshToken" (database), with auth = oauth2',
            file=err,
            flush=True,
        )
        return 0
    assert options.connections_file is not None
    path = options.connections_file
    try:
        with open(path, "rb") as handle:
            old = handle.read()
        new = set_entry_string(old, options.entry, TOKEN_KEY, encrypted)
        replace_file(path, old, new)
        table = find_entry(new, options.entry).table
    except (OSError, EntryEditError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(encrypted, file=out, flush=True)
        print(
            f"{_PREFIX}: signed in, but {path} was not written ({why}); the encrypted "
            f"refresh token is on stdout: set {TOKEN_KEY} of entry "
            f"{json.dumps(options.entry)} by hand",
            file=err,
            flush=True,
        )
        return 1
    print(
        f"{_PREFIX}: signed in at {provider}; entry {json.dumps(options.entry)} of {path} "
        f"has the encrypted refresh token (the daemon reads it at its next refresh)",
        file=err,
        flush=True,
    )
    if table.get("auth") != "oauth2":
        print(
            f'{_PREFIX}: note: the entry does not say auth = "oauth2"; the daemon uses the '
            "token only for oauth2 entries",
            file=err,
            flush=True,
        )
    return 0


# ------------------------------------------------------------------- browser sign-in


async def _browser_sign_in(
    client: SignInClient, http: _Http, options: AuthorizeOptions, err: TextIO
) -> Secret:
    flow = new_flow()
    scrubber = Scrubber([*client.secrets(), flow.verifier.reveal(), flow.state.reveal()])
    http.scrubber = scrubber
    try:
        listeners = await trio.open_tcp_listeners(options.port, host="127.0.0.1")
    except OSError as exc:
        raise SignInFailed(
            f"cannot listen on 127.0.0.1:{options.port}: {exc.strerror or exc}"
        ) from None
    async with listeners[0] as listener:
        port = listener.socket.getsockname()[1]
        redirect_uri = loopback_redirect_uri(port)
        url = authorization_url(client, redirect_uri, flow)
        print(
            f"{_PREFIX}: open this URL in a browser on this machine (the sign-in returns "
            f"to {redirect_uri}), sign in as the mailbox's user and allow access; waiting "
            f"up to {options.wait:g}s:\n\n    {url}\n",
            file=err,
            flush=True,
        )
        answer: CallbackCode | CallbackRefused | None = None
        with trio.move_on_after(options.wait):
            answer = await _wait_for_callback(listener, flow, scrubber)
        if answer is None:
            raise SignInFailed(
                f"no redirect from the browser within {options.wait:g}s; run the command again"
            )
    if isinstance(answer, CallbackRefused):
        raise SignInFailed(answer.message)
    print(f"{_PREFIX}: signed in at the browser; exchanging the code", file=err, flush=True)
    scrubber = Scrubber([*client.secrets(), flow.verifier.reveal(), answer.code.reveal()])
    http.scrubber = scrubber
    body = code_exchange_body(client, answer.code, redirect_uri, flow)
    what = f"{client.provider} token endpoint"
    status, headers, reply = await http.post(client.token_url, body, what)
    return refresh_token_of(
        client.provider,
        parse_token_reply(client.provider, status, headers, reply, scrubber=scrubber),
    )


_PAGE: Final = (
    "<!doctype html><html><head><meta charset=utf-8><title>trio-idle</title></head>"
    "<body><h1>{title}</h1><p>{text}</p></body></html>"
)


def _page(title: str, text: str) -> bytes:
    return _PAGE.format(title=html.escape(title), text=html.escape(text)).encode("utf-8")


async def _wait_for_callback(
    listener: trio.SocketListener, flow: Flow, scrubber: Scrubber
) -> CallbackCode | CallbackRefused:
    """Serve the loopback listener until the redirect of this attempt (or one that ends
    it) arrives; every other request is a 404. Each connection may take
    :data:`CALLBACK_READ_TIMEOUT` to send its request and is then closed."""
    answer: list[CallbackCode | CallbackRefused] = []
    async with trio.open_nursery() as nursery:

        def found(result: CallbackCode | CallbackRefused) -> None:
            if not answer:
                answer.append(result)
            nursery.cancel_scope.cancel()

        while True:
            stream = await listener.accept()
            nursery.start_soon(_callback_connection, stream, flow, scrubber, found)
    return answer[0]


async def _callback_connection(
    stream: trio.SocketStream,
    flow: Flow,
    scrubber: Scrubber,
    found: Callable[[CallbackCode | CallbackRefused], None],
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_CALLBACK_HEAD)
    result: CallbackCode | CallbackRefused | None = None
    try:
        with trio.move_on_after(CALLBACK_READ_TIMEOUT):
            received = await read_request(conn, stream, max_body=1024, chunk=4096)
            if received is None:
                return
            if isinstance(received, Refused):
                status, body = received.status, _page("Bad request", "")
            else:
                assert isinstance(received, Received)
                target = received.request.target.decode("ascii", "replace")
                judged = (
                    parse_callback(target, flow, scrubber=scrubber)
                    if received.request.method == b"GET"
                    else None
                )
                if isinstance(judged, CallbackCode):
                    status, result = 200, judged
                    body = _page(
                        "Signed in",
                        "trio-idle received the sign-in. Go back to the terminal for the "
                        "result; you can close this window.",
                    )
                elif isinstance(judged, CallbackRefused):
                    status, result = 400, judged
                    body = _page("Sign-in failed", judged.message)
                else:
                    status, body = 404, _page("Not found", "")
            headers = [
                ("content-type", "text/html; charset=utf-8"),
                ("content-length", str(len(body))),
                ("cache-control", "no-store"),
                ("connection", "close"),
            ]
            await stream.send_all(encode_response(conn, status, headers, body))
            await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    finally:
        await stream.aclose()
    if result is not None:
        found(result)


# -------------------------------------------------------------------- device sign-in


async def _device_sign_in(
    client: SignInClient, http: _Http, options: AuthorizeOptions, err: TextIO
) -> Secret:
    assert client.device_url is not None
    provider = client.provider
    status, _headers, reply = await http.post(
        client.device_url, device_request_body(client), f"{provider} device code endpoint"
    )
    device = parse_device_authorization(provider, status, reply, scrubber=http.scrubber)
    http.scrubber = Scrubber([*client.secrets(), device.device_code.reveal()])
    minutes = device.expires_in / 60
    print(
        f"{_PREFIX}: on any device with a browser, open "
        f"{PLAIN.scrub(device.verification_uri, 300)} and enter the code {device.user_code} "
        f"(valid {minutes:.0f} min); waiting for the sign-in",
        file=err,
        flush=True,
    )
    grant = await poll_device(
        _device_poller(client, http, device),
        PollSchedule(device.interval, trio.current_time() + device.expires_in),
    )
    return refresh_token_of(provider, grant)


def _device_poller(
    client: SignInClient, http: _Http, device: DeviceAuthorization
) -> Callable[[], Any]:
    what = f"{client.provider} token endpoint"
    body = device_poll_body(client, device)

    async def poll() -> PollOutcome:
        try:
            status, headers, reply = await http.post(client.token_url, body, what)
        except SignInFailed:
            return PollAgain(TRANSIENT)  # RFC 8628 3.5: back off, try again
        return classify_poll_reply(client.provider, status, headers, reply, scrubber=http.scrubber)

    return poll


# --------------------------------------------------------------------------- entry point


def run_oauth_command(
    args: argparse.Namespace,
    settings: Settings,
    out: TextIO,
    err: TextIO,
    run: Callable[[Callable[[], Any], str], Any],
) -> int:
    """The CLI's ``oauth`` command once settings are parsed: exit 2 for bad input, else
    the sign-in under ``run`` (the CLI's ``trio.run`` wrapper)."""
    try:
        options = authorize_options(args, settings)
    except FlagError as exc:
        print(f"{_PREFIX}: {exc}", file=err, flush=True)
        return 2
    key = None
    if not options.show_token:
        connections = settings.connections
        key = derive_key(connections.encryption_key.reveal(), connections.key_derivation)

    async def main() -> int:
        return await authorize(options, key=key, out=out, err=err)

    return int(run(main, "oauth"))
