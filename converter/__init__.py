"""edge-convert: train, quantise and check models for edge-daemon (needs TensorFlow)."""

from __future__ import annotations

__version__ = "0.1.0"
