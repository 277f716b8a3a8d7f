"""The one error type for user mistakes.

Library code raises :class:`QDetrError` with a one-line message that names the file (or option) and the
problem; only ``qdetr_deploy.cli`` turns it into exit code 2.
"""

from __future__ import annotations

import os


class QDetrError(Exception):
    """A user mistake: bad file, bad option, impossible request. Message is one line."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{os.fspath(path)}: {message}"
        super().__init__(message)
