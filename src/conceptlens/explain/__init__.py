"""FALCON (Kalibhat et al., ICML 2023): features, feature groups and directions explained with words."""
from .falcon import (CaptionBankIndex, caption_concepts, concept_scores, contrast, explain, find_groups, gradcam_crops,
                     high_images, low_images, normalised, ranked, run_falcon, target_values,
                     transfer_target)

__all__ = ["CaptionBankIndex", "caption_concepts", "concept_scores", "contrast", "explain", "find_groups",
           "gradcam_crops", "high_images", "low_images", "normalised", "ranked", "run_falcon", "target_values",
           "transfer_target"]
