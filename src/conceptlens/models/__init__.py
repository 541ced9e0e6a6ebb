"""Model registry and adapters."""
from .base import Encoder, VisionTower
from .registry import list_models, load_model

__all__ = ["Encoder", "VisionTower", "list_models", "load_model"]
