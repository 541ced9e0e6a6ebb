"""Diffusion models as zero-shot classifiers (Clark & Jaini 2023; Li et al. 2023): classifier and strategies."""
from .classifier import PRESETS, DiffusionClassifier, evaluate, image_tensors
from .strategies import STRATEGIES, lowdisc_timesteps, pair_errors

__all__ = ["PRESETS", "STRATEGIES", "DiffusionClassifier", "evaluate", "image_tensors", "lowdisc_timesteps",
           "pair_errors"]
