"""The converter's errors, each with its documented exit code."""

from __future__ import annotations

from edge_daemon.errors import EdgeDaemonError


class ConverterError(EdgeDaemonError):
    """Root of the converter's errors."""


class InputMissingError(ConverterError):
    """A model, dataset or file named on the command line does not exist or cannot be read."""

    exit_code = 66  # EX_NOINPUT


class BadInputError(ConverterError):
    """An input exists but is not usable: not a model, an empty dataset, a labels mismatch."""

    exit_code = 65  # EX_DATAERR


class GateFailedError(ConverterError):
    """The converted model failed a check: too much accuracy lost, ops left off the Edge TPU."""

    exit_code = 3


class ToolMissingError(ConverterError):
    """An external tool (edgetpu_compiler) or an optional package is not installed."""

    exit_code = 69  # EX_UNAVAILABLE
