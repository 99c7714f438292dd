"""Linesight: what every process speaks (protocol, MQTT link, model bundles)."""

__version__ = "0.1.0"
