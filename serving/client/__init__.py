"""Client side: the Python client, the `attnserve generate/predict/models` commands, heatmaps, the health probe."""

from .client import AttnServeClient

__all__ = ["AttnServeClient"]
