"""conceptlens: talk to image representations in words, offline, on a laptop CPU."""
from .errors import ConceptlensError
from . import data, features, zeroshot
from .models import list_models, load_model

__all__ = ["ConceptlensError", "data", "features", "list_models", "load_model", "zeroshot"]
__version__ = "0.1.0"
