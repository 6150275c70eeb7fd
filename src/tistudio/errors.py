"""The project's own exception types.

Every error a user can cause is one of these, with a message that names the field or file, the value and
the fix. The CLI prints ``str(error)`` as one line on stderr and exits with code 2; the server will map them
to HTTP 400. Anything else that escapes is a bug.
"""

from __future__ import annotations

import reprlib

SHOWN_CHARS = 60  # an echoed value: at most this much of it, then its length
MESSAGE_CHARS = 1000  # a whole message as the CLI prints it and the server answers it


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()  # (keyword arguments only from Python 3.12)
    short.maxlevel, short.maxdict, short.maxlist, short.maxtuple, short.maxset = 2, 4, 4, 4, 4
    short.maxstring = short.maxother = SHOWN_CHARS
    short.maxlong = 40
    return short


def shown(value: object) -> str:
    """A value as an error message may echo it: its repr, cut to a short prefix with its length where it is long
    (a 150 MB learning_rate must not come back as 300 MB). Long strings are cut before repr copies them."""
    if isinstance(value, str | bytes) and len(value) > SHOWN_CHARS:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:SHOWN_CHARS]!r}... ({len(value):,} {unit})"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {value.bit_length():,}-bit integer"
    return _short_repr().repr(value)


def one_line(message: str, limit: int = MESSAGE_CHARS) -> str:
    """A message as one line of at most `limit` characters (the CLI's error line, the server's "error" field)."""
    text = " ".join(message[: limit * 4].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TistudioError(Exception):
    """Base class for every error caused by user input, files or the environment."""


class OptionError(TistudioError):
    """An option has a value that cannot be used (out of range, wrong type, bad syntax)."""

    def __init__(self, field: str, value: object, fix: str) -> None:
        self.field = field if len(str(field)) <= SHOWN_CHARS else shown(str(field))
        self.value = value
        self.fix = fix
        super().__init__(f"{self.field}={shown(value)}: {fix}")


class FieldError(OptionError):
    """An error about a field whose message is already whole (e.g. a job's error, which named the field itself)."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.value, self.fix = field, None, message
        TistudioError.__init__(self, message)


class DatasetError(TistudioError):
    """The training images cannot be used (missing folder, no readable image, ...)."""


class EmbeddingError(TistudioError):
    """An embedding file is missing, unreadable, hostile, or does not fit the model."""


class ModelError(TistudioError):
    """A model cannot be found, read or used (unknown format, unsupported family, ...)."""


class UnsafeFileError(TistudioError):
    """A file was refused because reading it could run code or exhaust memory."""


class StorageError(TistudioError):
    """A file could not be written (disk full, read-only folder, ...); previous files are left intact."""
