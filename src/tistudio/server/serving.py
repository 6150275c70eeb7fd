"""uvicorn, with a shutdown that does not wait on watching pages."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class ShuttingDownServer(uvicorn.Server):
    """A Ctrl-C or SIGTERM also stops the running job and ends the event streams (on_exit): uvicorn waits for
    open connections to close before it shuts the app down, and a watching page's stream never closes by itself."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        # on a thread: the signal may arrive while this thread holds the job store's lock
        threading.Thread(target=self.on_exit, name="tistudio-shutdown", daemon=True).start()
        super().handle_exit(sig, frame)


def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers, which uvicorn lacks: a client that
    connects and then trickles its request line and headers (a "slowloris") is closed after `seconds`, counted
    from the connection or from the previous response on a kept-alive connection. Bodies and streamed responses
    are untouched: the clock stops once a request's headers are in.

    And room for whoever sends a request: uvicorn answers 503 to any request that arrives while its connections
    number limit_concurrency, so sockets that connect and say nothing - reopened as soon as the deadline closes
    them - kept 84-93% of real requests out. A new connection that finds the connections full closes the one that
    has waited longest for its headers (never one whose request is in: those are being answered). A client that
    sends its request at once is rarely that one; the idle sockets are."""

    class HeaderDeadline(H11Protocol):
        deadline: asyncio.TimerHandle | None = None
        opened: float = 0.0

        def _arm(self) -> None:
            self._disarm()
            self.deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _too_slow(self) -> None:
            self.deadline = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.opened = self.loop.time()
            self._arm()
            self._make_room()

        def _make_room(self) -> None:
            """While the connections are full, close the one that has waited longest for its request's headers
            (one that never sent a request before one idle after an answer)."""
            limit = self.limit_concurrency
            if limit is None:
                return
            while len(self.connections) >= limit:
                waiting = [
                    other
                    for other in self.connections
                    if other is not self
                    and isinstance(other, HeaderDeadline)
                    and other._waiting_for_headers()
                    and not other.transport.is_closing()
                ]
                if not waiting:
                    return
                oldest = min(waiting, key=lambda other: (other.cycle is not None, other.opened))
                oldest._disarm()
                oldest.transport.close()
                self.connections.discard(oldest)  # connection_lost follows; its place is free now

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline
