"""uvicorn, with a shutdown that does not wait on watching pages."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import uvicorn


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
