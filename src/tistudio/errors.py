"""The project's own exception types.

Every error a user can cause is one of these, with a message that names the field or file, the value and
the fix. The CLI prints ``str(error)`` as one line on stderr and exits with code 2; the server will map them
to HTTP 400. Anything else that escapes is a bug.
"""

from __future__ import annotations


class TistudioError(Exception):
    """Base class for every error caused by user input, files or the environment."""


class OptionError(TistudioError):
    """An option has a value that cannot be used (out of range, wrong type, bad syntax)."""

    def __init__(self, field: str, value: object, fix: str) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field}={value!r}: {fix}")


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
