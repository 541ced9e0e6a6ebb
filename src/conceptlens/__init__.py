"""conceptlens: talk to image representations in words, offline, on a laptop CPU."""
from .errors import ConceptlensError
from .models import list_models, load_model

__all__ = ["ConceptlensError", "list_models", "load_model"]
__version__ = "0.1.0"
