"""conceptlens: talk to image representations in words, offline, on a laptop CPU."""
from .errors import ConceptlensError
from . import align, concepts, data, decode, explain, features, search, zeroshot
from .models import list_models, load_model

__all__ = ["ConceptlensError", "align", "concepts", "data", "decode", "explain", "features", "list_models",
           "load_model", "search", "zeroshot"]
__version__ = "0.2.0"
