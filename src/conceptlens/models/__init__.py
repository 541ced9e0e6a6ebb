"""Models: protocols (base), the registry (_registry) and factory (_factory), built-in towers (vision, text,
lite_clip), adapters for other libraries, mapped encoders (aligners, trained CLIP heads) and denoisers."""
from ._factory import check_offline, list_models, load_model, split_model_uri
from ._registry import ModelInfo, register_model
from .base import Denoiser, Encoder, MappedEncoder, VisionTower

__all__ = ["Denoiser", "Encoder", "MappedEncoder", "ModelInfo", "VisionTower", "check_offline", "list_models", "split_model_uri",
           "load_model", "register_model"]
