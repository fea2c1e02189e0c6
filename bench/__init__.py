"""Benchmark harness: the real ``trio-idle serve`` process against test IMAP servers.

``python -m bench --help``. Process layout (everything on 127.0.0.1)::

    harness (this package, trio)   ── SIGHUP / SIGTERM, /proc readings ──►  daemon process
    ├── scan sink (ScanBackend, h11)  ◄── POST /api/mail/scan-internal ──   (python -m
    └── control client ── JSON lines ──►  IMAP server process(es)  ◄─IMAP─  trio_idle.cli serve)
                                          (:mod:`bench.imap_proc`, ≤ 8,000 clients each)

Timestamps that cross processes are wall-clock :func:`time.time` values (same machine).
"""
