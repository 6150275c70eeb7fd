"""What long jobs report while they run: one type for preparing, training and generating.

Each job calls its ``on_progress(Progress)`` callback: after each unit of work (a photo prepared, a training step,
a sampling step) with ``Event.STEP``, and at the moments worth telling (images encoded, an evaluation, a preview or a
copy saved, the end). The CLI shows them as a tqdm bar, the server streams them to the page.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Event(str, enum.Enum):
    """What happened. A str, so it compares equal to its value and serialises as it."""

    ENCODE = "encode"  # training: the images are being encoded
    START = "start"  # the work begins (training: after the images are encoded)
    STEP = "step"  # one more unit is done: a photo, a training step, a sampling step
    EVAL = "eval"  # training: the fixed-batch loss (and likeness) was measured
    PREVIEW = "preview"  # training: a preview image was written (path)
    SAVE = "save"  # training: a copy of the embedding was written (path)
    DONE = "done"  # finished
    STOPPED = "stopped"  # stopped on request, with everything saved

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Progress:
    event: Event
    step: int  # units done: photos, training steps, sampling steps
    total: int  # units in all (training: the last step of the run)
    epoch: int = 0
    loss: float | None = None
    likeness: float | None = None  # training's EVAL: the face or trait likeness measured there, if any
    lr: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    path: str | None = None  # the file an event wrote (a preview, a copy, the embedding)
    message: str = ""  # in words (a photo's name, an evaluation's figures, the result)


class Reporter:
    """Calls on_progress (if any) with progress stamped with the seconds since the job began."""

    def __init__(self, on_progress: Callable[[Progress], None] | None) -> None:
        self.callback = on_progress
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def also(self, listener: Callable[[Progress], None]) -> None:
        """Send every later event to `listener` too (after on_progress)."""
        first = self.callback

        def both(progress: Progress) -> None:
            if first is not None:
                first(progress)
            listener(progress)

        self.callback = both

    def __call__(self, event: Event, step: int, total: int, **fields: Any) -> None:
        if self.callback is not None:
            self.callback(Progress(event, step, total, elapsed_s=self.elapsed, **fields))
