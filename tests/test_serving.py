"""How `tistudio serve` runs uvicorn, over real sockets: slow headers are cut off, slow bodies and long answers
are not."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from tistudio.server import uvicorn_settings
from tistudio.server.workspace import Limits


async def echo(scope, receive, send) -> None:
    """A small ASGI app: answers with the length of the body it read, after `?sleep=S` seconds."""
    import asyncio

    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    query = scope["query_string"].decode()
    if query.startswith("sleep="):
        await asyncio.sleep(float(query.split("=")[1]))
    body = str(size).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def port() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        number = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn_settings(echo, Limits(header_seconds=1.0, connections=8), "127.0.0.1", number))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield number
    server.should_exit = True
    thread.join(10)


def closed_within(connection: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the connection (EOF or reset), or None if it stayed open."""
    start = time.monotonic()
    connection.settimeout(seconds)
    try:
        while connection.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_headers_trickled_slower_than_the_deadline_are_cut_off(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\n")
        for _ in range(3):  # a header line a while, never the blank line that ends them
            time.sleep(0.3)
            try:
                slow.sendall(b"X-a: b\r\n")
            except OSError:
                break
        waited = closed_within(slow, 3.0)
    assert waited is not None and waited < 2.0, "a connection that never finished its headers stayed open"
    with socket.create_connection(("127.0.0.1", port)) as silent:  # connected and said nothing at all
        assert closed_within(silent, 3.0) is not None


def request(port: int, body_chunks: list[bytes], pause: float, path: str = "/") -> bytes:
    total = sum(len(chunk) for chunk in body_chunks)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n".encode()
        )
        for chunk in body_chunks:
            time.sleep(pause)
            connection.sendall(chunk)
        answer = b""
        while data := connection.recv(4096):
            answer += data
    return answer


def test_a_slow_body_and_a_slow_answer_are_not_cut_off(port: int) -> None:
    answer = request(port, [b"x" * 10] * 4, pause=0.5)  # 2 s of body after headers sent at once
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"40")
    answer = request(port, [b"y"], pause=0, path="/?sleep=1.6")  # the app takes longer than the header deadline
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"1")


def test_a_kept_alive_connection_gets_the_deadline_again_for_its_next_request(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.6)  # idle past half the deadline: the clock restarted at the response
        connection.sendall(b"GET / HTTP/1.1\r\n")  # the next request starts and stalls
        waited = closed_within(connection, 3.0)
    assert waited is not None and waited < 2.0


def test_sockets_that_say_nothing_and_reconnect_do_not_keep_requests_out(port: int) -> None:
    """A reconnecting slowloris: more silent sockets than the server's 8 connections, each reopened as soon as it is
    closed. uvicorn answers 503 to a request that arrives while the connections are full; the newest connection
    closes the longest-silent one, so real requests still get through."""
    stop, silent = threading.Event(), []

    def keep_connecting() -> None:
        while not stop.is_set():
            silent[:] = [s for s in silent if s.fileno() != -1]
            try:
                connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                time.sleep(0.01)
                continue
            connection.setblocking(False)
            silent.append(connection)
            try:
                closed = [s for s in silent if s.recv(1) == b""]
            except (BlockingIOError, ConnectionResetError):
                closed = []
            for s in closed:
                s.close()
            if len(silent) > 20:
                time.sleep(0.005)

    attackers = [threading.Thread(target=keep_connecting, daemon=True) for _ in range(2)]
    for thread in attackers:
        thread.start()
    time.sleep(0.5)  # the connections are full of silent sockets
    answers = []
    for _ in range(30):
        try:
            answers.append(request(port, [b"z"], pause=0)[:12])
        except OSError as exc:
            answers.append(repr(exc).encode())
        time.sleep(0.05)
    stop.set()
    for thread in attackers:
        thread.join(5)
    for connection in silent:
        connection.close()
    served = sum(answer.startswith(b"HTTP/1.1 200") for answer in answers)
    assert served >= 28, answers
