"""``python -m edge_daemon``."""

import sys

from edge_daemon.cli import main

sys.exit(main())
