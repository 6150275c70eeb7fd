"""A1111's learning-rate schedule grammar, with the same semantics.

    schedule := item ("," item)*        blank items are skipped
    item     := RATE                    until max_steps; parsing stops here
              | RATE ":" STEP           until the absolute step STEP
              | RATE ":" "-1"           until max_steps; parsing stops here

``0.005:100, 1e-3:1000, 1e-5`` trains at 0.005 until step 100, at 1e-3 until step 1000, then at 1e-5 until
max_steps. Items whose STEP is not beyond the step training starts from (a resume) are skipped; a STEP beyond
max_steps is cut to max_steps and ends the schedule. Training stops when the schedule ends, even before
max_steps ("0.005:100" with max_steps 1000 stops at 100), exactly as A1111 does.

Where A1111 is lenient with malformed text ("a:b:c" silently uses "a"), this parser says what is wrong and where.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tistudio.errors import OptionError

EXAMPLE = "0.005:100, 1e-3:1000, 1e-5"


@dataclass(frozen=True)
class Schedule:
    """(rate, end_step) pairs; the rate of the optimizer step that follows `step` completed steps."""

    pairs: tuple[tuple[float, int], ...]

    @property
    def end_step(self) -> int:
        """Training stops when this many steps are done."""
        return self.pairs[-1][1]

    def rate_at(self, step: int) -> float:
        """Learning rate for the step taken after `step` completed steps."""
        for rate, end in self.pairs:
            if step < end:
                return rate
        return self.pairs[-1][0]


def _fail(text: str, where: str, fix: str, field_name: str = "learning_rate") -> OptionError:
    return OptionError(
        field_name, text, f"{where}: {fix}; write a number such as 0.005, or a schedule such as '{EXAMPLE}'"
    )


def _parse_rate(text: str, rate_text: str, item: str, position: int) -> float:
    try:
        rate = float(rate_text)
    except ValueError:
        raise _fail(text, f"item {position} '{item}'", "the rate is not a number") from None
    if not math.isfinite(rate) or rate <= 0:
        raise _fail(text, f"item {position} '{item}'", "the rate must be a positive number")
    if rate > 10:
        raise _fail(text, f"item {position} '{item}'", "a rate above 10 cannot train an embedding")
    return rate


def parse_schedule(text: str, max_steps: int, start_step: int = 0, field_name: str = "learning_rate") -> Schedule:
    """Parse a rate or schedule string for a run from `start_step` to `max_steps` (the option `field_name`)."""
    try:
        return _parse(text, max_steps, start_step)
    except OptionError as exc:
        if field_name == "learning_rate":
            raise
        raise OptionError(field_name, text, exc.fix) from None


def _parse(text: str, max_steps: int, start_step: int) -> Schedule:
    if not isinstance(text, str) or not text.strip():
        raise _fail(str(text), "empty", "give a learning rate")
    pairs: list[tuple[float, int]] = []
    position = 0
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        position += 1
        parts = item.split(":")
        if len(parts) > 2:
            raise _fail(text, f"item {position} '{item}'", "use RATE or RATE:STEP")
        rate = _parse_rate(text, parts[0].strip(), item, position)
        if len(parts) == 1:
            if max_steps > start_step:
                pairs.append((rate, max_steps))
            break
        step_text = parts[1].strip()
        try:
            step = int(step_text)
        except ValueError:
            raise _fail(
                text, f"item {position} '{item}'", f"the step '{step_text}' is not a whole number (write 1000, not 1e3)"
            ) from None
        if step == -1:
            if max_steps > start_step:
                pairs.append((rate, max_steps))
            break
        if step < -1 or step == 0:
            raise _fail(text, f"item {position} '{item}'", "the step must be positive (or -1 for max_steps)")
        if pairs and step <= pairs[-1][1] and step <= max_steps:
            raise _fail(text, f"item {position} '{item}'", f"step {step} does not come after step {pairs[-1][1]}")
        if step > start_step:
            pairs.append((rate, min(step, max_steps)))
            if step > max_steps:
                break
    if not pairs:
        if position:
            raise OptionError(
                "learning_rate",
                text,
                f"every step in the schedule is already done (the embedding "
                f"is at step {start_step}); add a final rate without a step, e.g. '{text}, 1e-5'",
            )
        raise _fail(text, "empty", "give a learning rate")
    return Schedule(tuple(pairs))
