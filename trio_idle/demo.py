"""``trio-idle demo``: the whole loop in one process, on embedded defaults.

Starts the test IMAP server (``trio_idle_testing``) with three demo mailboxes (alice's
holds :data:`OLD_MESSAGES` old messages), a small backend that "scans" new mail for
gambling keywords and deletes what it blocks, and the real daemon reading a TOML
connection file. The backend keeps no state of its own: each scan request's range
(``sinceUid``) tells it which messages are new, and with envelopes (switched on here)
it judges them by their subject without reading them; it prints how many messages each
request cost it — one per new mail, not the 1,000 in alice's mailbox. Then it delivers
a few messages, lets the daemon's own log lines show what happens, prints a summary and
exits 0 (1 if a message was not followed by a scan). ``--forever`` keeps everything
running for you to deliver mail yourself.

Each mailbox also has a Junk folder (the special use ``\\Junk``), watched beside INBOX
(``TRIO_IDLE_FOLDERS=INBOX,\\Junk``): one gambling mail is filed straight into carol's
Junk, the daemon's STATUS check on the next tick finds it, the Junk scan carries its
envelope (the session visits Junk for it) and the backend deletes it from Junk.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

import attrs
import trio
from loguru import logger
from trio_idle_testing.backend import KeywordScanner, Reply, ScanBackend, ScanRequest
from trio_idle_testing.imap_server import ImapTestServer

from trio_idle.accounts.source_file import FileSource
from trio_idle.core.config import parse_settings
from trio_idle.core.crypto import derive_key, encrypt_password
from trio_idle.core.logs import setup_logging
from trio_idle.runtime.daemon import Daemon, run_daemon

DEMO_KEY = "trio-idle-demo-key-not-for-production!"  # 32+ chars, like ENCRYPTION_KEY
MAILBOXES = ("alice@demo.test", "bob@demo.test", "carol@demo.test")

#: (mailbox, subject, body) delivered in order; the last three go out as one burst.
SCRIPT: tuple[tuple[str, str, str], ...] = (
    ("alice@demo.test", "Quarterly report", "Numbers attached, see you Monday."),
    ("bob@demo.test", "Casino bonus: 200 free spins!", "Claim your welcome bonus now."),
    ("carol@demo.test", "Lunch on Friday?", "The usual place at noon?"),
    ("alice@demo.test", "Your jackpot is waiting", "Place your first bet today."),
    ("bob@demo.test", "Re: project plan", "Looks good to me."),
    ("bob@demo.test", "Poker night VIP invite", "Exclusive poker tables tonight."),
    ("bob@demo.test", "Minutes of the meeting", "Attached."),
)
BURST_FROM = 4
#: the folder every demo mailbox has beside INBOX, and the mail filed straight into it
JUNK = "Junk"
JUNK_MAIL: tuple[str, str, str] = (
    "carol@demo.test",
    "Jackpot! 500 free spins at the casino",
    "Your bet is waiting.",
)
#: alice's mailbox holds this many old messages before the daemon starts
OLD_MESSAGES = 1000


def _message(sender: str, to: str, subject: str, body: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{secrets.token_hex(8)}@demo.test>\r\n\r\n{body}\r\n"
    ).encode()


@attrs.define
class DemoBackend:
    """The backend's role: look at new mail, delete gambling mail, answer the counts.

    Stateless, as a backend serving many daemons is: the request's ``sinceUid`` says
    which messages are new (no range: all of them), and its ``messages`` (envelopes,
    when present) are judged by subject without reading the mail.
    """

    server: ImapTestServer
    scanned: int = 0
    blocked: int = 0
    #: messages looked at per request, in order
    looked_at: list[int] = attrs.field(factory=list)
    blocked_subjects: list[str] = attrs.field(factory=list)
    #: of :attr:`blocked`, what scans of a folder beside INBOX blocked
    folder_blocked: int = 0
    #: how the last folder scan's mail was judged (``envelopes``, ``messages read``)
    folder_judged_by: str = "-"
    changed: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self, request: ScanRequest) -> Reply:
        email = request.email or ""
        body = request.body
        detector = KeywordScanner(lambda _: ())
        folder = body.get("folder")
        # no "folder": INBOX (docs/backend-contract.md); a folder's mail is deleted there
        where = folder if isinstance(folder, str) else "INBOX"
        box = self.server.mailbox(email, where)
        since = body.get("sinceUid")
        if not isinstance(since, int) or body.get("uidValidity") != box.uidvalidity:
            since = 1  # no range (or another UIDVALIDITY): everything is new
        envelopes = body.get("messages")
        if isinstance(envelopes, list):
            # judged by subject: the mail itself is not read
            verdicts: list[tuple[int, str, bool]] = [
                (
                    m["uid"],
                    str(m.get("subject") or ""),
                    detector.pattern.search(str(m.get("subject") or "")) is not None,
                )
                for m in envelopes
                if isinstance(m, dict) and isinstance(m.get("uid"), int)
            ]
            how = "envelopes"
        else:
            verdicts = [
                (m.uid, detector._text_of(m.data)[0], detector.is_gambling(m.data))
                for m in box.messages
                if m.uid >= since
            ]
            how = "messages read"
        blocked = 0
        for uid, subject, gambling in verdicts:
            if gambling:
                blocked += 1
                self.blocked_subjects.append(f"{email} ({where}): {subject}")
                self.server.expunge(email, uid, where)  # the real backend deletes it
        looked = len(verdicts)
        in_folder = f" folder {where}:" if where != "INBOX" else ""
        logger.opt(colors=False).info(
            f"[demo] backend: {email}{in_folder} sinceUid={body.get('sinceUid')} → looked at "
            f"{looked} message(s) ({how}) of {box.exists + blocked} in the "
            f"{'mailbox' if where == 'INBOX' else 'folder'}, blocked={blocked}"
        )
        if where != "INBOX":
            self.folder_blocked += blocked
            self.folder_judged_by = how
        self.looked_at.append(looked)
        self.scanned += looked
        self.blocked += blocked
        self.changed.set()
        self.changed = trio.Event()
        return Reply(200, json={"scanned": looked, "blocked": blocked})


def _connections_toml(port: int, passwords: dict[str, str], key: bytes) -> str:
    # alice's password is stored encrypted, as the backend stores it; the others come
    # from environment variables: both forms the file source accepts.
    parts = []
    for n, email in enumerate(MAILBOXES):
        secret_line = (
            f'encrypted_password = "{encrypt_password(passwords[email], key)}"'
            if n == 0
            else f'password_env = "DEMO_PASSWORD_{n}"'
        )
        parts.append(
            f'[[connection]]\nid = "demo-{n + 1}"\nuser_id = "user-{n + 1}"\n'
            f'email = "{email}"\nimap_host = "127.0.0.1"\nimap_port = {port}\n{secret_line}\n'
        )
    return "\n".join(parts)


async def _demo(forever: bool, workdir: Path) -> int:
    server = ImapTestServer(keepalive_interval=120.0)
    passwords = {email: secrets.token_urlsafe(10) for email in MAILBOXES}
    for email, password in passwords.items():
        server.add_user(email, password)
        server.add_mailbox(email, JUNK, special_use=("\\Junk",))
    for n in range(OLD_MESSAGES):
        server.append(MAILBOXES[0], _message("old@example.net", MAILBOXES[0], f"Old #{n}", "."))
    admin_secret = secrets.token_urlsafe(16)
    key = derive_key(DEMO_KEY)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        backend = ScanBackend(secret=admin_secret)
        scanner = DemoBackend(server)
        backend.default_reply = scanner
        await nursery.start(backend.serve)

        conn_file = workdir / "connections.toml"
        conn_file.write_text(_connections_toml(server.port, passwords, key))
        env = {f"DEMO_PASSWORD_{n}": passwords[e] for n, e in enumerate(MAILBOXES)}
        settings = parse_settings(
            {
                "ADMIN_SECRET": admin_secret,
                "ENCRYPTION_KEY": DEMO_KEY,
                "TRIO_IDLE_SOURCE": "file",
                "TRIO_IDLE_CONNECTIONS_FILE": str(conn_file),
                "BACKEND_URL": backend.url,
                "TRIO_IDLE_IMAP_SECURITY": "plain",
                "TRIO_IDLE_LOGOUT_TIMEOUT": "1s",
                "TRIO_IDLE_STATE": "none",  # every demo run starts with fresh mailboxes
                "TRIO_IDLE_SCAN_ENVELOPES": "true",
                # Junk beside INBOX: checked with STATUS once per tick (folders are not
                # pushed), so the tick is short enough to watch
                "TRIO_IDLE_FOLDERS": "INBOX,\\Junk",
                "TRIO_IDLE_TICK_INTERVAL": "2s",
            }
        )
        say = logger.opt(colors=False).info
        say(
            f"[demo] IMAP test server on 127.0.0.1:{server.port}, backend on {backend.url}, "
            f"connections in {conn_file}"
        )
        daemon: Daemon = await nursery.start(run_daemon, settings, FileSource(str(conn_file), env))
        with trio.fail_after(20):
            await server.wait_for(lambda: server.idle_count() >= len(MAILBOXES))
        say(f"[demo] {len(MAILBOXES)} mailboxes are in IDLE; delivering {len(SCRIPT)} messages")

        missed = await _deliver_script(server, backend, scanner)
        missed += await _deliver_junk(server, scanner)
        with trio.fail_after(20):
            await _quiet(daemon)

        requests = backend.requests
        say("[demo] ---------------------------------------------------------------")
        say(
            f"[demo] delivered {len(SCRIPT)} messages to {len(MAILBOXES)} mailboxes and 1 "
            f"straight into {JUNK_MAIL[0]}'s {JUNK} folder"
        )
        say(
            f"[demo] scan POSTs: {len(requests)} (the burst of {len(SCRIPT) - BURST_FROM} "
            f"was coalesced: at most 1 active + 1 pending scan per mailbox)"
        )
        say(
            f"[demo] backend scanned {scanner.scanned} messages, blocked and deleted "
            f"{scanner.blocked}:"
        )
        say(
            f"[demo] messages looked at per request: {scanner.looked_at} (alice's mailbox "
            f"holds {OLD_MESSAGES} old ones: the range keeps them out of every scan)"
        )
        for subject in scanner.blocked_subjects:
            say(f"[demo]   blocked {subject}")
        for email in MAILBOXES:
            left = [m.data for m in server.mailbox(email).messages]
            junk = server.mailbox(email, JUNK).exists
            say(f"[demo] {email}: {len(left)} message(s) left in INBOX, {junk} in {JUNK}")
        say(
            f"[demo] folder {JUNK}: the scan of {JUNK_MAIL[0]}'s {JUNK} folder "
            f"blocked={scanner.folder_blocked} (judged by {scanner.folder_judged_by}, "
            f"deleted from {JUNK})"
        )
        if missed:
            say(f"[demo] FAILED: {missed} message(s) were not followed by a scan")
        if forever:
            _print_how_to_deliver(server.port, passwords)
            await trio.sleep_forever()
        daemon.shutdown("demo finished")
        with trio.fail_after(settings.process.shutdown_timeout + 2):
            await daemon.wait_stopped()
        nursery.cancel_scope.cancel()
    return 1 if missed else 0


async def _deliver_script(
    server: ImapTestServer, backend: ScanBackend, scanner: DemoBackend
) -> int:
    """Deliver the script; returns how many messages were not followed by a scan POST."""
    missed = 0
    for n, (email, subject, body) in enumerate(SCRIPT):
        logger.info(f"[demo] delivering to {email}: {subject!r}")
        before = len(backend.requests_for(email))
        appended_at = trio.current_time()
        server.append(email, _message("sender@example.net", email, subject, body))
        if n >= BURST_FROM:
            continue  # the burst: no waiting between messages
        try:
            with trio.fail_after(10):
                await backend.wait_for_requests(before + 1, email=email, finished=True)
        except trio.TooSlowError:
            missed += 1
            continue
        latency = backend.requests_for(email)[-1].received_at - appended_at
        logger.info(f"[demo] backend got the scan request {latency * 1000:.1f} ms after delivery")
    # every delivered message must have been looked at by a scan
    try:
        with trio.fail_after(10):
            while scanner.scanned < len(SCRIPT):
                await scanner.changed.wait()
    except trio.TooSlowError:
        missed += len(SCRIPT) - scanner.scanned
    return missed


async def _deliver_junk(server: ImapTestServer, scanner: DemoBackend) -> int:
    """File :data:`JUNK_MAIL` straight into its mailbox's Junk folder and wait for the
    backend to look at it (the next tick's STATUS check finds it); returns 1 if it did
    not within the wait, else 0."""
    email, subject, body = JUNK_MAIL
    logger.info(f"[demo] filing straight into {email}'s {JUNK} folder: {subject!r}")
    looked = scanner.scanned
    server.append(email, _message("casino@bet.example", email, subject, body), JUNK)
    try:
        with trio.fail_after(15):
            while scanner.scanned <= looked:
                await scanner.changed.wait()
    except trio.TooSlowError:
        return 1
    return 0


async def _quiet(daemon: Daemon) -> None:
    """Wait until no connection has a scan active or pending (bounded by the caller)."""

    def busy() -> bool:
        coalescers = [
            c
            for h in daemon.reconciler.handles.values()
            for c in (h.coalescer, *(f.coalescer for f in h.memory.folders.by_name.values()))
        ]
        return any(c.active or c.pending for c in coalescers)

    while busy():  # noqa: ASYNC110 - the demo's last look; no event covers all mailboxes
        await trio.sleep(0.05)


def _print_how_to_deliver(port: int, passwords: dict[str, str]) -> None:
    email = MAILBOXES[1]
    print(
        "\n[demo] running until Ctrl-C. Deliver mail yourself, e.g. with curl (IMAP APPEND):\n"
        f"  printf 'Subject: Win big at the casino\\r\\n\\r\\nbet now\\r\\n' > /tmp/mail.eml\n"
        f"  curl -s 'imap://127.0.0.1:{port}/INBOX' -u '{email}:{passwords[email]}' "
        "-T /tmp/mail.eml\n"
        "Mailboxes and passwords (demo only):\n"
        + "".join(f"  {e}  {p}\n" for e, p in passwords.items()),
        file=sys.stderr,
        flush=True,
    )


def run_demo(forever: bool = False) -> int:
    """Entry point of ``trio-idle demo``; returns the exit code."""
    setup_logging(os.environ.get("TRIO_IDLE_LOG_LEVEL", "INFO"))
    with tempfile.TemporaryDirectory(prefix="trio-idle-demo-") as workdir:
        try:
            return trio.run(_demo, forever, Path(workdir))
        except KeyboardInterrupt:
            return 0
