"""The project's error types: every failure a user can cause is one of these, with a one-line message."""

from __future__ import annotations


class CaptionerError(Exception):
    """An error the user can act on; the CLI prints its message on one line and exits non-zero."""


class ImageError(CaptionerError):
    """An image file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DataError(CaptionerError):
    """A dataset (annotations, splits, image folder) that cannot be read as asked."""


class CheckpointError(CaptionerError):
    """A run directory that is missing, incomplete, corrupt or incompatible."""


class ConfigError(CaptionerError):
    """An option or configuration value outside its allowed range."""
