"""Errors a user can cause and fix.

Everything the engine raises on purpose is a :class:`VirefsamError` whose ``str()`` is one sentence that says
what went wrong and what to do. The CLI prints that sentence to stderr, the QGIS plugin shows it in the
message bar; neither shows a traceback for it. Anything else is a bug.
"""


class VirefsamError(Exception):
    """A problem with the user's input, files or settings; the message says what to do."""


class InputError(VirefsamError):
    """A raster, reference or output path the engine cannot use."""


class ModelError(VirefsamError):
    """A checkpoint or adapter file that is missing, corrupt or of another model."""


class CancelledError(VirefsamError):
    """The run was cancelled by the user; partial outputs have been removed."""

    def __init__(self, message: str = "The run was cancelled; nothing was written.") -> None:
        super().__init__(message)
