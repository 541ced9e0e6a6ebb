"""Diffusion models as zero-shot classifiers (Clark & Jaini 2023; Li et al. 2023) and the embedded model."""
from .model import TinyDiffusion, load_tiny_diffusion

__all__ = ["TinyDiffusion", "load_tiny_diffusion"]
