"""edge-daemon: cameras to batched TFLite inference to MQTT, on a Raspberry Pi or a Coral box.

Importing this package never imports TensorFlow: the interpreter comes from
``edge_daemon.runtime``, which prefers the light runtimes.
"""

from __future__ import annotations

__version__ = "0.1.0"
