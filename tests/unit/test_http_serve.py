"""The shared HTTP/1.1 server exchange (h11) over a local socket pair: a request is read
whole, a body past the bound and malformed input are refused with the status to answer, a
client that closes before a request ends it, and a response is encoded whole."""

from __future__ import annotations

import h11
import trio

from trio_idle.ops.http_serve import Received, Refused, encode_response, read_request


async def read(raw: bytes, *, max_body: int = 16) -> Received | Refused | None:
    """What :func:`read_request` makes of ``raw``, sent by a client that then closes."""
    ours, theirs = trio.socket.socketpair()
    with ours, theirs:
        await theirs.send(raw)
        theirs.shutdown(trio.socket.SHUT_WR)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=256)
        with trio.fail_after(5):
            return await read_request(conn, trio.SocketStream(ours), max_body=max_body, chunk=7)


async def test_a_request_is_read_with_its_whole_body_across_reads() -> None:
    got = await read(
        b"POST /scan HTTP/1.1\r\nhost: x\r\ncontent-length: 16\r\n\r\n0123456789abcdef"
    )
    assert isinstance(got, Received)
    assert got.request.method == b"POST" and got.request.target == b"/scan"
    assert got.body == b"0123456789abcdef"


async def test_a_body_past_the_bound_is_refused_413() -> None:
    got = await read(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 17\r\n\r\n" + b"a" * 17)
    assert got == Refused(413, body_too_large=True)


async def test_malformed_input_and_an_oversized_head_get_h11s_status() -> None:
    assert await read(b"NOT HTTP AT ALL\r\n\r\n") == Refused(400, body_too_large=False)
    head = b"GET / HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 400 + b"\r\n\r\n"
    assert await read(head) == Refused(431, body_too_large=False)


async def test_a_client_gone_before_a_request_ends_it_and_one_gone_mid_body_is_refused() -> None:
    assert await read(b"") is None
    # h11 calls a body cut short malformed: the servers answer 400 before closing
    cut = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc"
    assert await read(cut) == Refused(400, body_too_large=False)


async def test_a_response_is_encoded_whole_and_without_a_body_for_head() -> None:
    for method in (b"GET", b"HEAD"):
        conn = h11.Connection(h11.SERVER)
        ours, theirs = trio.socket.socketpair()
        with ours, theirs:
            await theirs.send(b"%s / HTTP/1.1\r\nhost: x\r\n\r\n" % method)
            with trio.fail_after(5):
                got = await read_request(conn, trio.SocketStream(ours), max_body=16, chunk=7)
        assert isinstance(got, Received) and got.request.method == method
        # the caller does not say which method it answers: the exchange knows
        data = encode_response(conn, 404, [("content-length", "2")], b"no")
        assert data.startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert b"content-length: 2\r\n" in data
        assert data.endswith(b"\r\n\r\nno" if method == b"GET" else b"\r\n\r\n")
        assert conn.our_state is h11.DONE
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    conn.next_event()
    assert encode_response(conn, 599, [("content-length", "0")], b"").startswith(
        b"HTTP/1.1 599 \r\n"
    )


async def test_an_error_after_a_head_request_on_the_connection_keeps_its_body() -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=256)
    ours, theirs = trio.socket.socketpair()
    with ours, theirs:
        stream = trio.SocketStream(ours)
        await theirs.send(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n")
        with trio.fail_after(5):
            assert isinstance(await read_request(conn, stream, max_body=16, chunk=7), Received)
            encode_response(conn, 200, [("content-length", "2")], b"ok")
            conn.start_next_cycle()
            refused = await read_request(conn, stream, max_body=16, chunk=7)
    assert refused == Refused(400, body_too_large=False)
    data = encode_response(conn, 400, [("content-length", "3")], b"bad")
    assert data.endswith(b"\r\n\r\nbad")
