"""``python -m edge_daemon``."""

from edge_daemon.cli import entry

entry()
