"""A stand-in HTTP proxy on 127.0.0.1 that records every request it gets.

Set as ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` (see :func:`point_proxies_at`), it shows
whether a client went through the environment's proxy: a proxied request arrives here in
absolute form (``POST http://127.0.0.1:PORT/path``) with every header the client sent, the
secret header included. It answers each request ``200 {"scanned": 7, "blocked": 3}``, so a
scan that went through it is told apart from one the real backend (which answers
``scanned=1``) handled. With ``ssl_context`` it serves HTTPS instead (a TLS "backend").
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterable

import attrs
import h11
import pytest
import trio

PROXY_ANSWER = {"scanned": 7, "blocked": 3}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@attrs.frozen
class Recorded:
    method: str
    target: str
    headers: dict[str, str]


class RecordingProxy:
    """Run with ``url = await nursery.start(proxy.serve)``; serves until cancelled."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.requests: list[Recorded] = []
        self.url = ""
        self._ssl_context = ssl_context

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners: Iterable[trio.abc.Listener[trio.abc.Stream]]
        if self._ssl_context is None:
            tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = tcp[0].socket.getsockname()[1]
            listeners, scheme = tcp, "http"
        else:
            tls = await trio.open_ssl_over_tcp_listeners(0, self._ssl_context, host="127.0.0.1")
            transport = tls[0].transport_listener
            assert isinstance(transport, trio.SocketListener)
            port = transport.socket.getsockname()[1]
            listeners, scheme = tls, "https"
        self.url = f"{scheme}://127.0.0.1:{port}"
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, list(listeners))
            task_status.started(self.url)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Request):
                    headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                    self.requests.append(
                        Recorded(event.method.decode(), event.target.decode(), headers)
                    )
                elif isinstance(event, h11.EndOfMessage):
                    body = json.dumps(PROXY_ANSWER).encode()
                    headers_out = [
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                        ("connection", "close"),
                    ]
                    out = conn.send(h11.Response(status_code=200, headers=headers_out)) or b""
                    out += conn.send(h11.Data(data=body)) or b""
                    out += conn.send(h11.EndOfMessage()) or b""
                    await stream.send_all(out)
                    return
                elif not isinstance(event, h11.Data):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()


def point_proxies_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Name ``url`` as the proxy for every scheme in ``os.environ`` (both spellings, as
    ``urllib.request.getproxies`` reads lower case first), with no ``NO_PROXY`` exemption:
    a client that trusts the environment sends everything, loopback included, there."""
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, url)
        monkeypatch.setenv(name.lower(), url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
