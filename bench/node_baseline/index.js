'use strict';
// The original daemon's stack, for `python -m bench --compare`: Node + imapflow, one
// ImapFlow client per mailbox held in IDLE on INBOX, a NOOP every TICK_MS per mailbox,
// and a `fetch` POST to the scan webhook on every EXISTS, with at most one scan in flight
// and one pending per mailbox (further EXISTS while one is pending are folded into it).
//
// Driven like `trio-idle serve` by the harness: it starts with no mailboxes, writes one
// line `{"ready": true, "pid": ...}` to stdout once its signal handlers are installed,
// and on SIGHUP (re)reads MAILBOXES_FILE (JSON: [{"email", "port"}, ...]) and opens a
// client for each mailbox it does not have yet (closing those no longer listed).
// SIGTERM exits at once, without LOGOUT, as the original did.
//
// Environment: MAILBOXES_FILE, IMAP_HOST (127.0.0.1), IMAP_PASSWORD, IMAP_TLS (1/0),
// IMAP_CA_FILE (PEM, with IMAP_TLS), BACKEND_URL, ADMIN_SECRET, TICK_MS (120000),
// CONNECT_CONCURRENCY (200), AUTO_IDLE_DELAY_MS (unset: imapflow's default, 15 s from the
// last command to IDLE; the harness's --quick path shortens it), STALL_PERIOD_MS (20) and
// STALL_LOG_MS (5): the loop-stall probe, the same as bench/loop_probe.py for trio-idle (a
// STALL_PERIOD_MS timer re-armed forever; each lateness above STALL_LOG_MS is written to
// stderr as `STALL <unix time> ms=<lateness>`). perf_hooks.monitorEventLoopDelay runs beside
// it at the same resolution as a cross-check; SIGUSR2 prints its max with the counters.
// SIGWINCH switches the probe to STALL_COARSE_MS (250) and back (see the handler).

const fs = require('node:fs');
const { monitorEventLoopDelay, performance } = require('node:perf_hooks');
const { ImapFlow } = require('imapflow');

const env = process.env;
const HOST = env.IMAP_HOST || '127.0.0.1';
const PASSWORD = env.IMAP_PASSWORD || '';
const TLS = env.IMAP_TLS === '1';
const CA = TLS && env.IMAP_CA_FILE ? fs.readFileSync(env.IMAP_CA_FILE) : undefined;
const SCAN_URL = `${env.BACKEND_URL}/api/mail/scan-internal`;
const ADMIN_SECRET = env.ADMIN_SECRET || '';
const TICK_MS = Number(env.TICK_MS || 120000);
const CONNECT_CONCURRENCY = Number(env.CONNECT_CONCURRENCY || 200);
const AUTO_IDLE_DELAY = env.AUTO_IDLE_DELAY_MS ? Number(env.AUTO_IDLE_DELAY_MS) : undefined;
const STALL_PERIOD_MS = Number(env.STALL_PERIOD_MS || 20);
const STALL_LOG_MS = Number(env.STALL_LOG_MS || 5);
const STALL_COARSE_MS = Number(env.STALL_COARSE_MS || 250);

/** email -> {client, tick, active, pending, closed} */
const mailboxes = new Map();
const counters = { connected: 0, connectErrors: 0, scans: 0, scanErrors: 0, closes: 0 };

async function postScan(email, reason) {
    try {
        const res = await fetch(SCAN_URL, {
            method: 'POST',
            headers: { 'content-type': 'application/json', 'x-admin-secret': ADMIN_SECRET },
            body: JSON.stringify({ connectionId: email, userId: null, email, mailbox: 'INBOX', reason })
        });
        await res.text();
        counters.scans++;
    } catch (err) {
        counters.scanErrors++;
    }
}

/** The 1 active + 1 pending guard: an EXISTS during a scan queues exactly one more. */
async function requestScan(box) {
    if (box.active) {
        box.pending = true;
        return;
    }
    box.active = true;
    try {
        do {
            box.pending = false;
            await postScan(box.email, 'exists');
        } while (box.pending && !box.closed);
    } finally {
        box.active = false;
    }
}

async function openMailbox(box) {
    const client = new ImapFlow({
        host: HOST,
        port: box.port,
        secure: TLS,
        tls: TLS ? { ca: CA } : undefined,
        auth: { user: box.email, pass: PASSWORD },
        logger: false,
        autoIdleDelay: AUTO_IDLE_DELAY
    });
    box.client = client;
    client.on('error', () => {});
    client.on('close', () => {
        counters.closes++;
        clearInterval(box.tick);
    });
    client.on('exists', () => {
        requestScan(box);
    });
    await client.connect();
    await client.mailboxOpen('INBOX');
    counters.connected++;
    // the original's liveness check: a NOOP every 2 minutes (imapflow breaks IDLE for it
    // and re-enters IDLE on its own afterwards)
    box.tick = setInterval(() => {
        client.noop().catch(() => {});
    }, TICK_MS);
}

async function applyList() {
    let rows;
    try {
        rows = JSON.parse(fs.readFileSync(env.MAILBOXES_FILE, 'utf8'));
    } catch (err) {
        process.stderr.write(`cannot read MAILBOXES_FILE: ${err.message}\n`);
        return;
    }
    const wanted = new Map(rows.map(row => [row.email, row]));
    for (const [email, box] of mailboxes) {
        if (!wanted.has(email)) {
            box.closed = true;
            clearInterval(box.tick);
            mailboxes.delete(email);
            if (box.client) box.client.close();
        }
    }
    const queue = [];
    for (const row of rows) {
        if (!mailboxes.has(row.email)) {
            const box = { email: row.email, port: row.port, client: null, tick: null, active: false, pending: false, closed: false };
            mailboxes.set(row.email, box);
            queue.push(box);
        }
    }
    const worker = async () => {
        for (let box = queue.shift(); box; box = queue.shift()) {
            try {
                await openMailbox(box);
            } catch (err) {
                counters.connectErrors++;
                process.stderr.write(`connect ${box.email}: ${err.message}\n`);
            }
        }
    };
    await Promise.all(Array.from({ length: Math.min(CONNECT_CONCURRENCY, queue.length) }, worker));
}

process.on('SIGHUP', () => {
    applyList();
});
process.on('SIGTERM', () => {
    process.exit(0);
});
process.on('SIGUSR2', () => {
    // monitorEventLoopDelay records whole intervals (resolution included), in ns
    const eld = { maxMs: eldHistogram.max / 1e6, minMs: eldHistogram.min / 1e6, resolutionMs: STALL_PERIOD_MS };
    process.stdout.write(JSON.stringify({ counters, mailboxes: mailboxes.size, eld }) + '\n');
});

// the loop-stall probe (see the header): how late a short timer fires
const eldHistogram = monitorEventLoopDelay({ resolution: STALL_PERIOD_MS });
eldHistogram.enable();
let stallPeriod = STALL_PERIOD_MS;
let stallExpected = performance.now() + stallPeriod;
let stallTimer = null;
function stallProbe() {
    const now = performance.now();
    const late = now - stallExpected;
    if (late > STALL_LOG_MS) {
        process.stderr.write(`STALL ${(Date.now() / 1000).toFixed(3)} ms=${late.toFixed(1)}\n`);
    }
    stallExpected = performance.now() + stallPeriod;
    stallTimer = setTimeout(stallProbe, stallPeriod);
}
stallTimer = setTimeout(stallProbe, stallPeriod);
// SIGWINCH: the coarse period (STALL_COARSE_MS) and back, as bench/loop_probe.py does
// around the idle-CPU window; the histogram's own 20 ms timer pauses with it
process.on('SIGWINCH', () => {
    stallPeriod = stallPeriod === STALL_PERIOD_MS ? STALL_COARSE_MS : STALL_PERIOD_MS;
    if (stallPeriod === STALL_PERIOD_MS) eldHistogram.enable();
    else eldHistogram.disable();
    process.stderr.write(`STALLPROBE ${(Date.now() / 1000).toFixed(3)} period_ms=${stallPeriod}\n`);
    clearTimeout(stallTimer);
    stallExpected = performance.now() + stallPeriod;
    stallTimer = setTimeout(stallProbe, stallPeriod);
});
// keeps the process alive while it has no mailboxes yet
setInterval(() => {}, 1 << 30);
process.stdout.write(JSON.stringify({ ready: true, pid: process.pid }) + '\n');
