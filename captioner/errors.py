"""The project's error types: every failure a user can cause is one of these, with a one-line message."""

from __future__ import annotations

import re

# What a terminal obeys rather than shows: C0 controls but tab (ESC starts a sequence, BEL, backspace and
# carriage return rewrite the line), DEL, and C1 controls (\x9b is a one-byte CSI on many terminals).
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROLS_BUT_NEWLINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SHORT = {"\n": "\\n", "\r": "\\r"}


def printable(text: str, *, newlines: bool = False) -> str:
    """Text from outside (a file name, a message, a caption) with every control character shown as an escape.

    A file name or vocabulary word holding `\\x1b]0;...` would otherwise retitle, wipe or rewrite the user's
    terminal. Ordinary unicode and tabs stay; newlines stay only when the caller prints several lines.
    """
    controls = _CONTROLS_BUT_NEWLINE if newlines else _CONTROLS
    return controls.sub(lambda m: _SHORT.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


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
