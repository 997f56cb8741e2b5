"""The exception tree: one root, a few kinds, each carrying a message a user can act on."""

from __future__ import annotations


class EdgeDaemonError(Exception):
    """Root of every error this project raises on purpose."""

    #: Process exit code for this kind of error (78 is EX_CONFIG: systemd must not loop).
    exit_code: int = 1


class ConfigError(EdgeDaemonError):
    """A setting, file or argument is wrong; the message says which and how to fix it."""

    exit_code = 78

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        #: One line per problem, each naming the variable to fix.
        self.problems = problems or [message]


class UsageError(EdgeDaemonError):
    """The command line asks for something that cannot be done (exit 2, as argparse's)."""

    exit_code = 2


class ModelError(EdgeDaemonError):
    """A model, its manifest or its labels cannot be used."""

    exit_code = 78


class CaptureError(EdgeDaemonError):
    """A video source cannot be opened or read."""


class PublishError(EdgeDaemonError):
    """The MQTT broker cannot be reached or refused us."""


class DelegateError(ModelError):
    """A hardware delegate (the Edge TPU) could not be loaded."""
